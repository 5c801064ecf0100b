"""A run launcher that sends GPU runs to one launcher and all other runs to another.

A run is a GPU run when every step it executes is in one of `gpu_pools` (assets declare
`pool="gpu"`), a CPU run when none is. A run that mixes the two is refused: the GPU assets live
in their own code location (`rugpt_assets.gpu_definitions`) and a run never spans two code
locations, so only a misplaced asset can make one, and running it would hold a GPU for CPU work
(docs/ARCHITECTURE.md, "Compute routing"). Locally both sides are `LocalRunLauncher`
(Dagster's `DefaultRunLauncher` that also reports dead run workers to run monitoring); on
Kubernetes both are `dagster_k8s.K8sRunLauncher`, the GPU one placing run pods per `GPU_POD`.
Configure it in dagster.yaml:

    run_launcher:
      module: rugpt_assets.launchers
      class: RoutingRunLauncher
      config:
        gpu_pools: [gpu]
        gpu: {module: rugpt_assets.launchers, class: LocalRunLauncher}
        cpu: {module: rugpt_assets.launchers, class: LocalRunLauncher}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psutil
import yaml
from dagster import DagsterInvalidConfigError, DagsterInvariantViolationError, DefaultRunLauncher, Field
from dagster._core.events import DagsterEventType
from dagster._core.instance.config import configurable_class_schema
from dagster._core.launcher import LaunchRunContext, ResumeRunContext, RunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes import ConfigurableClass, ConfigurableClassData

LAUNCHER_TAG = "rugpt/launcher"

# What a GPU pod is, in the `run_k8s_config` shape of dagster-k8s (snake_case V1PodSpec and
# V1Container fields). The GPU K8sRunLauncher in deploy/k8s carries exactly this block (a test
# keeps the two equal).
GPU_POD: Mapping[str, Any] = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
    "pod_spec_config": {
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


class MixedRunError(DagsterInvariantViolationError):
    """A run with steps both in and outside the GPU pools: the GPU side must not run it, nor the CPU side."""


def _load_launcher(side: str, spec: Mapping[str, Any]) -> RunLauncher:
    # Dagster's own errors here do not say which of the two blocks is wrong.
    where = f"run_launcher.config.{side} ({spec['module']}.{spec['class']})"
    fix = f"Fix the `{side}:` block under run_launcher in dagster.yaml."
    config = dict(spec.get("config") or {})
    data = ConfigurableClassData(spec["module"], spec["class"], yaml.dump(config))
    try:
        return data.rehydrate(as_type=RunLauncher)
    except DagsterInvalidConfigError as e:
        raise DagsterInvalidConfigError(f"{where} has invalid config. {fix}", e.errors, config) from e
    except Exception as e:
        raise DagsterInvalidConfigError(f"{where} could not be loaded: {e}\n{fix}", [], config) from e


class RoutingRunLauncher(RunLauncher, ConfigurableClass):
    def __init__(
        self,
        gpu: Mapping[str, Any],
        cpu: Mapping[str, Any],
        gpu_pools: Sequence[str] = ("gpu",),
        inst_data: ConfigurableClassData | None = None,
    ):
        super().__init__()
        self._inst_data = inst_data
        self.gpu_pools = frozenset(gpu_pools)
        self.launchers: dict[str, RunLauncher] = {
            "gpu": _load_launcher("gpu", gpu),
            "cpu": _load_launcher("cpu", cpu),
        }

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {
            "gpu_pools": Field([str], default_value=["gpu"]),
            "gpu": configurable_class_schema(),
            "cpu": configurable_class_schema(),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]) -> RoutingRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def register_instance(self, instance) -> None:
        super().register_instance(instance)
        for launcher in self.launchers.values():
            launcher.register_instance(instance)

    def side_for(self, run: DagsterRun) -> str:
        """The side a run goes to: "gpu" when every step it executes is in a GPU pool, "cpu"
        when none is. The pools come from the run's execution plan snapshot (the steps this run
        executes, nothing else); a step without a pool is not a GPU step."""
        if run.execution_plan_snapshot_id is None:
            raise ValueError(f"run {run.run_id} has no execution plan to route by")
        plan = self._instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        executed = set(plan.step_keys_to_execute)
        pools = {step.key: step.pool for step in plan.steps if step.key in executed}
        gpu_steps = sorted(key for key, pool in pools.items() if pool in self.gpu_pools)
        if not gpu_steps:
            return "cpu"
        other_steps = sorted(set(pools) - set(gpu_steps))
        if other_steps:
            raise MixedRunError(
                f"Run {run.run_id} of job {run.job_name!r} mixes GPU steps ({', '.join(gpu_steps)}) with "
                f"steps outside the pools {sorted(self.gpu_pools)} ({', '.join(other_steps)}), so neither "
                "launcher takes it. GPU assets belong in the GPU code location "
                "(rugpt_assets.gpu_definitions) and everything else outside it; a run never spans two "
                "code locations."
            )
        return "gpu"

    def _started(self, run: DagsterRun) -> RunLauncher:
        # Runs launched before this launcher was configured carry no tag: route them afresh.
        return self.launchers[run.tags.get(LAUNCHER_TAG) or self.side_for(run)]

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        self._instance.add_run_tags(run.run_id, {LAUNCHER_TAG: self.side_for(run)})
        tagged = self._instance.get_run_by_id(run.run_id)
        if tagged is None:
            raise ValueError(f"run {run.run_id} vanished from the instance while it was being launched")
        self._started(tagged).launch_run(context._replace(dagster_run=tagged))

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        return run is not None and self._started(run).terminate(run_id)

    # Run monitoring asks these once for every run, so both sides must support them.
    @property
    def supports_check_run_worker_health(self) -> bool:
        return all(x.supports_check_run_worker_health for x in self.launchers.values())

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        return self._started(run).check_run_worker_health(run)

    def get_run_worker_debug_info(self, run: DagsterRun, include_container_logs: bool | None = True) -> str | None:
        return self._started(run).get_run_worker_debug_info(run, include_container_logs)

    @property
    def supports_resume_run(self) -> bool:
        return all(x.supports_resume_run for x in self.launchers.values())

    def resume_run(self, context: ResumeRunContext) -> None:
        self._started(context.dagster_run).resume_run(context)

    def join(self, timeout: int = 30) -> None:
        for launcher in self.launchers.values():
            launcher.join(timeout)

    def dispose(self) -> None:
        for launcher in self.launchers.values():
            launcher.dispose()


def run_worker_pid(instance, run_id: str) -> tuple[int, float] | None:
    """The pid of the process that executes `run_id`'s steps, and when it said so.

    A run worker started by a code server logs "Started process for run (pid: N)", a run
    executed in process (`execute_in_process`, `dagster asset materialize`) logs "Executing
    steps in process (pid: N)": the first engine event with a pid is the run's own process.
    """
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = record.dagster_event.engine_event_data if record.dagster_event else None
        pid = data.metadata.get("pid") if data else None
        if pid is not None:
            return int(pid.value), record.timestamp
    return None


def process_alive(pid: int, seen_at: float) -> bool:
    """Whether `pid` is still the process that was running at `seen_at` (not a zombie, not a
    later process that reused the number)."""
    try:
        process = psutil.Process(pid)
        # create_time is rounded to clock ticks; one second of slack is plenty.
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= seen_at + 1
    except psutil.NoSuchProcess:
        return False


class LocalRunLauncher(DefaultRunLauncher):
    """`DefaultRunLauncher` that also tells run monitoring whether a run's process is alive.

    `DefaultRunLauncher` cannot. Its code server notices a dead child and fails the run, but
    only while that code server lives: a run whose worker died with it (`dagster dev` killed,
    the machine rebooted) or a run executed in process whose process died (a killed
    `python -m rugpt_assets.materialize`) stays STARTED forever, and the pool slots its steps
    claimed, the GPU's included, are never freed (run monitoring frees slots of finished runs
    only). Here the daemon's run monitoring sees the recorded pid gone and fails the run;
    `free_slots_after_run_end_seconds` later the slots are free.

    One machine only: the daemon must see the run workers' processes. A run without a
    recorded pid (not started by either path) is left alone.
    """

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        worker = run_worker_pid(self._instance, run.run_id)
        if worker is None or process_alive(*worker):
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"the run's process (pid {worker[0]}) is gone")

    def get_run_worker_debug_info(self, run: DagsterRun, include_container_logs: bool | None = True) -> str | None:
        worker = run_worker_pid(self._instance, run.run_id)
        return None if worker is None else f"run worker pid {worker[0]}, alive: {process_alive(*worker)}"
