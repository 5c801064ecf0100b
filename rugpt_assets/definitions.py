"""The CPU code location: sources, chat_set, base_model, merge and export, with their checks,
jobs and automation. The GPU asset (`lora_adapter`) is the other location,
`rugpt_assets.gpu_definitions`; workspace.yaml loads both (docs/ARCHITECTURE.md says why)."""

from __future__ import annotations

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.defs import checks, data, export, gguf, jobs, model
from rugpt_assets.defs.automation import cpu_automation_sensor
from rugpt_assets.defs.resources import resources_for
from rugpt_assets.defs.sources import health_checks, observed_sources, raw_snapshots

defs = dg.Definitions(
    assets=[
        *observed_sources,
        *raw_snapshots,
        data.chat_set,
        model.base_model,
        model.merged_model,
        export.ggml_f16,
        export.ggml_quantized,
        *(gguf.gguf_assets if gguf.INSTALLED else []),
    ],
    asset_checks=[*health_checks, *checks.export_checks, *(gguf.gguf_checks if gguf.INSTALLED else [])],
    jobs=jobs.cpu_jobs,
    schedules=[jobs.observe_sources_schedule],
    sensors=[cpu_automation_sensor],
    resources=resources_for(settings.profile()),
    # One process per run, not per step: each step process imports torch and the whole code
    # location (tens of seconds on a small box), while the steps themselves are sequential
    # anyway (pool slots) or trivial. Heavy work already runs in its own process (Pipes).
    executor=dg.in_process_executor,
)
