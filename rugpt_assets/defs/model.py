"""The model half: `base_model` → `lora_adapter` (GPU pool, via Pipes) → `merged_model`.

`lora_adapter` belongs to the GPU code location (`rugpt_assets.gpu_definitions`), the other two
to the CPU one (`rugpt_assets.definitions`); the dependencies between them are plain asset keys.
"""

import json
import math
import time
from pathlib import Path

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.core import merge, train
from rugpt_assets.core.artifacts import published, require_upstream
from rugpt_assets.core.base_model import check_base_model_settings, materialize_base_model
from rugpt_assets.core.configs import MergeConfig, TrainConfig
from rugpt_assets.core.figures import MEASURE_DIGITS, QUALITY_DIGITS, significant
from rugpt_assets.defs.automation import retrain_condition, training_condition
from rugpt_assets.defs.metadata import rounded_floats
from rugpt_assets.defs.resources import StorageResource, TrainerResource

PROFILE = settings.profile()


class TrainRunConfig(settings.launchpad_config(PROFILE.train)):
    """`TrainConfig` in the launchpad, defaulting to the profile's values."""


class MergeRunConfig(settings.launchpad_config(PROFILE.merge)):
    """`MergeConfig` in the launchpad, defaulting to the profile's values."""


class BaseModelConfig(dg.Config):
    repo: str | None = PROFILE.base_model_repo  # None: the tiny demo GPT-2 built here
    revision: str = PROFILE.base_model_revision
    # A snapshot on disk (RUGPT_BASE_MODEL_DIR) instead of the hub: copied, not downloaded.
    local_dir: str | None = str(PROFILE.base_model_dir) if PROFILE.base_model_dir else None
    token_env_var: str = "HF_TOKEN"


@dg.asset(
    group_name="model",
    kinds={"huggingface", "pytorch", "safetensors"},
    owners=["team:ml"],
    pool="cpu",
    code_version="1",
    description=(
        "The base model as safetensors: a pinned snapshot of `ai-forever/ruGPT-3.5-13B` with the "
        "seed's tokenizer/generation fixes (profile `rugpt35`; `RUGPT_BASE_MODEL_DIR` copies a snapshot "
        "already on disk instead), or a tiny deterministic GPT-2 with "
        "the same special tokens trained on the bundled samples (profile `demo`). Written once: "
        "materialized again with the same revision (or demo recipe), it re-verifies the files' "
        "sha256 against the snapshot's manifest and reuses them; its data version is the content hash. "
        "Directory: `<storage>/base_model/`."
    ),
)
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, storage: StorageResource) -> dg.MaterializeResult:
    check_base_model_settings(config.repo, config.revision, config.token_env_var, config.local_dir)
    target = storage.layout.base_model
    token = settings.secret(config.token_env_var)
    started = time.perf_counter()
    snapshot = materialize_base_model(
        target,
        config.repo,
        config.revision,
        token,
        settings.BUNDLED_SAMPLES_DIR,
        Path(config.local_dir) if config.local_dir else None,
    )
    seconds = time.perf_counter() - started
    if snapshot.reused:
        context.log.info(f"reused the base model snapshot in {target} ({len(snapshot.files)} files verified in {seconds:.1f} s)")
    else:
        context.log.info(f"built the base model snapshot in {target} in {seconds:.1f} s; not reused: {snapshot.rebuilt_because}")
    model_config = json.loads((target / "config.json").read_text())
    return dg.MaterializeResult(
        metadata={
            **rounded_floats(snapshot.summary),
            "n_layer": model_config["n_layer"],
            "n_embd": model_config["n_embd"],
            "n_head": model_config["n_head"],
            "n_positions": model_config["n_positions"],
            "vocab_size": model_config["vocab_size"],
            "content_sha256": snapshot.content_sha256,
            "reused": snapshot.reused,
            "path": dg.MetadataValue.path(str(target)),
        },
        data_version=dg.DataVersion(snapshot.content_sha256),
    )


@dg.asset(
    deps=[base_model, "chat_set"],
    group_name="model",
    kinds={"pytorch", "safetensors"},
    owners=["team:ml"],
    pool="gpu",
    code_version=train.TRAINER_VERSION,
    automation_condition=training_condition(),
    # Checked inside the training step. A check step of its own would be a second `gpu`-pool step
    # claiming the slot again after training freed it: a queued training could start in between
    # and this run's check would wait for all of it.
    check_specs=[
        dg.AssetCheckSpec(
            "eval_loss_below_base",
            asset="lora_adapter",
            blocking=True,
            description="Eval loss is finite and below the untouched base model's.",
        )
    ],
    description=(
        "A LoRA adapter (PEFT; seed recipe r 16, alpha 16, dropout 0.05 on `c_attn`) trained on "
        "`chat_set` with the gigasaiga template and only-target loss, in its own process via Dagster "
        "Pipes. Resumes from the latest checkpoint if a run on the same inputs died. Reports "
        "`eval_loss` (plotted across runs) and a loss curve. Directory: `<storage>/lora_adapter/`."
    ),
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: TrainRunConfig,
    storage: StorageResource,
    trainer: TrainerResource,
):
    layout = storage.layout
    require_upstream(
        "lora_adapter",
        {"base_model": [layout.base_model / "config.json"],
         "chat_set": [layout.chat_set / "train.jsonl", layout.chat_set / "val.jsonl"]},
    )  # fmt: skip
    chats = published(layout.chat_set)  # train and val from one version of the set
    job = train.TrainJob(
        base_model_dir=published(layout.base_model),
        train_path=chats / "train.jsonl",
        val_path=chats / "val.jsonl",
        output_dir=layout.lora_adapter,
        runs_dir=layout.training_runs,
        config=settings.config_to_dataclass(config, TrainConfig),
    )
    job_path = layout.training_runs / f"job-{context.run_id}.json"
    job.write(job_path)
    try:
        result = trainer.run(context, job_path)
    finally:
        job_path.unlink(missing_ok=True)
    yield result.get_materialize_result()
    yield eval_loss_below_base(storage)


def eval_loss_below_base(storage: StorageResource) -> dg.AssetCheckResult:
    metrics = json.loads((storage.layout.lora_adapter / "metrics.json").read_text())
    eval_loss, base_loss = metrics["eval_loss"], metrics["base_eval_loss"]
    return dg.AssetCheckResult(
        passed=math.isfinite(eval_loss) and eval_loss < base_loss,
        metadata={"eval_loss": significant(eval_loss, QUALITY_DIGITS), "base_eval_loss": significant(base_loss, QUALITY_DIGITS)},
    )


@dg.asset(
    deps=[base_model, lora_adapter],
    group_name="model",
    kinds={"pytorch", "safetensors"},
    owners=["team:ml"],
    pool="cpu",
    code_version=merge.MERGE_VERSION,
    automation_condition=retrain_condition(),
    description=(
        "Base model with the adapter merged in (`W += alpha/r · (B·A)ᵀ` for GPT-2's Conv1D), streamed "
        "shard by shard so memory stays around one shard; float16 by default. "
        "Directory: `<storage>/merged_model/`."
    ),
)
def merged_model(context: dg.AssetExecutionContext, config: MergeRunConfig, storage: StorageResource) -> dg.MaterializeResult:
    layout = storage.layout
    require_upstream(
        "merged_model",
        {"base_model": [layout.base_model / "config.json"], "lora_adapter": [layout.lora_adapter / "adapter_model.safetensors"]},
    )
    merge_config = settings.config_to_dataclass(config, MergeConfig)
    report = merge.merge_lora(layout.base_model, layout.lora_adapter, layout.merged_model, dtype=merge_config.dtype)
    context.log.info(f"merged {report.tensors_merged} tensors in {report.wall_time_s:.1f} s")
    return dg.MaterializeResult(
        metadata={
            "tensors_merged": report.tensors_merged,
            "shards": report.shards,
            "dtype": report.dtype,
            "size_bytes": report.output_bytes,
            "wall_time_s": significant(report.wall_time_s, MEASURE_DIGITS),
            "peak_rss_gb": significant(report.peak_rss_gb, MEASURE_DIGITS),
            "path": dg.MetadataValue.path(str(layout.merged_model)),
        }
    )
