"""Materialize the whole graph once into the instance at `$DAGSTER_HOME`: `python -m rugpt_assets.materialize`.

Observes the sources first (so the automation sensor later sees them as already known), then
runs `train_and_export` and every `quantize` partition. Runs are recorded in the instance, so
the UI shows them with their metadata.
"""

from __future__ import annotations

import sys

import dagster as dg

from rugpt_assets.core.quantize import QuantType
from rugpt_assets.definitions import defs


CPU_POOL_SLOTS = 2  # quantizations side by side; the gpu pool keeps dagster.yaml's default of 1


def main() -> int:
    instance = dg.DagsterInstance.get()
    if "cpu" not in instance.event_log_storage.get_concurrency_keys():
        instance.event_log_storage.set_concurrency_slots("cpu", CPU_POOL_SLOTS)
    plan = [("observe_sources", None), ("train_and_export", None)] + [("quantize", q.name) for q in QuantType]
    for job_name, partition in plan:
        label = job_name + (f"[{partition}]" if partition else "")
        print(f"rugpt-assets: running {label} …", flush=True)
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance, partition_key=partition, raise_on_error=False
        )
        if not result.success:
            print(f"rugpt-assets: {label} failed (run {result.run_id}); see the run's logs in the UI", file=sys.stderr)
            return 1
    print("rugpt-assets: all assets materialized", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
