"""The CPU code location: sources, chat_set, base_model, merge and export, with their checks,
jobs and automation. The GPU asset (`lora_adapter`) is the other location,
`rugpt_assets.gpu_definitions`; workspace.yaml loads both (docs/ARCHITECTURE.md says why)."""

from __future__ import annotations

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.core.gguf_eval import llama_available
from rugpt_assets.defs import checks, data, export, model
from rugpt_assets.defs.automation import cpu_automation_sensor
from rugpt_assets.defs.resources import resources_for
from rugpt_assets.defs.sources import observed_sources, raw_snapshots

# The GGUF assets need llama-cpp-python (the `gguf` extra, compiled on install); without it the
# code location is the GGML export alone.
if llama_available():
    from rugpt_assets.defs.gguf import gguf_assets, gguf_checks, gguf_quantized
else:
    gguf_assets, gguf_checks, gguf_quantized = [], [], None
gguf_f16_assets = [a for a in gguf_assets if a is not gguf_quantized]

prepare_job = dg.define_asset_job(
    "prepare",
    selection=dg.AssetSelection.assets(*raw_snapshots, data.chat_set, model.base_model),
    description="Source snapshots → chat_set, and base_model: everything training reads, in one run.",
)
export_job = dg.define_asset_job(
    "export",
    selection=dg.AssetSelection.assets(model.merged_model, export.ggml_f16, *gguf_f16_assets),
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
            selection=dg.AssetSelection.assets(gguf_quantized),
            description="One GGUF quantization type per run (pick the partition).",
        )
    ]
    if gguf_quantized
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

defs = dg.Definitions(
    assets=[
        *observed_sources,
        *raw_snapshots,
        data.chat_set,
        model.base_model,
        model.merged_model,
        export.ggml_f16,
        export.ggml_quantized,
        *gguf_assets,
    ],
    asset_checks=[*checks.export_checks, *gguf_checks],
    jobs=[prepare_job, export_job, quantize_job, *quantize_gguf_jobs, observe_sources_job],
    schedules=[observe_sources_schedule],
    sensors=[cpu_automation_sensor],
    resources=resources_for(settings.profile()),
    # One process per run, not per step: each step process imports torch and the whole code
    # location (tens of seconds on a small box), while the steps themselves are sequential
    # anyway (pool slots) or trivial. Heavy work already runs in its own process (Pipes).
    executor=dg.in_process_executor,
)
