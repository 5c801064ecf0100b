"""A training killed mid-run, met the ways a user meets it: `dagster dev` runs the instance, a run
of `lora_adapter` is launched through GraphQL (what the UI's Materialize sends), the daemon hands
it to the run launcher and a run worker process trains through Pipes. Once a checkpoint is saved,
the run worker and the trainer are SIGKILLed, and the rest of `dagster dev` with them (a crash
the code server cannot report). Started again, the daemon's run monitoring fails the dead run and
frees its `gpu` slot, so the next training starts. Then `lora_adapter` is materialized again as
a new run, by "re-execute from failure", and by the whole-graph jobs (prepare, train, export)
launched from scratch, each from the state the kill left (the checkpoint folder is put back as
it was between them): each resumes from the checkpoint, continues the loss history, and ends
with the LoRA weights of an uninterrupted training.

The automation sensors are stopped here: only the runs the test launches run.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
import psutil
import pytest
import torch
from dagster._core.events import DagsterEventType
from safetensors.torch import load_file

from rugpt_assets import settings
from rugpt_assets.core import train
from rugpt_assets.core.artifacts import StorageLayout
from rugpt_assets.launchers import run_worker_pid
from rugpt_assets_tests.e2e.conftest import home_env
from rugpt_assets_tests.e2e.dagster_dev import DagsterDev, dagster_dev
from rugpt_assets_tests.e2e.runs import stop_automation

# What the test launches, by name. The code location holding each is looked up. The whole graph
# is three jobs in two code locations (a run never spans two), launched one after the other.
TRAINED_ASSET = "lora_adapter"
PREPARE_JOB, TRAIN_JOB, EXPORT_JOB = "prepare", "train", "export"

# The demo profile's training, shorter, with a checkpoint every 4 steps.
TRAIN_OVERRIDES = {"max_steps": 16, "save_steps": 4, "eval_steps": 8}
TRAIN_CONFIG = replace(settings.profile().train, **TRAIN_OVERRIDES)
RUN_CONFIG = {"ops": {TRAINED_ASSET: {"config": TRAIN_OVERRIDES}}}
# `dagster dev` loads both code locations; on a busy 2-core box that took over 2 minutes.
STARTUP_S = 300

REPOSITORIES = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } jobs { name } } } } }"

ASSET_REPOSITORY = """
query ($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode { repository { name location { name } } } }
}"""

# What a launch mutation answers, whichever one it is.
LAUNCHED = """
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
"""
LAUNCH_RUN = f"mutation ($params: ExecutionParams!) {{ launchRun(executionParams: $params) {{ {LAUNCHED} }} }}"
REEXECUTE = f"mutation ($params: ReexecutionParams!) {{ launchRunReexecution(reexecutionParams: $params) {{ {LAUNCHED} }} }}"


def asset_job_selector(server: DagsterDev, asset: str) -> dict:
    """What the UI's Materialize button sends for one asset, in whichever location holds it."""
    node = server.graphql(ASSET_REPOSITORY, {"key": {"path": [asset]}})["assetNodeOrError"]
    repository = node["repository"]
    return {
        "repositoryLocationName": repository["location"]["name"],
        "repositoryName": repository["name"],
        "jobName": "__ASSET_JOB",
        "assetSelection": [{"path": [asset]}],
    }


def job_selector(server: DagsterDev, job: str) -> dict:
    nodes = server.graphql(REPOSITORIES)["repositoriesOrError"]["nodes"]
    (repository,) = [n for n in nodes if job in {j["name"] for j in n["jobs"]}]
    return {"repositoryLocationName": repository["location"]["name"], "repositoryName": repository["name"], "jobName": job}


def launched_run_id(result: dict) -> str:
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def launch(server: DagsterDev, selector: dict, run_config: dict = RUN_CONFIG) -> str:
    params = {"selector": selector, "runConfigData": run_config}
    return launched_run_id(server.graphql(LAUNCH_RUN, {"params": params})["launchRun"])


def reexecute_from_failure(server: DagsterDev, run_id: str) -> str:
    params = {"parentRunId": run_id, "strategy": "FROM_FAILURE"}
    return launched_run_id(server.graphql(REEXECUTE, {"params": params})["launchRunReexecution"])


@pytest.fixture(scope="module")
def home(trained_home, tmp_path_factory) -> Path:
    """A private copy of the materialized home, shared by this module's tests."""
    home = tmp_path_factory.mktemp("resume") / "home"
    shutil.copytree(trained_home, home)
    return home


@pytest.fixture(scope="module")
def layout(home) -> StorageLayout:
    return StorageLayout(home / "storage" / "artifacts")


def job_of(layout: StorageLayout, out: Path | None = None) -> train.TrainJob:
    """The training `lora_adapter` runs with RUN_CONFIG (or the same inputs writing under `out`)."""
    return train.TrainJob(
        base_model_dir=layout.base_model,
        train_path=layout.chat_set / "train.jsonl",
        val_path=layout.chat_set / "val.jsonl",
        output_dir=out / "adapter" if out else layout.lora_adapter,
        runs_dir=out / "runs" if out else layout.training_runs,
        config=TRAIN_CONFIG,
    )


@pytest.fixture(scope="module")
def reference(home, layout, tmp_path_factory) -> dict:
    """The same training uninterrupted, by the trainer's CLI: its metrics and adapter tensors."""
    out = tmp_path_factory.mktemp("uninterrupted")
    job = job_of(layout, out)
    job.write(out / "job.json")
    result = subprocess.run(
        [sys.executable, "-m", "rugpt_assets.core.train", "--config", str(out / "job.json")],
        env=home_env(home),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((job.output_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == TRAIN_OVERRIDES["max_steps"]
    return {"metrics": metrics, "tensors": load_file(job.output_dir / "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def instance(home) -> Iterator[dg.DagsterInstance]:
    """The instance `dagster dev` serves, opened here to read runs and events."""
    with contextlib.chdir(home), dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


@pytest.fixture(scope="module")
def run_dir(layout) -> Path:
    """This training's checkpoint folder."""
    return layout.training_runs / train.run_key(job_of(layout), world_size=1)[:16]


def wait_for_status(server, instance, run_id: str, statuses: set[str], timeout_s: float) -> str:
    def status():
        current = instance.get_run_by_id(run_id).status.value
        return current in statuses and current

    return server.wait_until(status, f"run {run_id} to reach {sorted(statuses)}", timeout_s=timeout_s, poll_s=1)


def crash_mid_training(server, instance, run_id: str, run_dir: Path) -> tuple[int, int]:
    """Once the training saved a checkpoint, SIGKILL the whole `dagster dev` in one signal to its
    process group (so its code server cannot report the run worker's death), then make sure the
    run worker and the trainer it started are gone. Returns the worker's pid and the step of
    the latest checkpoint left behind."""
    server.wait_until(lambda: (run_dir / "checkpoint").exists(), "a checkpoint", timeout_s=900, poll_s=0.2)
    worker_pid = run_worker_pid(instance, run_id)
    assert worker_pid is not None, f"run {run_id} has no worker"
    pid, _ = worker_pid
    worker = psutil.Process(pid)
    trainers = [p for p in worker.children(recursive=True) if "rugpt_assets.core.train" in p.cmdline()]
    assert trainers, f"no trainer process under run worker {pid}"
    server.crash()
    for process in [worker, *trainers]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs([worker, *trainers], timeout=30)
    assert not alive
    step = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
    assert 0 < step < TRAIN_OVERRIDES["max_steps"], "killed after the training ended: make it longer"
    return pid, step


@dataclass(frozen=True)
class Killed:
    run_id: str
    worker_pid: int
    step: int  # of the latest checkpoint
    checkpoints: Path  # a copy of the checkpoint folder right after the kill


@pytest.fixture(scope="module")
def killed(home, instance, layout, run_dir, tmp_path_factory) -> Killed:
    """A run of lora_adapter, launched as the UI's Materialize does, killed after a checkpoint
    together with the `dagster dev` serving it: the daemon of the next `dagster dev` has to find
    the dead run."""
    shutil.rmtree(run_dir, ignore_errors=True)  # the training starts at step 0
    published = adapter_bytes(layout)
    with dagster_dev(home, home_env(home), timeout_s=STARTUP_S) as first:
        stop_automation(first)  # stays stopped: the state is in the instance
        run_id = launch(first, asset_job_selector(first, TRAINED_ASSET))
        worker_pid, step = crash_mid_training(first, instance, run_id, run_dir)
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED  # as the crash left it
    assert adapter_bytes(layout) == published  # the killed run published nothing
    copy = tmp_path_factory.mktemp("after_kill") / "checkpoints"
    shutil.copytree(run_dir, copy, symlinks=True)  # the published links as they are
    return Killed(run_id, worker_pid, step, copy)


@pytest.fixture(scope="module")
def server(home, killed) -> Iterator[DagsterDev]:
    """`dagster dev` started again after the crash."""
    with dagster_dev(home, home_env(home), timeout_s=STARTUP_S) as server:
        yield server


@pytest.fixture
def after_kill(killed, run_dir) -> Killed:
    """The checkpoint folder as the kill left it: each test meets the same state."""
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(killed.checkpoints, run_dir, symlinks=True)
    return killed


def trained_steps(messages: list[str]) -> list[int]:
    """The optimizer steps a run's trainer logged ("step 7/24 loss ...")."""
    return [int(m.group(1)) for text in messages if (m := re.match(r"step (\d+)/\d+ loss", text))]


def assert_resumed(instance, layout: StorageLayout, run_id: str, from_step: int, reference: dict) -> None:
    records = instance.fetch_materializations(dg.AssetKey(TRAINED_ASSET), limit=50).records
    (record,) = [r for r in records if r.run_id == run_id]
    metadata = record.asset_materialization.metadata
    assert metadata["resumed_from_step"].value == from_step > 0
    assert metadata["steps"].value == TRAIN_OVERRIDES["max_steps"]

    messages = [e.user_message for e in instance.all_logs(run_id)]
    assert any(m.startswith("resuming from") and m.endswith(f"(step {from_step})") for m in messages)
    assert trained_steps(messages) == list(range(from_step + 1, TRAIN_OVERRIDES["max_steps"] + 1))

    # This run wrote the adapter; its loss history continues the killed run's and ends as the
    # uninterrupted one's.
    assert (layout.lora_adapter / "metrics.json").stat().st_mtime >= instance.get_run_record_by_id(run_id).start_time
    metrics = json.loads((layout.lora_adapter / "metrics.json").read_text())
    assert metrics["loss_history"] == pytest.approx(reference["metrics"]["loss_history"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(reference["metrics"]["eval_loss"], rel=1e-5)
    tensors = load_file(layout.lora_adapter / "adapter_model.safetensors")
    assert tensors.keys() == reference["tensors"].keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, reference["tensors"][name], rtol=1e-4, atol=1e-6)


def data_version(instance, asset: str) -> str:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return event.asset_materialization.tags["dagster/data_version"]


def adapter_bytes(layout: StorageLayout) -> bytes:
    return (layout.lora_adapter / "adapter_model.safetensors").read_bytes()


def wait_for_end(server, instance, run_id: str, extra_s: float = 0) -> str:
    """A launched run's end: it may first wait for the killed run's gpu slot to be freed."""
    grace = instance.run_monitoring_settings["free_slots_after_run_end_seconds"]
    return wait_for_status(server, instance, run_id, {"SUCCESS", "FAILURE", "CANCELED"}, timeout_s=grace + 600 + extra_s)


@pytest.mark.e2e
def test_run_monitoring_fails_the_dead_run_and_frees_its_gpu_slot(server, instance, killed):
    settings = instance.run_monitoring_settings
    grace, poll = settings["free_slots_after_run_end_seconds"], settings["poll_interval_seconds"]
    assert wait_for_status(server, instance, killed.run_id, {"FAILURE"}, timeout_s=2 * poll + 30) == "FAILURE"
    failure = instance.all_logs(killed.run_id, of_type=DagsterEventType.RUN_FAILURE)[-1]
    assert f"the run's process (pid {killed.worker_pid}) is gone" in failure.message  # the daemon found it
    ended = instance.get_run_record_by_id(killed.run_id).end_time

    def gpu_holders():
        return instance.event_log_storage.get_concurrency_info("gpu").active_run_ids

    if time.time() < ended + grace:
        assert gpu_holders() == {killed.run_id}  # the dead run's step never released its slot
    server.wait_until(lambda: not gpu_holders(), "the gpu slot to be freed", timeout_s=grace + 2 * poll + 30)
    assert time.time() >= ended + grace


@pytest.mark.e2e
def test_new_run_resumes(server, instance, layout, after_kill, reference):
    again = launch(server, asset_job_selector(server, TRAINED_ASSET))  # Materialize, clicked again
    assert wait_for_end(server, instance, again) == "SUCCESS"
    assert_resumed(instance, layout, again, after_kill.step, reference)
    assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 0


@pytest.mark.e2e
def test_reexecution_from_failure_resumes(server, instance, layout, after_kill, reference):
    retry = reexecute_from_failure(server, after_kill.run_id)
    assert wait_for_end(server, instance, retry) == "SUCCESS"
    assert instance.get_run_by_id(retry).parent_run_id == after_kill.run_id
    assert_resumed(instance, layout, retry, after_kill.step, reference)


@pytest.mark.e2e
def test_whole_graph_jobs_from_scratch_resume_and_reuse_the_base_model(server, instance, layout, after_kill, reference):
    base_model_version = data_version(instance, "base_model")
    prepare = launch(server, job_selector(server, PREPARE_JOB), run_config={})
    assert wait_for_end(server, instance, prepare, extra_s=300) == "SUCCESS"
    # base_model was verified and reused: same data version, nothing rebuilt.
    messages = [e.user_message for e in instance.all_logs(prepare)]
    assert any(m.startswith("reused the base model snapshot") for m in messages)
    assert data_version(instance, "base_model") == base_model_version

    again = launch(server, job_selector(server, TRAIN_JOB))
    assert wait_for_end(server, instance, again) == "SUCCESS"
    assert_resumed(instance, layout, again, after_kill.step, reference)

    # And the rest of the graph followed from the resumed adapter.
    export = launch(server, job_selector(server, EXPORT_JOB), run_config={})
    assert wait_for_end(server, instance, export, extra_s=600) == "SUCCESS"
    assert instance.get_latest_materialization_event(dg.AssetKey("ggml_f16")).run_id == export
