"""The data side: tokenized chats, rows (packed or one chat each), micro-batches, and the chats
of each optimizer step (`DataPlan`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rugpt_assets.core.artifacts import read_jsonl
from rugpt_assets.core.chat_template import tokenize_chat
from rugpt_assets.core.configs import TrainConfig
from rugpt_assets.core.packing import Row, TokenizedChat, pack
from rugpt_assets.core.train.runtime import Runtime


def load_chats(path: Path, tokenizer: Any, cfg: TrainConfig) -> tuple[list[TokenizedChat], int]:
    """Tokenized chats of a jsonl split, and how many were skipped for having no target token
    within ``max_tokens_count`` (they would add nothing to the loss)."""
    chats, skipped = [], 0
    for n, row in enumerate(read_jsonl(path), 1):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError(f'{path}, row {n}: expected {{"messages": [{{"role": str, "content": str}}, ...]}}')
        chat = TokenizedChat(*tokenize_chat(messages, tokenizer, cfg.max_tokens_count, cfg.system_prompt))
        if chat.n_targets:
            chats.append(chat)
        else:
            skipped += 1
    if not chats:
        raise ValueError(f"{path}: no chat has a bot message within max_tokens_count={cfg.max_tokens_count}")
    return chats, skipped


def make_rows(chats: Sequence[TokenizedChat], cfg: TrainConfig) -> list[Row]:
    """Packed rows, or one chat per row (the seed's shape) when packing is off."""
    if not cfg.packing:
        return [[chat] for chat in chats]
    return [[chats[i] for i in row] for row in pack([len(c) for c in chats], cfg.pack_tokens)]


def batch_shape(cfg: TrainConfig) -> tuple[int, int] | None:
    """The one micro-batch shape of a run with compiled blocks and packing: ``pack_tokens`` long,
    short micro-batches completed with padding rows. Compiled blocks recompile for every new
    shape (and after the first, compile for any shape, which is slower); eager runs pad only to
    the longest row, which costs less."""
    return (cfg.per_device_batch_size, cfg.pack_tokens) if cfg.packing and cfg.compile_blocks else None


def rank_batches(chats: Sequence[TokenizedChat], cfg: TrainConfig, rt: Runtime) -> list[list[Row]]:
    """This rank's share of ``chats`` as micro-batches of ``per_device_batch_size`` rows."""
    rows = make_rows(chats[rt.rank :: rt.world_size], cfg)
    return [rows[i : i + cfg.per_device_batch_size] for i in range(0, len(rows), cfg.per_device_batch_size)]


@dataclass(frozen=True)
class DataPlan:
    """The chats of each optimizer step: a function of (seed, step) only, so a resumed run reads
    exactly what the uninterrupted one would have. Each epoch reshuffles; the last partial step's
    worth of chats sits that epoch out.

    A step always takes the seed's global batch of chats (per_device_batch_size ×
    gradient_accumulation_steps × world size), packed or not: packing changes how many forward
    passes a step needs, not what it learns from.
    """

    chats: Sequence[TokenizedChat]
    chats_per_step: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.chats) // self.chats_per_step

    def step_chats(self, step: int) -> list[TokenizedChat]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.chats), generator=torch.Generator().manual_seed(self.seed + epoch))
        return [self.chats[i] for i in order[k * self.chats_per_step : (k + 1) * self.chats_per_step].tolist()]
