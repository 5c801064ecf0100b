"""Materialize the whole graph once into the instance at `$DAGSTER_HOME`: `python -m rugpt_assets.materialize`.

Observes the sources first (so the automation sensors later see them as already known), then
runs the jobs of both code locations in dependency order: `prepare`, `train` (the GPU location),
`export`, and every `quantize` partition. Each job runs in this process, with no run launcher;
runs are recorded in the instance, so the UI shows them with their metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import dagster as dg

from rugpt_assets import definitions, gpu_definitions
from rugpt_assets.core.quantize import QuantType

CPU_POOL_SLOTS = 2  # quantizations side by side; the gpu pool keeps dagster.yaml's default of 1

# (code location's Definitions, job, partition)
Step = tuple[dg.Definitions, str, str | None]
TRAIN_AND_EXPORT: list[Step] = [
    (definitions.defs, "observe_sources", None),
    (definitions.defs, "prepare", None),
    (gpu_definitions.defs, "train", None),
    (definitions.defs, "export", None),
]
QUANTIZE: list[Step] = [(definitions.defs, "quantize", q.name) for q in QuantType]


def run(plan: Sequence[Step]) -> int:
    instance = dg.DagsterInstance.get()
    if "cpu" not in instance.event_log_storage.get_concurrency_keys():
        instance.event_log_storage.set_concurrency_slots("cpu", CPU_POOL_SLOTS)
    for defs, job_name, partition in plan:
        label = job_name + (f"[{partition}]" if partition else "")
        print(f"rugpt-assets: running {label} …", flush=True)
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance, partition_key=partition, raise_on_error=False
        )
        if not result.success:
            print(f"rugpt-assets: {label} failed (run {result.run_id}); see the run's logs in the UI", file=sys.stderr)
            return 1
    return 0


def main() -> int:
    status = run(TRAIN_AND_EXPORT + QUANTIZE)
    if status == 0:
        print("rugpt-assets: all assets materialized", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
