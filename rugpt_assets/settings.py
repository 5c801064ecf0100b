"""The environment, the profiles (`demo`, `rugpt35`) and the launchpad configs built from the
core's dataclasses.

`Environment` is every environment variable the package reads, each with its name, default and
meaning; nothing else in the package reads `os.environ`. `RUGPT_PROFILE` picks the profile
(default `demo`), built once per process by `profile()`. A profile only replaces fields of the
seed-recipe dataclasses in `rugpt_assets.core.configs`; `launchpad_config` turns such a
dataclass into a `dg.Config` whose defaults are the profile's values, so every setting can be
overridden per run in the launchpad and nothing is written down twice.
"""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Mapping
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


def variable(name: str, default: Any, help: str) -> Any:
    """An `Environment` field read from the environment variable `name`."""
    return field(default=default, metadata={"env": name, "help": help})


@dataclass(frozen=True)
class Environment:
    """Every environment variable the package reads. An unset or empty variable means the default.

    Read afresh by `environment()` wherever a value is used at run time (the storage root, the
    source mirror, the retrain interval); the profile, built from it once, fixes the rest. Hub
    tokens are not here: a config names the variable that holds one (`secret`).
    """

    profile: str = variable("RUGPT_PROFILE", "demo", "Which profile the code locations run: demo or rugpt35.")
    sources_dir: Path | None = variable(
        "RUGPT_SOURCES_DIR",
        None,
        "A local mirror of the seven datasets in the hub layout; unset: the bundled samples (demo) or the hub (rugpt35).",
    )
    storage_dir: Path | None = variable("RUGPT_STORAGE_DIR", None, "Where artifacts are written; unset: $DAGSTER_HOME/storage/artifacts.")
    dagster_home: Path = variable("DAGSTER_HOME", Path("."), "The Dagster instance's directory (Dagster's own variable).")
    demo_train_steps: int = variable(
        "RUGPT_DEMO_TRAIN_STEPS",
        60,
        "Optimizer steps of the demo profile's training; shortens runs that automation or a backfill start.",
    )
    base_model_repo: str = variable("RUGPT_BASE_MODEL_REPO", RUGPT35_REPO, "The rugpt35 profile's base model on the hub.")
    base_model_revision: str = variable("RUGPT_BASE_MODEL_REVISION", "main", "The revision of that base model.")
    base_model_dir: Path | None = variable(
        "RUGPT_BASE_MODEL_DIR", None, "A base model snapshot already on disk (hub layout), copied instead of downloaded."
    )
    seed_recipe: bool = variable(
        "RUGPT_SEED_RECIPE", False, "1: the rugpt35 profile trains exactly as the seed did (8-bit base, no packing)."
    )
    min_retrain_hours: float = variable(
        "RUGPT_MIN_RETRAIN_HOURS", 6.0, "Hours lora_adapter waits after its last materialization before automation retrains it."
    )
    observe_cron: str = variable("RUGPT_OBSERVE_CRON", "0 * * * *", "Cron schedule of the source observations.")
    serve_host: str = variable(
        "RUGPT_HOST", "127.0.0.1", "Address the OpenAI-compatible server binds to (tasks.py binds the Dagster UI there too)."
    )

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> Environment:
        """The variables set (non-empty) in `environ`, converted to their fields' types."""
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):
            name, raw = f.metadata["env"], environ.get(f.metadata["env"], "")
            if raw:
                values[f.name] = _parse(name, raw, hints[f.name])
        return cls(**values)

    @property
    def storage_root(self) -> Path:
        """Artifacts live under `$RUGPT_STORAGE_DIR`, else `$DAGSTER_HOME/storage/artifacts`."""
        return (self.storage_dir or self.dagster_home / "storage" / "artifacts").resolve()

    @property
    def local_sources_dir(self) -> Path:
        """The local source mirror: `$RUGPT_SOURCES_DIR`, else the bundled samples."""
        return (self.sources_dir or BUNDLED_SAMPLES_DIR).resolve()


def _parse(name: str, raw: str, kind: Any) -> Any:
    if kind is bool:
        return raw == "1"
    target = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    try:
        return target(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {target.__name__}") from None


def environment() -> Environment:
    return Environment.read(os.environ)


def secret(env_var: str) -> str | None:
    """A token from the environment variable a config names; tokens never enter config or metadata."""
    return os.environ.get(env_var) or None


@dataclass(frozen=True)
class Profile:
    name: str
    # "local": the offline hub layout under the local sources dir; "hub": `datasets.load_dataset`.
    source_mode: Literal["local", "hub"]
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


def demo_profile(env: Environment) -> Profile:
    """Offline, bundled samples, tiny GPT-2, CPU: the whole graph in a few minutes."""
    return Profile(
        name="demo",
        source_mode="local",
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
            max_steps=env.demo_train_steps,
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


def rugpt35_profile(env: Environment) -> Profile:
    """The real thing: hub datasets, ruGPT-3.5-13B, one CUDA GPU for training."""
    return Profile(
        name="rugpt35",
        source_mode="local" if env.sources_dir else "hub",
        base_model_repo=env.base_model_repo,
        base_model_revision=env.base_model_revision,
        base_model_dir=env.base_model_dir.resolve() if env.base_model_dir else None,
        # The fast path measured on one H200 (docs/PERFORMANCE.md): bf16 base, packed rows with
        # per-chat varlen attention, compiled blocks, no checkpointing; 4 × 64 rows keeps the
        # seed's 256 chats per optimizer step. On a 24 GB card set load_in_4bit,
        # gradient_checkpointing on and compile_blocks off in the launchpad (11.7–21 GB measured;
        # 8-bit needs more than 24 GB with today's bitsandbytes, see docs/PERFORMANCE.md).
        # RUGPT_SEED_RECIPE=1 trains exactly as the seed did instead (8-bit base, batch 2 × 128,
        # chats padded to the longest, no packing, gradient checkpointing).
        train=replace(TrainConfig(), device="cuda", packing=False)
        if env.seed_recipe
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


def build_profile(env: Environment) -> Profile:
    if env.profile not in PROFILES:
        raise ValueError(f"RUGPT_PROFILE={env.profile!r} is not a profile; choose one of: {', '.join(PROFILES)}")
    return PROFILES[env.profile](env)


@functools.cache
def profile() -> Profile:
    """The profile of this process, built once: the launchpad defaults of both code locations."""
    return build_profile(environment())


def storage_root() -> Path:
    return environment().storage_root


def launchpad_config(defaults: Any) -> type[dg.Config]:
    """A `dg.Config` class with one field per dataclass field, defaulting to `defaults`' values
    and described by the field's help, so the launchpad says what each setting does.

    Built at run time, so declare the asset's config as a class over it, which Dagster and type
    checkers alike take as a `dg.Config`:
    ``class TrainRunConfig(settings.launchpad_config(profile.train)): ...``"""
    hints = typing.get_type_hints(type(defaults))
    model_fields: dict[str, Any] = {}
    for f in fields(defaults):
        value = getattr(defaults, f.name)
        model_fields[f.name] = (hints[f.name], pydantic.Field(default=value, description=f.metadata.get("help")))
    return pydantic.create_model(f"{type(defaults).__name__}Fields", __base__=dg.Config, **model_fields)


def config_to_dataclass(config: dg.Config, cls: type) -> Any:
    """Back from the launchpad config to the core's dataclass (whose checks then run)."""
    return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})
