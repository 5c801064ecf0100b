"""Typed settings of every pipeline step; their defaults are the seed recipe.

This is the one home of the recipe's numbers. Each field carries its own help
(``field(metadata={"help": ...})``), closed choices are ``Literal`` types, and ``__post_init__``
rejects values and combinations that cannot run. The Dagster shell turns each dataclass into a
launchpad `dg.Config` (``rugpt_assets.settings``) whose fields show that help; a profile only
replaces fields, so the launchpad, the CLI trainer and the benches all read the same defaults.
Plain dataclasses (not pydantic) keep ``core`` importable where only torch/transformers/peft exist.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

# The TrainConfig an adapter was trained with, saved beside it (evaluation reads its system prompt).
TRAIN_CONFIG_FILE = "train_config.json"

DEFAULT_SYSTEM_PROMPT = "Ты — ruGPT-3.5, русскоязычный автоматический ассистент. Ты разговариваешь с людьми и помогаешь им."

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]
AttnImplementation = Literal["sdpa", "eager", "packed_varlen"]
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
WeightDtype = Literal["float16", "bfloat16", "float32"]


def setting(default: Any, help: str) -> Any:
    """A dataclass field with its help text (shown in the launchpad); lists get a fresh copy each time."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def field_help(cls: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


class _Checked:
    """Rejects a value outside its ``Literal`` choices and runs the class's own ``check``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{type(self).__name__}.{f.name}={value!r} is not one of: {', '.join(map(str, choices))}")
        problems = self.check()
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))

    def check(self) -> list[str]:
        return []


def _outside(name: str, value: float, low: float, high: float) -> list[str]:
    return [] if low <= value <= high else [f"{name}={value} must be between {low} and {high}"]


def _below(name: str, value: float, minimum: float) -> list[str]:
    return [] if value >= minimum else [f"{name}={value} must be at least {minimum}"]


def _not_above(name: str, value: float, low: float) -> list[str]:
    return [] if value > low else [f"{name}={value} must be greater than {low}"]


@dataclass(frozen=True)
class RecipeConfig(_Checked):
    """rulm's `create_chat_set` recipe (docs/ARCHITECTURE.md, "The chat recipe")."""

    seed: int = setting(42, "Seed of Python's `random`, seeded once as rulm does; drives mixing, roleplay and the split.")
    train_fraction: float = setting(0.95, "Share of shuffled chats that go to train.jsonl; the rest is val.jsonl.")
    dedup_threshold: float = setting(0.3, "MinHash LSH Jaccard threshold for near-duplicate instructions.")
    dedup_num_perm: int = setting(32, "MinHash permutations for near-duplicate removal.")
    merge_short_below_chars: int = setting(1000, "Instruct records up to this many characters are merged in pairs.")
    mix_long_above_chars: int = setting(2000, "Merged instructs longer than this are appended, never mixed into a saiga chat.")
    mix_probability: float = setting(0.5, "Chance that a short merged instruct is appended rather than mixed into a saiga chat.")
    conversation_max_chars: int = setting(10000, "sharegpt/oasst chats longer than this lose their last two messages until they fit.")
    roleplay_greeting_probability: float = setting(0.2, "Chance that a roleplay chat starts with the character's greeting.")
    roleplay_example_probability: float = setting(0.2, "Chance that a roleplay system prompt includes the example dialogue.")
    bad_substrings_path: str = setting("", "File of bad phrases, one per line; empty means rulm's own list shipped with the package.")

    def check(self) -> list[str]:
        return [
            *_outside("train_fraction", self.train_fraction, 0.0, 1.0),
            *_outside("dedup_threshold", self.dedup_threshold, 0.0, 1.0),
            *_below("dedup_num_perm", self.dedup_num_perm, 2),
            *_outside("mix_probability", self.mix_probability, 0.0, 1.0),
            *_outside("roleplay_greeting_probability", self.roleplay_greeting_probability, 0.0, 1.0),
            *_outside("roleplay_example_probability", self.roleplay_example_probability, 0.0, 1.0),
            *_below("seed", self.seed, 0),
            *_below("merge_short_below_chars", self.merge_short_below_chars, 0),
            *_below("mix_long_above_chars", self.mix_long_above_chars, 0),
            *_below("conversation_max_chars", self.conversation_max_chars, 1),
            *(
                [f"bad_substrings_path={self.bad_substrings_path!r} is not a file: leave it empty for rulm's list"]
                if self.bad_substrings_path and not Path(self.bad_substrings_path).is_file()
                else []
            ),
        ]


@dataclass(frozen=True)
class TrainConfig(_Checked):
    """rulm's `train.py` with the gigasaiga config: the seed recipe (docs/ARCHITECTURE.md, "Training")."""

    lora_r: int = setting(16, "Rank r of the LoRA update matrices.")
    lora_alpha: int = setting(16, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = setting(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = setting(["c_attn"], "Module names that get LoRA adapters (GPT-2: c_attn is the fused QKV projection).")
    max_tokens_count: int = setting(1000, "A chat is cut at the last message that still fits this many tokens.")
    system_prompt: str = setting(DEFAULT_SYSTEM_PROMPT, "System message put first in chats that have none (training and evaluation).")
    learning_rate: float = setting(3e-4, "Peak learning rate (AdamW).")
    lr_scheduler: LrScheduler = setting("cosine", "Learning-rate schedule after warm-up (transformers' scheduler names).")
    warmup_steps: int = setting(30, "Linear warm-up, in optimizer steps.")
    per_device_batch_size: int = setting(2, "Rows per micro-batch on each device (chats, or packed rows with packing).")
    gradient_accumulation_steps: int = setting(128, "Micro-batches per optimizer step.")
    num_epochs: float = setting(1.0, "Passes over train.jsonl (fractions allowed).")
    max_steps: int = setting(-1, "If > 0, stop after this many optimizer steps (demo runs, smoke tests).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    seed: int = setting(42, "Seed of data order, LoRA init and dropout.")
    eval_steps: int = setting(50, "Evaluate on the validation chats every this many optimizer steps.")
    save_steps: int = setting(50, "Write a resumable checkpoint every this many optimizer steps.")
    max_eval_chats: int = setting(0, "Validation chats used for eval_loss; 0 means all of val.jsonl.")
    precision: Precision = setting("auto", "Compute precision; auto means bf16 on a CUDA GPU that supports it, else fp32.")
    load_in_8bit: bool = setting(True, "Load the frozen base in 8 bits (bitsandbytes, CUDA only), as the seed did.")
    load_in_4bit: bool = setting(False, "Load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); fits a 24 GB card.")
    gradient_checkpointing: bool = setting(True, "Recompute activations in the backward pass: less memory, about a third slower.")
    attn_implementation: AttnImplementation = setting(
        "sdpa",
        "Attention kernel. packed_varlen (CUDA, bf16/fp16) runs the flash kernel over each packed chat: "
        "the same maths as sdpa without a dense per-row mask.",
    )
    compile_blocks: bool = setting(False, "torch.compile each transformer block (one graph for all layers); faster on a GPU.")
    packing: bool = setting(True, "Pack chats into rows of pack_tokens with exact per-chat attention (no cross-chat attention).")
    pack_tokens: int = setting(2048, "Tokens per packed row; at least max_tokens_count.")
    device: Device = setting("auto", "Where to train; auto means CUDA when available, else the CPU.")

    def check(self) -> list[str]:
        problems = [
            *_below("lora_r", self.lora_r, 1),
            *_not_above("lora_alpha", self.lora_alpha, 0),
            *_below("max_tokens_count", self.max_tokens_count, 2),
            *_not_above("learning_rate", self.learning_rate, 0.0),
            *_below("warmup_steps", self.warmup_steps, 0),
            *_below("per_device_batch_size", self.per_device_batch_size, 1),
            *_below("gradient_accumulation_steps", self.gradient_accumulation_steps, 1),
            *_below("eval_steps", self.eval_steps, 1),
            *_below("save_steps", self.save_steps, 1),
            *_below("max_eval_chats", self.max_eval_chats, 0),
            *_below("weight_decay", self.weight_decay, 0.0),
            *_not_above("max_grad_norm", self.max_grad_norm, 0.0),
            *_below("seed", self.seed, 0),  # numpy's seeds are unsigned
        ]
        if not 0.0 <= self.lora_dropout < 1.0:  # 1 would drop every input of the adapter
            problems.append(f"lora_dropout={self.lora_dropout} must be at least 0 and below 1")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps={self.max_steps} must be -1 (no cap) or at least 1")
        if self.num_epochs <= 0:
            problems.append(f"num_epochs={self.num_epochs} must be positive")
        if not self.lora_target_modules or not all(self.lora_target_modules):
            problems.append(f"lora_target_modules={self.lora_target_modules!r}: name at least one module (c_attn), no empty names")
        if self.load_in_8bit and self.load_in_4bit:
            problems.append("load_in_8bit and load_in_4bit are both true: set one of them to false")
        if self.packing and self.pack_tokens < self.max_tokens_count:
            problems.append(f"pack_tokens={self.pack_tokens} is below max_tokens_count={self.max_tokens_count}: a chat must fit a row")
        return problems


@dataclass(frozen=True)
class MergeConfig(_Checked):
    dtype: WeightDtype = setting("float16", "dtype of the merged weights (the merge itself is computed in float32).")


@dataclass(frozen=True)
class ExportConfig(_Checked):
    threads: int = setting(2, "llm-rs threads for the load/generate checks and speed; left unset it oversubscribes small machines.")
    eval_chats: int = setting(32, "Validation chats scored for perplexity and KL to f16.")
    eval_max_tokens: int = setting(256, "Tokens per validation chat scored.")
    # 8 KB a token on disk instead of the whole vocabulary's 201 KB at 13B (core/scoring.py).
    kl_top_k: int = setting(1024, "f16's most likely next tokens kept per target token for KL to f16; the rest count as one tail outcome.")
    check_prompt: str = setting("Привет! Расскажи о себе.", "User message of the load/generate and greedy-equality checks.")
    check_new_tokens: int = setting(16, "Tokens generated by those checks.")

    def check(self) -> list[str]:
        return [
            *_below("threads", self.threads, 1),
            *_below("eval_chats", self.eval_chats, 1),
            *_below("eval_max_tokens", self.eval_max_tokens, 2),
            *_below("kl_top_k", self.kl_top_k, 1),
            *_below("check_new_tokens", self.check_new_tokens, 1),
            *([] if self.check_prompt.strip() else [f"check_prompt={self.check_prompt!r} is blank: the checks need a user message"]),
        ]


@dataclass(frozen=True)
class SourceHealthConfig(_Checked):
    """When a source snapshot is unfit to train on: the blocking check on each `raw_<name>`."""

    max_reject_rate: float = setting(0.01, "Largest share of rows read that may be rejected (malformed, wrong roles, not UTF-8).")
    max_row_drop: float = setting(0.1, "Largest fraction by which the rows kept may fall against the last healthy snapshot.")

    def check(self) -> list[str]:
        return [
            *_outside("max_reject_rate", self.max_reject_rate, 0.0, 1.0),
            *_outside("max_row_drop", self.max_row_drop, 0.0, 1.0),
        ]


@dataclass(frozen=True)
class GenerationConfig(_Checked):
    """The seed's generation defaults (chat CLI, generation_config.json)."""

    temperature: float = setting(0.2, "Sampling temperature.")
    top_p: float = setting(0.9, "Nucleus sampling mass.")
    top_k: int = setting(30, "Sample among this many most likely tokens.")
    repetition_penalty: float = setting(1.15, "Penalty on tokens already in the context (1 = none).")
    no_repeat_ngram_size: int = setting(15, "Never repeat an n-gram of this size.")
    max_new_tokens: int = setting(1536, "Longest reply, in tokens.")


def to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


def from_dict(cls: type, values: dict[str, Any]):
    """Build ``cls`` from a dict, rejecting unknown keys with a clear message."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    return cls(**values)
