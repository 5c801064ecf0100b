"""RoutingRunLauncher on a real instance configured like the proposed root dagster.yaml."""

from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.launcher import LaunchRunContext, RunLauncher
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteRepositoryOrigin
from dagster._core.run_coordinator import SubmitRunContext
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.test_utils import create_test_daemon_workspace_context, instance_for_test
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
    QueuedRunCoordinatorDaemon,
)
from dagster._serdes import ConfigurableClass, ConfigurableClassData

from rugpt_assets.launchers import LAUNCHER_TAG, RoutingRunLauncher

LOCAL_SNIPPET = Path(__file__).resolve().parents[2] / "deploy" / "dagster.local.yaml.snippet"


class RecordingLauncher(RunLauncher, ConfigurableClass):
    """Sub-launcher that only remembers what it was asked to do."""

    def __init__(self, inst_data: ConfigurableClassData | None = None):
        super().__init__()
        self._inst_data = inst_data
        self.launched: list[dg.DagsterRun] = []
        self.terminated: list[str] = []

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
        self.terminated.append(run_id)
        return True


RECORDING = {"module": __name__, "class": "RecordingLauncher"}


@dg.asset(pool="cpu")
def chat_set() -> int:
    return 1


@dg.asset(pool="gpu")
def lora_adapter(chat_set: int) -> int:
    return chat_set + 1


ASSET_JOB = dg.Definitions(assets=[chat_set, lora_adapter]).resolve_implicit_global_asset_job_def()
# Queued runs must say where they come from; the daemon never loads this location here.
JOB_ORIGIN = RemoteRepositoryOrigin(
    RegisteredCodeLocationOrigin("rugpt_assets"), "__repository__"
).get_job_origin(ASSET_JOB.name)


def local_config(**launchers: Mapping[str, Any]) -> dict[str, Any]:
    """The proposed root dagster.yaml blocks, with the sub-launchers swapped for `launchers`."""
    config = yaml.safe_load(LOCAL_SNIPPET.read_text())
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
    return launcher.launchers[side]


@pytest.mark.parametrize(
    "assets, side",
    [(["lora_adapter"], "gpu"), (["chat_set"], "cpu"), (["chat_set", "lora_adapter"], "gpu")],
)
def test_run_goes_to_the_launcher_of_its_pools(assets, side):
    with routed_instance() as instance:
        run = create_run(instance, *assets)
        instance.launch_run(run.run_id, workspace=None)

        other = {"gpu": "cpu", "cpu": "gpu"}[side]
        assert [r.run_id for r in sub_launcher(instance, side).launched] == [run.run_id]
        assert sub_launcher(instance, other).launched == []
        # The sub-launcher already sees the tag, and so does the stored run.
        assert sub_launcher(instance, side).launched[0].tags[LAUNCHER_TAG] == side
        assert instance.get_run_by_id(run.run_id).tags[LAUNCHER_TAG] == side


def test_terminate_goes_to_the_launcher_that_started_the_run():
    with routed_instance() as instance:
        gpu_run, cpu_run = create_run(instance, "lora_adapter"), create_run(instance, "chat_set")
        for run in (gpu_run, cpu_run):
            instance.launch_run(run.run_id, workspace=None)

        assert instance.run_launcher.terminate(cpu_run.run_id) is True
        assert instance.run_launcher.terminate(gpu_run.run_id) is True
        assert instance.run_launcher.terminate("no-such-run") is False
        assert sub_launcher(instance, "gpu").terminated == [gpu_run.run_id]
        assert sub_launcher(instance, "cpu").terminated == [cpu_run.run_id]


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
            return instance.run_coordinator.submit_run(SubmitRunContext(run, workspace=None))

        def tick():
            list(daemon.run_iteration(workspace))

        yield submit, tick


def test_second_gpu_run_waits_in_the_queue_until_the_first_ends():
    with routed_instance() as instance, queue(instance) as (submit, tick):
        first, second = submit("lora_adapter"), submit("chat_set", "lora_adapter")
        tick()
        assert (status(instance, first), status(instance, second)) == (
            DagsterRunStatus.STARTING,
            DagsterRunStatus.QUEUED,
        )
        report(instance, first, DagsterEventType.RUN_START)
        tick()
        assert status(instance, first) == DagsterRunStatus.STARTED
        assert status(instance, second) == DagsterRunStatus.QUEUED

        report(instance, first, DagsterEventType.RUN_SUCCESS)
        tick()
        assert status(instance, second) == DagsterRunStatus.STARTING
        assert [r.run_id for r in sub_launcher(instance, "gpu").launched] == [
            first.run_id,
            second.run_id,
        ]


def test_cpu_runs_go_side_by_side_once_the_cpu_pool_is_raised():
    with routed_instance() as instance, queue(instance) as (submit, tick):
        runs = [submit("chat_set") for _ in range(3)]
        tick()  # a fresh instance: every pool starts at default_limit 1
        assert [status(instance, r) for r in runs].count(DagsterRunStatus.STARTING) == 1

        instance.event_log_storage.set_concurrency_slots("cpu", 3)  # the bootstrap command
        tick()
        assert all(status(instance, r) == DagsterRunStatus.STARTING for r in runs)
        assert len(sub_launcher(instance, "cpu").launched) == 3
        assert sub_launcher(instance, "gpu").launched == []
