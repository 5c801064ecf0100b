"""Typed settings of every pipeline step; their defaults are the seed recipe.

This is the one home of the recipe's numbers. The Dagster shell turns each dataclass into a
launchpad `dg.Config` (``rugpt_assets.settings``) and a profile only replaces fields, so the
launchpad, the CLI trainer and the benches all read the same defaults. Plain dataclasses
(not pydantic) keep ``core`` importable where only torch/transformers/peft exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_SYSTEM_PROMPT = (
    "Ты — ruGPT-3.5, русскоязычный автоматический ассистент. "
    "Ты разговариваешь с людьми и помогаешь им."
)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "packed_varlen")
DEVICES = ("auto", "cpu", "cuda")
# transformers' schedulers that need nothing beyond warmup and total steps
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
MERGE_DTYPES = ("float16", "bfloat16", "float32")

Rule = tuple[Callable[[Any], bool], str]  # (value is valid, what a valid value is)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> Rule:
    return (lambda v: _number(v) and v >= low), f"must be a number >= {low}"


def above(low: float) -> Rule:
    return (lambda v: _number(v) and v > low), f"must be a number > {low}"


def fraction(open_low: bool = False, open_high: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        return _number(v) and (v > 0 if open_low else v >= 0) and (v < 1 if open_high else v <= 1)

    return ok, f"must be in {'(' if open_low else '['}0, 1{')' if open_high else ']'}"


def one_of(choices: tuple[str, ...]) -> Rule:
    return (lambda v: v in choices), f"use one of {choices}"


def check_fields(config: Any, rules: dict[str, Rule]) -> None:
    """Raise one ValueError naming every field whose value breaks its rule (and the rule)."""
    problems = [f"{name}={getattr(config, name)!r}: {why}" for name, (ok, why) in rules.items() if not ok(getattr(config, name))]
    if problems:
        raise ValueError(f"invalid {type(config).__name__} settings: " + "; ".join(problems))


@dataclass(frozen=True)
class RecipeConfig:
    """rulm `create_chat_set` (DESIGN §3)."""

    seed: int = 42
    train_fraction: float = 0.95
    dedup_threshold: float = 0.3
    dedup_num_perm: int = 32
    merge_short_below_chars: int = 1000
    mix_long_above_chars: int = 2000
    mix_probability: float = 0.5
    conversation_max_chars: int = 10000
    roleplay_greeting_probability: float = 0.2
    roleplay_example_probability: float = 0.2
    # Empty means the list shipped with the package (rulm's own).
    bad_substrings_path: str = ""

    def __post_init__(self) -> None:
        check_fields(self, {
            "seed": at_least(0),
            "train_fraction": fraction(open_low=True, open_high=True),
            "dedup_threshold": fraction(),
            "dedup_num_perm": at_least(2),
            "merge_short_below_chars": at_least(0),
            "mix_long_above_chars": at_least(0),
            "mix_probability": fraction(),
            "conversation_max_chars": at_least(1),
            "roleplay_greeting_probability": fraction(),
            "roleplay_example_probability": fraction(),
            "bad_substrings_path": ((lambda v: v == "" or Path(v).is_file()), "must be empty or name an existing file"),
        })  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """rulm `train.py` with the gigasaiga config (DESIGN §4)."""

    # LoRA (PEFT)
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["c_attn"])
    # Data
    max_tokens_count: int = 1000
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Optimisation
    learning_rate: float = 3e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 30
    per_device_batch_size: int = 2
    gradient_accumulation_steps: int = 128
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 caps optimizer steps (demo runs, smoke tests)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    # Evaluation / checkpoints, in optimizer steps
    eval_steps: int = 50
    save_steps: int = 50
    max_eval_chats: int = 0  # 0 = the whole validation split
    # Numerics / memory
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 ("auto": bf16 on CUDA if supported, else fp32)
    load_in_8bit: bool = True
    load_in_4bit: bool = False
    gradient_checkpointing: bool = True
    # sdpa | eager | packed_varlen. "packed_varlen" (CUDA, bf16/fp16) runs PyTorch's flash kernel
    # over each packed chat: same maths as sdpa (dropout included) without a dense per-row mask.
    attn_implementation: str = "sdpa"
    # torch.compile each transformer block (one compiled graph serves all layers). Fusing the
    # elementwise work (GELU, dropout, layer norm) saves activation memory and time on a GPU.
    compile_blocks: bool = False
    packing: bool = True  # pack chats into rows with exact per-chat attention (DESIGN §7)
    pack_tokens: int = 2048
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        check_fields(self, {
            "lora_r": at_least(1),
            "lora_alpha": above(0),
            "lora_dropout": fraction(open_high=True),
            "lora_target_modules": ((lambda v: bool(v) and all(isinstance(m, str) and m for m in v)),
                                    "must name at least one module"),
            "max_tokens_count": at_least(2),
            "learning_rate": above(0),
            "lr_scheduler": one_of(LR_SCHEDULERS),
            "warmup_steps": at_least(0),
            "per_device_batch_size": at_least(1),
            "gradient_accumulation_steps": at_least(1),
            "num_epochs": above(0),
            "max_steps": ((lambda v: v == -1 or (_number(v) and v >= 1)), "must be -1 (no cap) or >= 1"),
            "weight_decay": at_least(0),
            "max_grad_norm": above(0),
            "seed": at_least(0),
            "eval_steps": at_least(1),
            "save_steps": at_least(1),
            "max_eval_chats": at_least(0),
            "precision": ((lambda v: v in PRECISIONS), "use 'auto', 'bf16', 'fp16' or 'fp32'"),
            "load_in_4bit": ((lambda v: not (v and self.load_in_8bit)),
                             "load_in_8bit and load_in_4bit are both true: set one of them to false"),
            "attn_implementation": one_of(ATTN_IMPLEMENTATIONS),
            "device": ((lambda v: v in DEVICES), "use 'auto', 'cpu' or 'cuda'"),
            "pack_tokens": ((lambda v: _number(v) and (not self.packing or v >= self.max_tokens_count)),
                            f"must be >= max_tokens_count ({self.max_tokens_count}) when packing"),
        })  # fmt: skip


@dataclass(frozen=True)
class MergeConfig:
    dtype: str = "float16"  # float16 | bfloat16 | float32

    def __post_init__(self) -> None:
        check_fields(self, {"dtype": one_of(MERGE_DTYPES)})


@dataclass(frozen=True)
class ExportConfig:
    threads: int = 2  # llm-rs threads for load/generate checks; unset oversubscribes (DESIGN §5)
    eval_chats: int = 32  # validation chats used for perplexity
    eval_max_tokens: int = 256
    check_prompt: str = "Привет! Расскажи о себе."
    check_new_tokens: int = 16

    def __post_init__(self) -> None:
        check_fields(self, {
            "threads": at_least(1),
            "eval_chats": at_least(1),
            "eval_max_tokens": at_least(2),
            "check_prompt": ((lambda v: isinstance(v, str) and v.strip() != ""), "must not be empty"),
            "check_new_tokens": at_least(1),
        })  # fmt: skip


@dataclass(frozen=True)
class SourceHealthConfig:
    """When a source snapshot is unfit to train on (the blocking check on each `raw_<name>`)."""

    max_reject_rate: float = 0.01  # rejected rows / rows read
    # Rows kept may fall by at most this fraction against the last healthy snapshot.
    max_row_drop: float = 0.1

    def __post_init__(self) -> None:
        check_fields(self, {"max_reject_rate": fraction(), "max_row_drop": fraction()})


@dataclass(frozen=True)
class GenerationConfig:
    """The seed's generation defaults (chat CLI, generation_config.json)."""

    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 30
    repetition_penalty: float = 1.15
    no_repeat_ngram_size: int = 15
    max_new_tokens: int = 1536


def to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


def from_dict(cls: type, values: dict[str, Any]):
    """Build ``cls`` from a dict, rejecting unknown keys with a clear message."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    return cls(**values)
