"""Materialize the whole graph once into the instance at `$DAGSTER_HOME`: `python -m rugpt_assets.materialize`.

Observes the sources first (so the automation sensors later see them as already known), then
runs the jobs of both code locations in dependency order: `prepare`, `train` (the GPU location),
`export` (which includes `gguf_f16` when llama-cpp-python is installed), and every `quantize`
partition. `--gguf-quantizations` also runs every `quantize_gguf` partition (left out by default
to keep the demo's first run short). Each job runs in this process, with no run launcher; runs
are recorded in the instance, so the UI shows them with their metadata.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import dagster as dg

from rugpt_assets import definitions, gpu_definitions
from rugpt_assets.core.gguf import GGUFType
from rugpt_assets.core.quantize import QuantType
from rugpt_assets.defs import jobs

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
QUANTIZE_GGUF: list[Step] = [(definitions.defs, "quantize_gguf", t.name) for t in GGUFType]


def run(plan: Sequence[Step]) -> int:
    instance = dg.DagsterInstance.get()
    if "cpu" not in instance.event_log_storage.get_concurrency_keys():
        instance.event_log_storage.set_concurrency_slots("cpu", CPU_POOL_SLOTS)
    for defs, job_name, partition in plan:
        label = job_name + (f"[{partition}]" if partition else "")
        print(f"rugpt-assets: running {label} …", flush=True)
        result = defs.resolve_job_def(job_name).execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)
        if not result.success:
            print(f"rugpt-assets: {label} failed (run {result.run_id}); see the run's logs in the UI", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rugpt_assets.materialize", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--gguf-quantizations", action="store_true", help="also every GGUF quantization partition")
    args = parser.parse_args(argv)
    if args.gguf_quantizations and not jobs.quantize_gguf_jobs:
        parser.error("--gguf-quantizations needs llama-cpp-python: install the project with the `gguf` extra")
    status = run(TRAIN_AND_EXPORT + QUANTIZE + (QUANTIZE_GGUF if args.gguf_quantizations else []))
    if status == 0:
        print("rugpt-assets: all assets materialized", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
