"""Where runs go when a user starts work, on `dagster dev` with the project's dagster.yaml (both
launchers `DefaultRunLauncher`, as on one machine): "Materialize all" sent the way the UI sends
it, and the jobs launched from the launchpad and from the CLI. Every run on the GPU launcher
executes `gpu`-pool steps only; a second training waits QUEUED until the first has ended.
(The automation sensors' retrain is test_automation_daemon.py.)"""

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rugpt_assets.core.gguf import GGUFType
from rugpt_assets.core.quantize import QuantType
from rugpt_assets_tests.e2e.conftest import home_env
from rugpt_assets_tests.e2e.dagster_dev import PROJECT_ROOT, DagsterDev, dagster_dev
from rugpt_assets_tests.e2e.runs import Run, assert_routed_by_pool, runs, stop_automation

pytestmark = pytest.mark.e2e

FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
GPU_LOCATION, CPU_LOCATION = "rugpt_assets_gpu", "rugpt_assets"
PARTITIONS = {"ggml_quantized": {q.name for q in QuantType}, "gguf_quantized": {t.name for t in GGUFType}}

# What the UI loads before it decides how to launch (LaunchAssetExecutionButton).
ASSET_NODES = """{ assetNodes { assetKey { path } isObservable isExecutable repository { location { name } } } }"""
# The launchpad's "Launch run".
LAUNCH_RUN = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""
MATERIALIZED = """
query ($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset { assetMaterializations { timestamp partition } } } }"""


def env_for(home: Path) -> dict[str, str]:
    # A short training; the tests are about where runs go, not about the adapter.
    return {**home_env(home), "RUGPT_DEMO_TRAIN_STEPS": "6"}


def wait_for_run(server: DagsterDev, run_id: str, timeout_s: float = 900) -> Run:
    def finished():
        run = next((r for r in runs(server) if r.id == run_id), None)
        return run if run and run.status in FINISHED else None

    return server.wait_until(finished, f"run {run_id} to finish", timeout_s=timeout_s)


def materialized_since(server: DagsterDev, asset: str, since: float) -> set[str | None]:
    """The partitions (None: unpartitioned) of `asset` materialized after `since`."""
    events = server.graphql(MATERIALIZED, {"key": {"path": asset.split("/")}})["assetOrError"]["assetMaterializations"]
    return {e["partition"] for e in events if float(e["timestamp"]) / 1000 > since}


def test_materialize_all_runs_each_location_on_its_own_launcher(fresh_home):
    # Automation is left running; the rate limit only keeps it from adding a second training.
    env = {**env_for(fresh_home), "RUGPT_MIN_RETRAIN_HOURS": "1000"}
    started = time.time()
    with dagster_dev(fresh_home, env) as server:
        nodes = server.graphql(ASSET_NODES)["assetNodes"]
        selected = [n for n in nodes if n["isExecutable"] and not n["isObservable"]]  # as the UI filters
        assert {n["repository"]["location"]["name"] for n in selected} == {CPU_LOCATION, GPU_LOCATION}
        # What the UI's "Materialize all" sends for assets of two code locations, partitioned among
        # them: one asset backfill of every partition (LaunchAssetChoosePartitionsDialog, target pureAll).
        params = {"assetSelection": [n["assetKey"] for n in selected], "allPartitions": True, "tags": []}
        backfill_id, status = server.backfill(params, timeout_s=1500)
        assert status == "COMPLETED_SUCCESS"
        recorded = runs(server, created_after=started)

        for node in selected:
            asset = "/".join(node["assetKey"]["path"])
            expected = PARTITIONS.get(asset, {None})
            assert materialized_since(server, asset, started) == expected, asset

    backfill = [r for r in recorded if r.tags.get("dagster/backfill") == backfill_id]
    assert_routed_by_pool(recorded)
    (training,) = [r for r in backfill if r.launcher == "gpu"]
    assert (training.location, training.steps) == (GPU_LOCATION, {"lora_adapter"})
    assert {r.location for r in backfill if r.launcher == "cpu"} == {CPU_LOCATION}
    # Dependencies held across the two locations: the training ran between its inputs and the export.
    prepared = next(r for r in backfill if "chat_set" in r.assets)
    exported = next(r for r in backfill if "merged_model" in r.assets)
    assert prepared.ended <= training.created and training.ended <= exported.created


def launch_from_launchpad(server: DagsterDev, location: str, job: str) -> str:
    params = {"selector": {"repositoryLocationName": location, "repositoryName": "__repository__", "jobName": job}}
    launched = server.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def launch_from_cli(home: Path, location: str, job: str, *args: str) -> str:
    run_id = str(uuid.uuid4())
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "job",
            "launch",
            "-w",
            str(PROJECT_ROOT / "workspace.yaml"),
            "-l",
            location,
            "-j",
            job,
            "--run-id",
            run_id,
            *args,
        ],
        cwd=home,
        env=env_for(home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_id


def test_jobs_from_the_launchpad_and_the_cli_and_a_second_training_waits_queued(fresh_home):
    started = time.time()
    with dagster_dev(fresh_home, env_for(fresh_home)) as server:
        stop_automation(server)

        # Two trainings requested at once, from the launchpad.
        first, second = (launch_from_launchpad(server, GPU_LOCATION, "train") for _ in range(2))
        seen = []  # (first's status, second's status), polled until both ended

        def both_ended():
            by_id = {r.id: r for r in runs(server, created_after=started)}
            seen.append((by_id[first].status, by_id[second].status))
            return {by_id[first].status, by_id[second].status} <= FINISHED

        server.wait_until(both_ended, "both trainings to end", timeout_s=900, poll_s=1)
        assert ("STARTED", "QUEUED") in seen, seen
        by_id = {r.id: r for r in runs(server, created_after=started)}
        # The second run's process started only after the first run had ended: while queued it
        # held no run worker (on Kubernetes: no pod, no GPU).
        assert by_id[first].status == by_id[second].status == "SUCCESS"
        second_started, first_ended = by_id[second].started, by_id[first].ended
        assert second_started is not None and first_ended is not None and second_started >= first_ended

        # The CPU jobs from the command line (through the queue and the router, like the UI), in
        # dependency order.
        for job, *args in [("prepare",), ("export",), ("quantize", "--tags", '{"dagster/partition": "Q5_1"}')]:
            run = wait_for_run(server, launch_from_cli(fresh_home, CPU_LOCATION, job, *args))
            assert run.status == "SUCCESS", run.describe()
        recorded = runs(server, created_after=started)

    launched = [r for r in recorded if r.job != "observe_sources"]  # the hourly schedule may fire meanwhile
    assert sorted((r.job, r.location, r.launcher) for r in launched) == [
        ("export", CPU_LOCATION, "cpu"),
        ("prepare", CPU_LOCATION, "cpu"),
        ("quantize", CPU_LOCATION, "cpu"),
        ("train", GPU_LOCATION, "gpu"),
        ("train", GPU_LOCATION, "gpu"),
    ]
    assert_routed_by_pool(recorded)
    assert all(r.steps == {"lora_adapter"} for r in recorded if r.job == "train")
