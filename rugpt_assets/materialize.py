"""Materialize the whole graph once into the instance at `$DAGSTER_HOME`: `python -m rugpt_assets.materialize`.

Observes the sources first (so the automation sensor later sees them as already known), then
runs `train_and_export` (which includes `gguf_f16` when llama-cpp-python is installed) and
every `quantize` partition. `--gguf-quantizations` also runs every `quantize_gguf` partition
(left out by default to keep the demo's first run short). Runs are recorded in the instance,
so the UI shows them with their metadata.
"""

from __future__ import annotations

import argparse
import sys

import dagster as dg

from rugpt_assets.core.gguf import GGUFType
from rugpt_assets.core.quantize import QuantType
from rugpt_assets.definitions import defs, quantize_gguf_jobs


CPU_POOL_SLOTS = 2  # quantizations side by side; the gpu pool keeps dagster.yaml's default of 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rugpt_assets.materialize", description=__doc__.split("\n")[0])
    parser.add_argument("--gguf-quantizations", action="store_true", help="also every GGUF quantization partition")
    args = parser.parse_args(argv)
    if args.gguf_quantizations and not quantize_gguf_jobs:
        parser.error("--gguf-quantizations needs llama-cpp-python: install the project with the `gguf` extra")
    instance = dg.DagsterInstance.get()
    if "cpu" not in instance.event_log_storage.get_concurrency_keys():
        instance.event_log_storage.set_concurrency_slots("cpu", CPU_POOL_SLOTS)
    plan = [("observe_sources", None), ("train_and_export", None)] + [("quantize", q.name) for q in QuantType]
    if args.gguf_quantizations:
        plan += [("quantize_gguf", t.name) for t in GGUFType]
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
