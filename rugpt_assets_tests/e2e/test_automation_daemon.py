"""Retraining by itself: `dagster dev` observes the sources on its schedule, and the automation
sensor re-materializes `chat_set` after a source file changed, and only then."""

import json
import shutil
import time

import pytest

from rugpt_assets import settings
from rugpt_assets.core import sources
from rugpt_assets.core.artifacts import read_jsonl
from rugpt_assets.defs.automation import automation_sensor
from rugpt_assets_tests.e2e.conftest import home_env
from rugpt_assets_tests.e2e.dagster_dev import DagsterDev, dagster_dev

EDITED = sources.SOURCES_BY_NAME["ru_turbo_saiga"]
NEW_CHAT = {
    "messages": [
        {"role": "user", "content": "Как понять, что у велосипеда пора менять тормозные колодки?"},
        {
            "role": "bot",
            "content": "Посмотрите на канавки на колодке: если они почти стёрлись или толщина накладки "
            "меньше полутора миллиметров, колодки пора менять. Скрип и заметно удлинившийся ход "
            "тормозной ручки тоже говорят об износе.",
        },
    ]
}

ASSET_EVENTS = """
query ($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations { runId timestamp }
      assetObservations { runId timestamp tags { key value } }
    }
  }
}"""

RUN = """
query ($runId: ID!) {
  runOrError(runId: $runId) {
    ... on Run { status endTime tags { key value } assetSelection { path } }
  }
}"""

AUTOMATION_RUNS = """
{
  runsOrError(filter: {tags: [{key: "dagster/from_automation_condition", value: "true"}]}) {
    ... on Runs { results { runId } }
  }
}"""

REPOSITORIES = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"

SENSOR_TICKS = """
query ($sensor: SensorSelector!) {
  sensorOrError(sensorSelector: $sensor) {
    ... on Sensor { sensorState { ticks(limit: 20) { status timestamp requestedAssetMaterializationCount } } }
  }
}"""

EVALUATIONS = """
query ($key: AssetKeyInput!) {
  assetConditionEvaluationRecordsOrError(assetKey: $key, limit: 50) {
    ... on AssetConditionEvaluationRecords {
      records { numRequested runIds evaluationNodes { userLabel numTrue } }
    }
  }
}"""


def asset_events(server: DagsterDev, *path: str) -> dict:
    return server.graphql(ASSET_EVENTS, {"key": {"path": list(path)}})["assetOrError"]


def materialized_after(server: DagsterDev, asset: str, after: float) -> list[dict]:
    return [m for m in asset_events(server, asset)["assetMaterializations"] if float(m["timestamp"]) / 1000 > after]


def data_version(observation: dict) -> str:
    return {t["key"]: t["value"] for t in observation["tags"]}["dagster/data_version"]


def get_run(server: DagsterDev, run_id: str) -> dict:
    return server.graphql(RUN, {"runId": run_id})["runOrError"]


def sensor_ticks(server: DagsterDev) -> list[dict]:
    (repository,) = server.graphql(REPOSITORIES)["repositoriesOrError"]["nodes"]
    sensor = {
        "repositoryName": repository["name"],
        "repositoryLocationName": repository["location"]["name"],
        "sensorName": automation_sensor.name,
    }
    return server.graphql(SENSOR_TICKS, {"sensor": sensor})["sensorOrError"]["sensorState"]["ticks"]


@pytest.mark.e2e
def test_edited_source_rematerializes_chat_set_by_itself(fresh_home, tmp_path):
    mirror = tmp_path / "sources"
    shutil.copytree(settings.BUNDLED_SAMPLES_DIR, mirror)
    env = {
        **home_env(fresh_home),
        "RUGPT_SOURCES_DIR": str(mirror),
        "RUGPT_OBSERVE_CRON": "* * * * *",
        # lora_adapter was trained minutes ago, so retraining stays held back: the automatic run
        # is raw_ru_turbo_saiga + chat_set only, which keeps this test short.
        "RUGPT_MIN_RETRAIN_HOURS": "6",
    }
    source_key = ["hf", EDITED.name]
    started = time.time()
    with dagster_dev(fresh_home, env) as server:
        trained_version = data_version(asset_events(server, *source_key)["assetObservations"][-1])  # the oldest

        # Settled: the schedule observes the copy (same content, same data version), the run ends,
        # and a later sensor tick requests nothing.
        def scheduled_observation():
            observations = asset_events(server, *source_key)["assetObservations"]
            return next((o for o in observations if float(o["timestamp"]) / 1000 > started), None)

        observation = server.wait_until(scheduled_observation, "a scheduled observation", timeout_s=150)
        assert data_version(observation) == trained_version
        observe_run = server.wait_until(
            lambda: (run := get_run(server, observation["runId"]))["status"] == "SUCCESS" and run,
            "the observation run to succeed", timeout_s=90,
        )

        def ticks_after_observation():
            ended = observe_run["endTime"]
            return [t for t in sensor_ticks(server) if t["timestamp"] > ended and t["status"] != "STARTED"]

        quiet_ticks = server.wait_until(ticks_after_observation, "a sensor tick after the observation", timeout_s=90)
        assert [t["requestedAssetMaterializationCount"] for t in quiet_ticks] == [0] * len(quiet_ticks)
        assert server.graphql(AUTOMATION_RUNS)["runsOrError"]["results"] == []
        assert materialized_after(server, "chat_set", started) == []

        # One more chat in one source file: observed within a minute, then materialized by the sensor.
        edited_at = time.time()
        with EDITED.local_path(mirror).open("a", encoding="utf-8") as f:
            f.write(json.dumps(NEW_CHAT, ensure_ascii=False) + "\n")
        (materialization,) = server.wait_until(
            lambda: materialized_after(server, "chat_set", edited_at), "chat_set to be materialized", timeout_s=240
        )
        assert data_version(asset_events(server, *source_key)["assetObservations"][0]) != data_version(observation)

        run = get_run(server, materialization["runId"])
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert tags["dagster/from_automation_condition"] == "true"
        assert tags["dagster/sensor_name"] == automation_sensor.name
        assert {"/".join(k["path"]) for k in run["assetSelection"]} == {f"raw_{EDITED.name}", "chat_set"}

        # Why it ran, as the UI's automation tab shows it: the evaluation that requested this run,
        # true through `eager` (new parent data), not through a code version change.
        records = server.graphql(EVALUATIONS, {"key": {"path": ["chat_set"]}})
        records = records["assetConditionEvaluationRecordsOrError"]["records"]
        (requesting,) = [r for r in records if materialization["runId"] in r["runIds"]]
        assert requesting["numRequested"] == 1
        true_labels = {n["userLabel"] for n in requesting["evaluationNodes"] if n["numTrue"]}
        assert "eager" in true_labels and "code_version_changed" not in true_labels

    chats = [*read_jsonl(fresh_home / "storage/artifacts/chat_set/train.jsonl"),
             *read_jsonl(fresh_home / "storage/artifacts/chat_set/val.jsonl")]
    question = NEW_CHAT["messages"][0]["content"]
    assert any(m["content"] == question for chat in chats for m in chat["messages"])
