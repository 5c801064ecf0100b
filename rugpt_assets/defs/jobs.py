"""The jobs and the schedule of both code locations: the CPU location's `prepare`, `export`,
`quantize` (and `quantize_gguf`), `observe_sources` with its schedule, and the GPU location's
`train`. A run never spans two locations, so each job stays within one."""

from __future__ import annotations

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.defs import data, export, gguf, model
from rugpt_assets.defs.sources import observed_sources, raw_snapshots

prepare_job = dg.define_asset_job(
    "prepare",
    selection=dg.AssetSelection.assets(*raw_snapshots, data.chat_set, model.base_model),
    description="Source snapshots → chat_set, and base_model: everything training reads, in one run.",
)
export_job = dg.define_asset_job(
    "export",
    selection=dg.AssetSelection.assets(model.merged_model, export.ggml_f16, *([gguf.gguf_f16] if gguf.INSTALLED else [])),
    description="The latest lora_adapter merged into base_model → ggml_f16 (and gguf_f16), with their checks, in one run.",
)
quantize_job = dg.define_asset_job(
    "quantize",
    selection=dg.AssetSelection.assets(export.ggml_quantized),
    description="One GGML quantization type per run (pick the partition).",
)
quantize_gguf_jobs = (
    [
        dg.define_asset_job(
            "quantize_gguf",
            selection=dg.AssetSelection.assets(gguf.gguf_quantized),
            description="One GGUF quantization type per run (pick the partition).",
        )
    ]
    if gguf.INSTALLED
    else []
)
observe_sources_job = dg.define_asset_job(
    "observe_sources",
    selection=dg.AssetSelection.keys(*(s.key for s in observed_sources)),
    description="Record each source dataset's current revision (hub) or content hash (local).",
)
observe_sources_schedule = dg.ScheduleDefinition(
    job=observe_sources_job,
    cron_schedule=settings.environment().observe_cron,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Observe the seven source datasets (cron from RUGPT_OBSERVE_CRON, hourly by default).",
)
cpu_jobs = [prepare_job, export_job, quantize_job, *quantize_gguf_jobs, observe_sources_job]

train_job = dg.define_asset_job(
    "train",
    selection=dg.AssetSelection.assets(model.lora_adapter),
    description="Train the LoRA adapter on the latest chat_set and base_model (one GPU run).",
)
