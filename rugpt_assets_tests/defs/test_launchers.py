"""RoutingRunLauncher on a real instance configured like the root dagster.yaml."""

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.launcher import LaunchRunContext, RunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteRepositoryOrigin
from dagster._core.run_coordinator import SubmitRunContext
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time, instance_for_test
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.monitoring import execute_concurrency_slots_iteration, execute_run_monitoring_iteration
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
    QueuedRunCoordinatorDaemon,
)
from dagster._serdes import ConfigurableClass, ConfigurableClassData

from rugpt_assets.launchers import LAUNCHER_TAG, MixedRunError, RoutingRunLauncher, process_alive
from rugpt_assets_tests.defs.stand_ins import STAND_IN_DEFS

PROJECT_DAGSTER_YAML = Path(__file__).resolve().parents[2] / "dagster.yaml"


class RecordingLauncher(RunLauncher, ConfigurableClass):
    """Sub-launcher that only remembers what it was asked to do."""

    def __init__(self, inst_data: ConfigurableClassData | None = None):
        super().__init__()
        self._inst_data = inst_data
        self.launched: list[dg.DagsterRun] = []
        self.calls: list[tuple[str, str]] = []  # (method, run id) after launch

    @property
    def inst_data(self):
        return self._inst_data

    @classmethod
    def config_type(cls):
        return {}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data)

    def launch_run(self, context: LaunchRunContext) -> None:
        self.launched.append(context.dagster_run)

    def terminate(self, run_id: str) -> bool:
        self.calls.append(("terminate", run_id))
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        self.calls.append(("health", run.run_id))
        return CheckRunHealthResult(WorkerStatus.RUNNING)

    def get_run_worker_debug_info(self, run, include_container_logs=True) -> str:
        self.calls.append(("debug", run.run_id))
        return "recorded"


RECORDING = {"module": __name__, "class": "RecordingLauncher"}


ASSET_JOB = STAND_IN_DEFS.resolve_implicit_global_asset_job_def()
# Queued runs must say where they come from; the daemon never loads this location here.
JOB_ORIGIN = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("rugpt_assets"), "__repository__").get_job_origin(ASSET_JOB.name)


def local_config(**launchers: Mapping[str, Any]) -> dict[str, Any]:
    """The project's dagster.yaml, storage left to the test instance, sub-launchers swapped for `launchers`."""
    config = yaml.safe_load(PROJECT_DAGSTER_YAML.read_text())
    for key in ("storage", "local_artifact_storage", "compute_logs"):
        config.pop(key)
    config["run_launcher"]["config"].update(launchers)
    return config


@contextmanager
def routed_instance(**launchers):
    config = local_config(**({"gpu": RECORDING, "cpu": RECORDING} | launchers))
    with instance_for_test(overrides=config) as instance:
        yield instance


def create_run(instance: dg.DagsterInstance, *assets: str) -> dg.DagsterRun:
    keys = {dg.AssetKey(name) for name in assets}
    job = ASSET_JOB.get_subset(asset_selection=keys)
    return instance.create_run_for_job(job, asset_selection=keys, remote_job_origin=JOB_ORIGIN)


def sub_launcher(instance: dg.DagsterInstance, side: str) -> RecordingLauncher:
    launcher = instance.run_launcher
    assert isinstance(launcher, RoutingRunLauncher)
    recording = launcher.launchers[side]
    assert isinstance(recording, RecordingLauncher)
    return recording


@pytest.mark.parametrize("assets, side", [(["lora_adapter"], "gpu"), (["chat_set"], "cpu")])
def test_run_goes_to_the_launcher_of_its_pools(assets, side):
    with routed_instance() as instance:
        run = create_run(instance, *assets)
        instance.launch_run(run.run_id, workspace=None)  # pyright: ignore[reportArgumentType]  # as Dagster's own tests

        other = {"gpu": "cpu", "cpu": "gpu"}[side]
        assert [r.run_id for r in sub_launcher(instance, side).launched] == [run.run_id]
        assert sub_launcher(instance, other).launched == []
        # The sub-launcher already sees the tag, and so does the stored run.
        assert sub_launcher(instance, side).launched[0].tags[LAUNCHER_TAG] == side
        assert instance.get_run_by_id(run.run_id).tags[LAUNCHER_TAG] == side


@dg.asset(pool="gpu", name="lora_adapter")
def checked_lora_adapter() -> None: ...


@dg.asset_check(asset=checked_lora_adapter)
def check_without_pool() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


GPU_ASSET_WITH_CPU_CHECK = dg.Definitions(assets=[checked_lora_adapter], asset_checks=[check_without_pool])


@pytest.mark.parametrize(
    "job, other_step",
    [
        # A CPU asset and the GPU asset in one run (one code location holding both).
        (ASSET_JOB.get_subset(asset_selection={dg.AssetKey("chat_set"), dg.AssetKey("lora_adapter")}), "chat_set"),
        # A step without any pool is not a GPU step either: here a separate check op.
        (GPU_ASSET_WITH_CPU_CHECK.resolve_implicit_global_asset_job_def(), "lora_adapter_check_without_pool"),
    ],
)
def test_run_mixing_gpu_and_other_steps_is_refused(job, other_step):
    with routed_instance() as instance:
        run = instance.create_run_for_job(job, remote_job_origin=JOB_ORIGIN)
        with pytest.raises(MixedRunError, match=rf"GPU steps \(lora_adapter\).*\({other_step}\)"):
            instance.launch_run(run.run_id, workspace=None)  # pyright: ignore[reportArgumentType]  # as Dagster's own tests
        assert sub_launcher(instance, "gpu").launched == sub_launcher(instance, "cpu").launched == []
        assert LAUNCHER_TAG not in instance.get_run_by_id(run.run_id).tags


def test_later_calls_go_to_the_launcher_that_started_the_run():
    with routed_instance() as instance:
        gpu_run, cpu_run = create_run(instance, "lora_adapter"), create_run(instance, "chat_set")
        for run in (gpu_run, cpu_run):
            instance.launch_run(run.run_id, workspace=None)  # pyright: ignore[reportArgumentType]  # as Dagster's own tests
        # The tag decides, not the pools: a run the GPU side started stays with it.
        tagged = create_run(instance, "chat_set")
        instance.add_run_tags(tagged.run_id, {LAUNCHER_TAG: "gpu"})
        router = instance.run_launcher

        assert router.supports_check_run_worker_health
        for run in (cpu_run, gpu_run):
            run = instance.get_run_by_id(run.run_id)
            assert run is not None
            assert router.check_run_worker_health(run).status == WorkerStatus.RUNNING
            assert router.get_run_worker_debug_info(run) == "recorded"
            assert router.terminate(run.run_id) is True
        assert router.terminate(tagged.run_id) is True
        assert router.terminate("no-such-run") is False
        assert sub_launcher(instance, "cpu").calls == [
            ("health", cpu_run.run_id),
            ("debug", cpu_run.run_id),
            ("terminate", cpu_run.run_id),
        ]
        assert sub_launcher(instance, "gpu").calls == [
            ("health", gpu_run.run_id),
            ("debug", gpu_run.run_id),
            ("terminate", gpu_run.run_id),
            ("terminate", tagged.run_id),
        ]


def test_invalid_sub_launcher_config_names_the_block():
    bad = {"module": "dagster", "class": "DefaultRunLauncher", "config": {"no_such_field": 1}}
    with routed_instance(cpu=bad) as instance:
        with pytest.raises(dg.DagsterInvalidConfigError, match=r"run_launcher\.config\.cpu"):
            instance.run_launcher  # noqa: B018 - loading the launcher is the test
    missing = {"module": "no_such_module", "class": "Launcher"}
    with routed_instance(gpu=missing) as instance:
        with pytest.raises(dg.DagsterInvalidConfigError, match=r"config\.gpu.*no_such_module"):
            instance.run_launcher  # noqa: B018


def report(instance: dg.DagsterInstance, run: dg.DagsterRun, event_type: DagsterEventType):
    event = DagsterEvent(event_type_value=event_type.value, job_name=run.job_name)
    instance.report_dagster_event(event, run_id=run.run_id)


def status(instance: dg.DagsterInstance, run: dg.DagsterRun) -> DagsterRunStatus:
    return instance.get_run_by_id(run.run_id).status


@contextmanager
def queue(instance: dg.DagsterInstance):
    """`submit(*assets)` enqueues a run; `tick()` runs one pass of the dequeue daemon."""
    daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
    with create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as workspace:

        def submit(*assets: str) -> dg.DagsterRun:
            run = create_run(instance, *assets)
            context = SubmitRunContext(run, workspace=None)  # pyright: ignore[reportArgumentType]  # as Dagster's own tests
            return instance.run_coordinator.submit_run(context)

        def tick():
            list(daemon.run_iteration(workspace))

        yield submit, tick


@pytest.fixture
def no_grace_for_started_runs(monkeypatch):
    # The daemon counts a just-started run as holding its pools for 5 s; without that grace
    # only the slots its steps really claimed can block the queue.
    monkeypatch.setenv("DAGSTER_OP_CONCURRENCY_KEYS_ALLOTTED_FOR_STARTED_RUN_SECONDS", "0")


def test_second_gpu_run_stays_queued_while_the_first_trains(no_grace_for_started_runs):
    with routed_instance() as instance, queue(instance) as (submit, tick):
        storage = instance.event_log_storage
        first = submit("lora_adapter")
        tick()
        report(instance, first, DagsterEventType.RUN_START)
        # What the first run's executor does before running its GPU step.
        assert storage.claim_concurrency_slot("gpu", first.run_id, "lora_adapter").is_claimed

        second = submit("lora_adapter")
        tick()
        assert status(instance, first) == DagsterRunStatus.STARTED
        assert status(instance, second) == DagsterRunStatus.QUEUED

        storage.free_concurrency_slot_for_step(first.run_id, "lora_adapter")
        report(instance, first, DagsterEventType.RUN_SUCCESS)
        tick()
        assert status(instance, second) == DagsterRunStatus.STARTING
        launched = [r.run_id for r in sub_launcher(instance, "gpu").launched]
        assert launched == [first.run_id, second.run_id]


def test_queued_mixed_run_fails_with_the_reason_and_launches_nothing():
    with routed_instance() as instance, queue(instance) as (submit, tick):
        mixed = submit("chat_set", "lora_adapter")
        tick()
        assert status(instance, mixed) == DagsterRunStatus.FAILURE
        assert sub_launcher(instance, "gpu").launched == sub_launcher(instance, "cpu").launched == []
        errors = [
            e.dagster_event.engine_event_data.error.message
            for e in instance.all_logs(mixed.run_id, of_type=DagsterEventType.ENGINE_EVENT)
            if e.dagster_event.engine_event_data.error
        ]
        assert any("MixedRunError" in m and "mixes GPU steps (lora_adapter)" in m for m in errors), errors


def test_cpu_runs_go_side_by_side_up_to_the_cpu_pool_limit():
    with routed_instance() as instance, queue(instance) as (submit, tick):
        instance.event_log_storage.set_concurrency_slots("cpu", 2)  # the bootstrap command
        runs = [submit("chat_set") for _ in range(3)]
        tick()
        statuses = [status(instance, r) for r in runs]
        assert statuses == [DagsterRunStatus.STARTING] * 2 + [DagsterRunStatus.QUEUED]
        assert len(sub_launcher(instance, "cpu").launched) == 2
        assert sub_launcher(instance, "gpu").launched == []


@dg.asset(pool="gpu", name="lora_adapter")
def timed_lora_adapter() -> None:
    started = time.time()
    time.sleep(1.0)
    with open(os.environ["RUGPT_TEST_SPANS"], "a") as f:
        f.write(json.dumps([started, time.time()]) + "\n")


def materialize_in_fresh_process(dagster_home: str) -> None:
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        assert dg.materialize([timed_lora_adapter], instance=instance).success


def test_gpu_steps_never_overlap_on_a_fresh_instance(tmp_path, monkeypatch):
    """Two processes materialize the GPU asset at once, outside any queue, with nothing set
    up but the proposed dagster.yaml: the pool slot still serializes the two steps."""
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(local_config()))
    # Create the storage here: two processes creating the same sqlite schema at once collide.
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.event_log_storage.get_pool_limits() == []  # fresh: no pool set up
    spans_file = tmp_path / "spans.jsonl"
    monkeypatch.setenv("RUGPT_TEST_SPANS", str(spans_file))
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=materialize_in_fresh_process, args=(str(tmp_path),)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    spans = sorted(json.loads(line) for line in spans_file.read_text().splitlines())
    (_, first_end), (second_start, _) = spans
    assert second_start >= first_end


def sleeper() -> subprocess.Popen:
    """A process standing in for a run worker."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])


def start_worker(instance: dg.DagsterInstance, run: dg.DagsterRun, pid: int) -> None:
    """What a run worker started by a code server records before it executes steps."""
    instance.report_engine_event(f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid))
    report(instance, run, DagsterEventType.RUN_START)


def test_run_whose_worker_died_is_failed_by_monitoring_and_its_gpu_slot_freed():
    """The project's dagster.yaml as is (local launchers): the daemon's run monitoring fails a
    STARTED run whose worker process is gone, leaves a live one alone, and the gpu slot the dead
    run held is free `free_slots_after_run_end_seconds` after it ended, not before."""
    with (
        instance_for_test(overrides=local_config()) as instance,
        create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as workspace,
    ):
        storage, logger = instance.event_log_storage, logging.getLogger(__name__)
        dead, live = create_run(instance, "lora_adapter"), create_run(instance, "chat_set")
        dead_worker, live_worker = sleeper(), sleeper()
        try:
            start_worker(instance, dead, dead_worker.pid)
            start_worker(instance, live, live_worker.pid)
            # What the dead run's executor did before its GPU step: set up the pool, claim its slot.
            storage.initialize_concurrency_limit_to_default("gpu")
            assert storage.claim_concurrency_slot("gpu", dead.run_id, "lora_adapter").is_claimed
            dead_worker.kill()
            dead_worker.wait()

            list(execute_run_monitoring_iteration(workspace, logger))
            assert status(instance, dead) == DagsterRunStatus.FAILURE
            assert status(instance, live) == DagsterRunStatus.STARTED
            failure = instance.all_logs(dead.run_id, of_type=DagsterEventType.RUN_FAILURE)[-1]
            assert f"the run's process (pid {dead_worker.pid}) is gone" in failure.message

            list(execute_concurrency_slots_iteration(workspace, logger))
            assert storage.get_concurrency_info("gpu").active_run_ids == {dead.run_id}  # not yet
            grace = instance.run_monitoring_settings["free_slots_after_run_end_seconds"]
            with freeze_time(time.time() + grace + 1):
                list(execute_concurrency_slots_iteration(workspace, logger))
            assert storage.get_concurrency_info("gpu").active_slot_count == 0
            # The next training gets the slot.
            assert storage.claim_concurrency_slot("gpu", "next-run", "lora_adapter").is_claimed
        finally:
            live_worker.kill()
            live_worker.wait()


def test_a_reused_pid_is_not_the_run_worker():
    # This process started before `seen_at`: it is the one that was seen.
    assert process_alive(os.getpid(), seen_at=time.time())
    # A pid seen an hour before this process started belonged to another process.
    assert not process_alive(os.getpid(), seen_at=time.time() - 3600)
