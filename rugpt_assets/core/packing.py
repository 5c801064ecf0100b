"""Packed batches with exact per-chat attention (DESIGN §7).

Chats are packed into rows of at most ``pack_tokens`` tokens (best-fit decreasing, so rows are
nearly full). Inside a row every chat keeps its own positions (0, 1, …) and attends only to
itself: transformers (≥ 5) reads restarting ``position_ids`` without an ``attention_mask`` as
packed sequences and builds the block-diagonal causal mask itself — a 4-D mask for eager and
SDPA attention, varlen kernels for flash attention — so we pass no mask of our own. The padding
at the end of a row is one more segment that no chat can see (attention is causal and padding
comes last) and carries no labels. ``targets`` are the labels shifted by one inside each chat,
so no token is trained to predict the first token of the next chat.

An unpacked batch (the seed's shape: one chat per row, padded to the longest) is the same
structure with one chat per row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from rugpt_assets.core.chat_template import IGNORE_INDEX


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where the token carries no loss

    def __len__(self) -> int:
        return len(self.input_ids)

    @cached_property
    def n_targets(self) -> int:
        """Tokens that carry loss; the first token is never predicted."""
        return sum(t != IGNORE_INDEX for t in self.labels[1:])


Row = Sequence[TokenizedChat]


def pack(lengths: Sequence[int], pack_tokens: int) -> list[list[int]]:
    """Group chat indices into rows of at most ``pack_tokens`` tokens (best-fit decreasing).

    Longest chats first; each goes into the fullest row it still fits in. Deterministic.
    """
    too_long = [n for n in lengths if n > pack_tokens]
    if too_long:
        raise ValueError(
            f"{len(too_long)} chats are longer than pack_tokens={pack_tokens} (longest {max(too_long)} tokens): "
            "raise pack_tokens or lower max_tokens_count"
        )
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row index), sorted; full rows are dropped
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            left, r = free.pop(k)
        else:
            left, r = pack_tokens, len(rows)
            rows.append([])
        rows[r].append(i)
        if left > n:
            bisect.insort(free, (left - n, r))
    return rows


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # restart at 0 for every chat and for the padding
    targets: torch.Tensor  # next-token labels; IGNORE_INDEX where no loss
    n_tokens: int  # real tokens (chats), padding excluded
    n_targets: int  # tokens that carry loss

    def to(self, device: torch.device) -> Batch:
        move = dict(device=device, non_blocking=True)
        return Batch(
            self.input_ids.to(**move),
            self.position_ids.to(**move),
            self.targets.to(**move),
            self.n_tokens,
            self.n_targets,
        )


def collate(rows: Sequence[Row], filler_id: int) -> Batch:
    """Right-pad the rows to the longest one.

    Padding slots hold ``filler_id`` rather than the pad id: their value never matters (own
    segment, no labels), and a pad id in an unmasked batch makes transformers warn that an
    attention_mask is missing.
    """
    length = max(sum(len(chat) for chat in row) for row in rows)
    input_ids = torch.full((len(rows), length), filler_id, dtype=torch.long)
    position_ids = torch.empty((len(rows), length), dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    n_tokens = 0
    for b, row in enumerate(rows):
        t = 0
        for chat in row:
            n = len(chat)
            input_ids[b, t : t + n] = torch.tensor(chat.input_ids)
            position_ids[b, t : t + n] = torch.arange(n)
            targets[b, t : t + n - 1] = torch.tensor(chat.labels[1:])
            t += n
        position_ids[b, t:] = torch.arange(length - t)
        n_tokens += t
    n_targets = int((targets != IGNORE_INDEX).sum())
    return Batch(input_ids, position_ids, targets, n_tokens, n_targets)
