"""Profiles (`demo`, `rugpt35`) and the launchpad configs built from the core's dataclasses.

`RUGPT_PROFILE` picks the profile (default `demo`). A profile only replaces fields of the
seed-recipe dataclasses in `rugpt_assets.core.configs`; `launchpad_config` turns such a
dataclass into a `dg.Config` whose defaults are the profile's values, so every setting can be
overridden per run in the launchpad and nothing is written down twice.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import pydantic

from rugpt_assets.core.configs import (
    ExportConfig,
    MergeConfig,
    RecipeConfig,
    SourceHealthConfig,
    TrainConfig,
)

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_SAMPLES_DIR = PACKAGE_DIR / "samples"

RUGPT35_REPO = "ai-forever/ruGPT-3.5-13B"


@dataclass(frozen=True)
class Profile:
    name: str
    # "local": the offline hub layout under `sources_dir`; "hub": `datasets.load_dataset`.
    source_mode: Literal["local", "hub"]
    sources_dir: Path
    # None means the deterministic tiny demo GPT-2 built locally.
    base_model_repo: str | None
    base_model_revision: str
    # A snapshot already on disk (hub layout), used instead of downloading `base_model_repo`.
    base_model_dir: Path | None = None
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source_health: SourceHealthConfig = field(default_factory=SourceHealthConfig)


def _sources_dir() -> Path:
    return Path(os.environ.get("RUGPT_SOURCES_DIR") or BUNDLED_SAMPLES_DIR).resolve()


def demo_profile() -> Profile:
    """Offline, bundled samples, tiny GPT-2, CPU: the whole graph in a few minutes."""
    return Profile(
        name="demo",
        source_mode="local",
        sources_dir=_sources_dir(),
        base_model_repo=None,
        base_model_revision="demo",
        train=replace(
            TrainConfig(),
            max_tokens_count=512,
            learning_rate=2e-3,
            warmup_steps=4,
            per_device_batch_size=4,
            gradient_accumulation_steps=2,
            num_epochs=3.0,
            # RUGPT_DEMO_TRAIN_STEPS shortens it where a run is started by automation or a
            # backfill, which carry no run config (the end-to-end tests).
            max_steps=int(os.environ.get("RUGPT_DEMO_TRAIN_STEPS", "60")),
            eval_steps=15,
            save_steps=15,
            precision="fp32",
            load_in_8bit=False,
            gradient_checkpointing=False,
            pack_tokens=512,
            device="cpu",
        ),
        # One llm-rs thread: on a small shared CPU more threads make it orders of magnitude slower.
        export=replace(ExportConfig(), threads=1, eval_chats=16, eval_max_tokens=256),
        # The bundled samples hold a few deliberately malformed rows per source (up to 3 of 11)
        # to show the counting; a schema change that rejects most rows still fails.
        source_health=replace(SourceHealthConfig(), max_reject_rate=0.3),
    )


def rugpt35_profile() -> Profile:
    """The real thing: hub datasets, ruGPT-3.5-13B, one CUDA GPU for training."""
    return Profile(
        name="rugpt35",
        source_mode="local" if os.environ.get("RUGPT_SOURCES_DIR") else "hub",
        sources_dir=_sources_dir(),
        base_model_repo=os.environ.get("RUGPT_BASE_MODEL_REPO", RUGPT35_REPO),
        base_model_revision=os.environ.get("RUGPT_BASE_MODEL_REVISION", "main"),
        base_model_dir=Path(os.environ["RUGPT_BASE_MODEL_DIR"]).resolve() if os.environ.get("RUGPT_BASE_MODEL_DIR") else None,
        # The fast path measured on one H200 (docs/PERFORMANCE.md): bf16 base, packed rows with
        # per-chat varlen attention, compiled blocks, no checkpointing; 4 × 64 rows keeps the
        # seed's 256 chats per optimizer step. On a 24 GB card set load_in_4bit,
        # gradient_checkpointing on and compile_blocks off in the launchpad (11.7–21 GB measured;
        # 8-bit needs more than 24 GB with today's bitsandbytes, see docs/PERFORMANCE.md).
        # RUGPT_SEED_RECIPE=1 trains exactly as the seed did instead (8-bit base, batch 2 × 128,
        # chats padded to the longest, no packing, gradient checkpointing).
        train=replace(TrainConfig(), device="cuda", packing=False)
        if os.environ.get("RUGPT_SEED_RECIPE") == "1"
        else replace(
            TrainConfig(),
            device="cuda",
            load_in_8bit=False,
            gradient_checkpointing=False,
            per_device_batch_size=4,
            gradient_accumulation_steps=64,
            attn_implementation="packed_varlen",
            compile_blocks=True,
        ),
    )


PROFILES = {"demo": demo_profile, "rugpt35": rugpt35_profile}


def active_profile() -> Profile:
    name = os.environ.get("RUGPT_PROFILE", "demo")
    if name not in PROFILES:
        raise ValueError(
            f"RUGPT_PROFILE={name!r} is not a profile; choose one of: {', '.join(PROFILES)}"
        )
    return PROFILES[name]()


def storage_root() -> Path:
    """Artifacts live under `$RUGPT_STORAGE_DIR`, else `$DAGSTER_HOME/storage/artifacts`."""
    explicit = os.environ.get("RUGPT_STORAGE_DIR")
    if explicit:
        return Path(explicit).resolve()
    return (Path(os.environ.get("DAGSTER_HOME", ".")) / "storage" / "artifacts").resolve()


def launchpad_config(name: str, defaults: Any) -> type[dg.Config]:
    """A `dg.Config` class with one field per dataclass field, defaulting to `defaults`' values
    and described by the field's help, so the launchpad says what each setting does."""
    hints = typing.get_type_hints(type(defaults))
    model_fields: dict[str, Any] = {}
    for f in fields(defaults):
        value = getattr(defaults, f.name)
        model_fields[f.name] = (hints[f.name], pydantic.Field(default=value, description=f.metadata.get("help")))
    return pydantic.create_model(name, __base__=dg.Config, **model_fields)


def config_to_dataclass(config: dg.Config, cls: type) -> Any:
    """Back from the launchpad config to the core's dataclass (whose checks then run)."""
    return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})
