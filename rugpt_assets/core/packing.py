"""Packed batches with exact per-chat attention (docs/ARCHITECTURE.md, "Training").

Chats are packed into rows of at most ``pack_tokens`` tokens (best-fit decreasing, so rows are
nearly full). Inside a row every chat keeps its own positions (0, 1, …) and attends only to
itself: transformers (≥ 5) reads restarting ``position_ids`` without an ``attention_mask`` as
packed sequences and builds the block-diagonal causal mask itself — a 4-D mask for eager and
SDPA attention, varlen kernels for flash attention — so we pass no mask of our own. The padding
at the end of a row is one more segment that no chat can see (attention is causal and padding
comes last) and carries no labels.

A dense mask makes SDPA compute every row's whole square of scores. ``packed_varlen``
(registered here as a transformers attention implementation) instead hands the chat boundaries
(``Batch.cu_seq_lens``) to PyTorch's variable-length flash kernel, which computes each chat's
causal triangle only. ``targets`` are the labels shifted by one inside each chat,
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
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

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
    # Where each segment (chat or padding) starts in the flattened batch, then its total size
    # (int32: flash attention's cu_seqlens).
    cu_seq_lens: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            self.n_tokens,
            self.n_targets,
            self.cu_seq_lens.to(device, non_blocking=True),
        )

    def attention_kwargs(self) -> dict:
        """The chat boundaries under transformers' flash-attention keyword names; attention
        implementations that do not use them ignore them."""
        length = self.input_ids.shape[1]  # bounds every segment: no host sync, one shape
        bounds = self.cu_seq_lens
        # The number of chats changes from batch to batch: compile for any (no recompilation).
        torch._dynamo.maybe_mark_dynamic(bounds, 0)
        return dict(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=length, max_length_k=length)


def collate(rows: Sequence[Row], filler_id: int, shape: tuple[int, int] | None = None) -> Batch:
    """Right-pad the rows to the longest one, or to ``shape`` (rows, length): then padding rows
    (filler only, no labels) complete a short micro-batch, so every micro-batch of a run has one
    shape and compiled code never meets a new one.

    Padding slots hold ``filler_id`` rather than the pad id: their value never matters (own
    segment, no labels), and a pad id in an unmasked batch makes transformers warn that an
    attention_mask is missing.
    """
    longest = max(sum(len(chat) for chat in row) for row in rows)
    n_rows, length = shape or (len(rows), longest)
    if len(rows) > n_rows or longest > length:
        raise ValueError(f"{len(rows)} rows of up to {longest} tokens do not fit the batch shape {shape}")
    rows = [*rows, *([[]] * (n_rows - len(rows)))]
    input_ids = torch.full((n_rows, length), filler_id, dtype=torch.long)
    position_ids = torch.empty((n_rows, length), dtype=torch.long)
    targets = torch.full((n_rows, length), IGNORE_INDEX, dtype=torch.long)
    n_tokens, starts = 0, []
    for b, row in enumerate(rows):
        t = 0
        for chat in row:
            n = len(chat)
            input_ids[b, t : t + n] = torch.tensor(chat.input_ids)
            position_ids[b, t : t + n] = torch.arange(n)
            targets[b, t : t + n - 1] = torch.tensor(chat.labels[1:])
            starts.append(b * length + t)
            t += n
        if t < length:
            starts.append(b * length + t)
        position_ids[b, t:] = torch.arange(length - t)
        n_tokens += t
    n_targets = int((targets != IGNORE_INDEX).sum())
    cu_seq_lens = torch.tensor([*starts, n_rows * length], dtype=torch.int32)
    return Batch(input_ids, position_ids, targets, n_tokens, n_targets, cu_seq_lens)


def packed_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each segment of ``Batch.cu_seq_lens`` (a transformers attention
    function): (rows, heads, length, head_dim) in, (rows, length, heads, head_dim) out.

    ``aten._flash_attention_forward`` is the variable-length kernel behind SDPA's flash path and
    has a backward; unlike ``torch.nn.attention.varlen`` it takes attention dropout.
    """
    if cu_seq_lens_q is None:
        raise ValueError("packed_varlen needs the chat boundaries: pass **batch.attention_kwargs() to the model")
    rows, heads, length, dim = query.shape
    device = query.device.type
    # Autocast lowers SDPA's inputs; this op is not on its lists, so lower them here.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(rows * length, heads, dim).to(dtype)

    out = torch.ops.aten._flash_attention_forward(
        flat(query), flat(key), flat(value), cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q,
        dropout, True, False, scale=scaling,
    )[0]  # fmt: skip
    return out.view(rows, length, heads, dim), None


AttentionInterface.register("packed_varlen", packed_varlen_attention)
# No mask to build: the boundaries travel as cu_seq_lens.
AttentionMaskInterface.register("packed_varlen", lambda *args, **kwargs: None)
