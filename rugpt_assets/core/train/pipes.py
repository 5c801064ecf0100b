"""The one place in core that talks to Dagster Pipes: progress as Dagster log lines and the
result as the asset's materialization metadata, from rank 0 of a trainer that Pipes launched.
dagster_pipes recognises its own launch, and is not needed where the trainer runs without
Dagster (the GPU images)."""

from __future__ import annotations

import base64
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rugpt_assets.core.figures import MEASURE_DIGITS, QUALITY_DIGITS, significant
from rugpt_assets.core.train.reporting import Reporter
from rugpt_assets.core.train.runtime import Runtime

FLOAT_METRICS = {
    "eval_loss": QUALITY_DIGITS,
    "base_eval_loss": QUALITY_DIGITS,
    "train_loss": QUALITY_DIGITS,
    "wall_time_s": MEASURE_DIGITS,
    "peak_memory_gb": MEASURE_DIGITS,
}
INT_METRICS = ("steps", "tokens_seen", "resumed_from_step")


class PipesReporter:
    """Progress as Dagster log lines, the result as the asset's materialization metadata."""

    def __init__(self, context: Any):  # dagster_pipes.PipesContext
        self.context = context

    def log(self, message: str) -> None:
        self.context.log.info(message)

    def report(self, metrics: dict[str, Any], loss_curve_png: bytes, adapter_dir: Path) -> None:
        image = base64.b64encode(loss_curve_png).decode()
        metadata = {key: {"raw_value": significant(metrics[key], digits), "type": "float"} for key, digits in FLOAT_METRICS.items()}
        metadata |= {key: {"raw_value": metrics[key], "type": "int"} for key in INT_METRICS}
        metadata["tokens_per_second"] = {"raw_value": round(metrics["tokens_per_second"]), "type": "int"}
        metadata["lora_config"] = {"raw_value": metrics["lora_config"], "type": "json"}
        metadata["loss_curve"] = {"raw_value": f"![loss](data:image/png;base64,{image})", "type": "md"}
        metadata["path"] = {"raw_value": str(adapter_dir), "type": "path"}
        self.context.report_asset_materialization(metadata=metadata)


@contextmanager
def dagster_pipes_reporter(rt: Runtime) -> Iterator[Reporter | None]:
    """On rank 0 of a process that Dagster Pipes launched, a `PipesReporter` on the open Pipes
    connection (the other ranks stay quiet); otherwise None. dagster_pipes itself recognises its
    launch, and is not needed where the trainer runs without Dagster."""
    if not rt.is_main or importlib.util.find_spec("dagster_pipes") is None:
        yield None
        return
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        yield None
        return
    with open_dagster_pipes() as context:
        yield PipesReporter(context)
