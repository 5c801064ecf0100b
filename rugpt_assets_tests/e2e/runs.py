"""The runs an instance recorded, read back through GraphQL: which launcher took each one
(`rugpt/launcher` tag) and which steps it executed, checked against the steps' pools; and the
automation sensor of each code location, which makes runs by itself."""

from __future__ import annotations

from dataclasses import dataclass

from rugpt_assets.defs.automation import cpu_automation_sensor, gpu_automation_sensor
from rugpt_assets.launchers import LAUNCHER_TAG
from rugpt_assets_tests.e2e.dagster_dev import DagsterDev
from rugpt_assets_tests.pools import GPU_POOL, STEP_POOLS

# Each code location's automation sensor, by location name (workspace.yaml).
SENSORS = {"rugpt_assets": cpu_automation_sensor.name, "rugpt_assets_gpu": gpu_automation_sensor.name}

RUNS = """
query ($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    ... on Runs {
      results {
        runId jobName status creationTime startTime endTime
        tags { key value }
        assetSelection { path }
        repositoryOrigin { repositoryLocationName }
        stepStats { stepKey status }
      }
    }
  }
}"""


@dataclass(frozen=True)
class Run:
    id: str
    job: str
    location: str | None  # None: executed in a process of its own, not from a code location
    status: str
    created: float
    started: float | None
    ended: float | None
    tags: dict[str, str]
    assets: frozenset[str]
    steps: frozenset[str]  # the steps that started (not the skipped ones)

    @property
    def launcher(self) -> str | None:
        return self.tags.get(LAUNCHER_TAG)

    @property
    def partition(self) -> str | None:
        """The partition, or range `start...end`, it materialized (backfills tag ranges)."""
        start = self.tags.get("dagster/asset_partition_range_start")
        end = self.tags.get("dagster/asset_partition_range_end")
        return self.tags.get("dagster/partition") or (start if start == end else f"{start}...{end}")

    def describe(self) -> str:
        return f"{self.job}@{self.location} {sorted(self.assets)} {self.partition or ''} on {self.launcher} {self.status}"


def runs(server: DagsterDev, created_after: float | None = None) -> list[Run]:
    """Oldest first."""
    query_filter = {"createdAfter": created_after} if created_after else {}
    results = server.graphql(RUNS, {"filter": query_filter})["runsOrError"]["results"]
    return [
        Run(
            id=r["runId"],
            job=r["jobName"],
            location=(r["repositoryOrigin"] or {}).get("repositoryLocationName"),
            status=r["status"],
            created=r["creationTime"],
            started=r["startTime"],
            ended=r["endTime"],
            tags={t["key"]: t["value"] for t in r["tags"]},
            assets=frozenset("/".join(a["path"]) for a in r["assetSelection"] or []),
            steps=frozenset(s["stepKey"] for s in r["stepStats"] if s["status"] != "SKIPPED"),
        )
        for r in reversed(results)
    ]


def assert_routed_by_pool(recorded: list[Run]) -> None:
    """Every run went through the router; a run on the GPU launcher executed `gpu`-pool steps
    only, and every other step ran in a run on the CPU launcher."""
    for run in recorded:
        pools = {STEP_POOLS[step] for step in run.steps}
        assert run.launcher in ("gpu", "cpu"), run.describe()
        if run.launcher == "gpu":
            assert run.steps and pools == {GPU_POOL}, (run.describe(), sorted(run.steps))
        else:
            assert GPU_POOL not in pools, (run.describe(), sorted(run.steps))


AUTOMATION_SENSORS = """
{
  repositoriesOrError {
    ... on RepositoryConnection { nodes { sensors { name sensorState { id selectorId } } } }
  }
}"""

STOP_SENSOR = """
mutation ($id: String!, $selectorId: String!) {
  stopSensor(id: $id, jobSelectorId: $selectorId) { __typename }
}"""


def stop_automation(server: DagsterDev) -> None:
    """Stop the automation sensor of every code location (the UI's toggle), once both locations
    have loaded: a location still loading lists no sensors. Found by name: the two sensors do not
    report the same `sensorType` (the CPU one is evaluated by the asset daemon, the GPU one in its
    code server)."""

    def all_sensors():
        nodes = server.graphql(AUTOMATION_SENSORS)["repositoriesOrError"]["nodes"]
        found = [s for repository in nodes for s in repository["sensors"] if s["name"] in SENSORS.values()]
        return found if {s["name"] for s in found} == set(SENSORS.values()) else None

    for sensor in server.wait_until(all_sensors, f"the automation sensors {sorted(SENSORS.values())}", timeout_s=300):
        state = sensor["sensorState"]
        result = server.graphql(STOP_SENSOR, {"id": state["id"], "selectorId": state["selectorId"]})
        assert result["stopSensor"]["__typename"] == "StopSensorMutationResult", result
