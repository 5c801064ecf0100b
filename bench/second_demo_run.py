"""What a second `python3 tasks.py demo` costs against the first.

Runs the demo's materialization (`python -m rugpt_assets.materialize`, what `tasks.py demo` runs
before serving the UI) twice into one fresh DAGSTER_HOME, as `tasks.py` does (the home is the
working directory, the project's dagster.yaml in it), and times each whole invocation. Then
reads the instance: per pass of the whole-graph jobs (`prepare`, `train`, `export`), each
step's duration, and what `base_model` logged (built or reused).

    python bench/second_demo_run.py                         # a temporary home, removed afterwards
    python bench/second_demo_run.py --home /tmp/demo-home   # keep the home (must not exist yet)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHOLE_GRAPH_JOBS = ("prepare", "train", "export")


def materialize(home: Path) -> float:
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("RUGPT_STORAGE_DIR", None)  # artifacts under the home, as with tasks.py
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rugpt_assets.materialize"], cwd=home, env=env, check=True)
    return time.perf_counter() - started


def step_seconds(instance, run_id: str) -> dict[str, float]:
    from dagster._core.events import DagsterEventType

    starts, seconds = {}, {}
    for record in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}):
        if record.dagster_event.event_type == DagsterEventType.STEP_START:
            starts[record.step_key] = record.timestamp
        else:
            seconds[record.step_key] = record.timestamp - starts[record.step_key]
    return seconds


def report(home: Path, wall: list[float]) -> dict:
    import dagster as dg
    from dagster._core.storage.dagster_run import RunsFilter

    with contextlib.chdir(home), dg.DagsterInstance.from_config(str(home)) as instance:
        result = {"materialize_wall_s": wall, "whole_graph": []}
        # Each materialize runs the whole-graph jobs once, in order: pair the i-th run of each.
        runs = {job: instance.get_runs(filters=RunsFilter(job_name=job))[::-1] for job in WHOLE_GRAPH_JOBS}  # oldest first
        for attempt in zip(*runs.values(), strict=True):
            step_s, base_model_log = {}, []
            for run in attempt:
                step_s |= step_seconds(instance, run.run_id)
                messages = [e.user_message for e in instance.all_logs(run.run_id) if e.step_key == "base_model"]
                base_model_log += [m for m in messages if m.startswith(("reused the base model", "built the base model"))]
            result["whole_graph"].append({"run_ids": [r.run_id for r in attempt], "step_s": step_s, "base_model_log": base_model_log})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="DAGSTER_HOME to create and keep (default: a temporary one)")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="second-demo-run-"))
    home.mkdir(parents=True, exist_ok=args.home is None)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    try:
        wall = [materialize(home), materialize(home)]
        result = report(home, wall)
    finally:
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    first, second = result["whole_graph"]
    print("\n| | first run | second run |\n|---|---|---|")
    print(f"| whole materialize (s) | {wall[0]:.0f} | {wall[1]:.0f} |")
    for step in first["step_s"]:
        if step in ("base_model", "lora_adapter", "merged_model", "ggml_f16", "chat_set"):
            print(f"| {step} step (s) | {first['step_s'][step]:.1f} | {second['step_s'].get(step, float('nan')):.1f} |")


if __name__ == "__main__":
    main()
