"""Typed settings of every pipeline step; their defaults are the seed recipe.

This is the one home of the recipe's numbers. The Dagster shell turns each dataclass into a
launchpad `dg.Config` (``rugpt_assets.settings``) and a profile only replaces fields, so the
launchpad, the CLI trainer and the benches all read the same defaults. Plain dataclasses
(not pydantic) keep ``core`` importable where only torch/transformers/peft exist.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# The TrainConfig an adapter was trained with, saved beside it (evaluation reads its system prompt).
TRAIN_CONFIG_FILE = "train_config.json"

DEFAULT_SYSTEM_PROMPT = (
    "Ты — ruGPT-3.5, русскоязычный автоматический ассистент. "
    "Ты разговариваешь с людьми и помогаешь им."
)


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


@dataclass(frozen=True)
class MergeConfig:
    dtype: str = "float16"  # float16 | bfloat16 | float32


@dataclass(frozen=True)
class ExportConfig:
    threads: int = 2  # llm-rs threads for load/generate checks; unset oversubscribes (DESIGN §5)
    eval_chats: int = 32  # validation chats used for perplexity and KL to f16
    eval_max_tokens: int = 256
    # f16's most likely next tokens kept per target token for KL, the rest as one tail outcome
    # (core/scoring.py): 8 KB a token on disk instead of the whole vocabulary's 201 KB at 13B.
    kl_top_k: int = 1024
    check_prompt: str = "Привет! Расскажи о себе."
    check_new_tokens: int = 16


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
