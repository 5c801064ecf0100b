"""The GPU code location: `lora_adapter` (pool `gpu`, its eval-loss check inside the step) and
nothing else, so every run of this location holds a GPU only for training. It reads
`base_model` and `chat_set` of the CPU location (`rugpt_assets.definitions`) by asset key;
`merged_model` there reads it back the same way."""

from __future__ import annotations

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.defs import jobs, model
from rugpt_assets.defs.automation import gpu_automation_sensor
from rugpt_assets.defs.resources import resources_for

defs = dg.Definitions(
    assets=[model.lora_adapter],
    jobs=[jobs.train_job],
    sensors=[gpu_automation_sensor],
    resources=resources_for(settings.profile()),
    executor=dg.in_process_executor,  # one step per run: no second process to start
)
