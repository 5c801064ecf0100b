"""Retraining by itself: `dagster dev` observes the sources on its schedule, and after a source
file changed the two automation sensors (one per code location) re-materialize everything
downstream of it, only the training on the GPU launcher, and then nothing more."""

import json
import shutil
import time

import pytest

from rugpt_assets import settings
from rugpt_assets.core import sources
from rugpt_assets.core.artifacts import read_jsonl
from rugpt_assets.core.gguf import GGUFType
from rugpt_assets.core.quantize import QuantType
from rugpt_assets.defs import gguf
from rugpt_assets_tests.e2e.conftest import home_env
from rugpt_assets_tests.e2e.dagster_dev import DagsterDev, dagster_dev
from rugpt_assets_tests.e2e.runs import SENSORS, assert_routed_by_pool, runs

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
      assetMaterializations { runId timestamp partition }
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

# The GGUF half of the export is in the code location when llama-cpp-python is installed.
WITH_GGUF = gguf.INSTALLED
# Every partition the retrain ends with, by partitioned asset.
QUANTIZED = {"ggml_quantized": {q.name for q in QuantType}, **({"gguf_quantized": {t.name for t in GGUFType}} if WITH_GGUF else {})}
# What one appended row leads to, run by run: (assets, partition, launcher, location).
RETRAIN = [
    ({f"raw_{EDITED.name}", "chat_set"}, None, "cpu", "rugpt_assets"),
    ({"lora_adapter"}, None, "gpu", "rugpt_assets_gpu"),
    ({"merged_model", "ggml_f16", *(["gguf_f16"] if WITH_GGUF else [])}, None, "cpu", "rugpt_assets"),
    *[({asset}, partition, "cpu", "rugpt_assets") for asset, partitions in QUANTIZED.items() for partition in partitions],
]

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


def sensor_ticks(server: DagsterDev, location: str) -> list[dict]:
    sensor = {"repositoryName": "__repository__", "repositoryLocationName": location, "sensorName": SENSORS[location]}
    return server.graphql(SENSOR_TICKS, {"sensor": sensor})["sensorOrError"]["sensorState"]["ticks"]


def quiet_ticks_after(server: DagsterDev, after: float) -> None:
    """Each sensor finishes a tick after `after` (epoch s), and every such tick requested nothing."""
    for location in SENSORS:

        def finished_ticks(location: str = location):
            return [t for t in sensor_ticks(server, location) if t["timestamp"] > after and t["status"] != "STARTED"]

        ticks = server.wait_until(finished_ticks, f"a tick of {SENSORS[location]} after {after}", timeout_s=120)
        assert [t["requestedAssetMaterializationCount"] for t in ticks] == [0] * len(ticks), (location, ticks)


def automatic_runs(server: DagsterDev, after: float) -> list:
    """Runs created after `after` (epoch s), scheduled observations left out."""
    return [r for r in runs(server, created_after=after) if r.job != "observe_sources"]


@pytest.mark.e2e
def test_edited_source_retrains_and_exports_by_itself(fresh_home, tmp_path):
    mirror = tmp_path / "sources"
    shutil.copytree(settings.BUNDLED_SAMPLES_DIR, mirror)
    env = {
        **home_env(fresh_home),
        "RUGPT_SOURCES_DIR": str(mirror),
        "RUGPT_OBSERVE_CRON": "* * * * *",
        "RUGPT_MIN_RETRAIN_HOURS": "0",
        "RUGPT_DEMO_TRAIN_STEPS": "6",  # the retraining itself is not what is tested here
    }
    source_key = ["hf", EDITED.name]
    started = time.time()
    with dagster_dev(fresh_home, env) as server:
        trained_version = data_version(asset_events(server, *source_key)["assetObservations"][-1])  # the oldest

        # Settled: the schedule observes the copy (same content, same data version), the run ends,
        # and later ticks of both sensors request nothing.
        def scheduled_observation():
            observations = asset_events(server, *source_key)["assetObservations"]
            return next((o for o in observations if float(o["timestamp"]) / 1000 > started), None)

        observation = server.wait_until(scheduled_observation, "a scheduled observation", timeout_s=150)
        assert data_version(observation) == trained_version
        observe_run = server.wait_until(
            lambda: (run := get_run(server, observation["runId"]))["status"] == "SUCCESS" and run,
            "the observation run to succeed",
            timeout_s=90,
        )
        quiet_ticks_after(server, observe_run["endTime"])
        assert automatic_runs(server, started) == []

        # One more chat in one source file, nothing clicked: observed within a minute, then
        # everything downstream is materialized again, the last quantization included.
        edited_at = time.time()
        with EDITED.local_path(mirror).open("a", encoding="utf-8") as f:
            f.write(json.dumps(NEW_CHAT, ensure_ascii=False) + "\n")

        def all_quantized_again():
            return all(
                {m["partition"] for m in materialized_after(server, asset, edited_at)} == partitions
                for asset, partitions in QUANTIZED.items()
            )

        server.wait_until(all_quantized_again, f"every partition of {sorted(QUANTIZED)} to be materialized", timeout_s=1500)
        assert data_version(asset_events(server, *source_key)["assetObservations"][0]) != data_version(observation)

        retrain = automatic_runs(server, edited_at)
        assert sorted((sorted(r.assets), r.partition or "", r.launcher, r.location) for r in retrain) == sorted(
            (sorted(assets), partition or "", launcher, location) for assets, partition, launcher, location in RETRAIN
        ), [r.describe() for r in retrain]
        for run in retrain:
            assert run.status == "SUCCESS", run.describe()
            assert run.tags["dagster/from_automation_condition"] == "true"
            assert run.tags["dagster/sensor_name"] == SENSORS[run.location]
        # Each stretch started after the one it reads from had ended: one location at a time.
        (prepared,), (trained,), (exported,) = ([r for r in retrain if r.assets == a] for a, *_ in RETRAIN[:3])
        assert prepared.ended <= trained.created and trained.ended <= exported.created
        assert all(exported.ended <= r.created for r in retrain if r.partition)
        assert trained.steps == {"lora_adapter"}
        assert_routed_by_pool(runs(server, created_after=started))

        # Then nothing more: both sensors tick again after the last run ended and request nothing.
        quiet_ticks_after(server, max(r.ended for r in retrain))
        assert [r.id for r in automatic_runs(server, edited_at)] == [r.id for r in retrain]

        # Why chat_set ran, as the UI's automation tab shows it: the evaluation that requested its
        # run, true through `eager` (new parent data), not through a code version change.
        records = server.graphql(EVALUATIONS, {"key": {"path": ["chat_set"]}})
        records = records["assetConditionEvaluationRecordsOrError"]["records"]
        (requesting,) = [r for r in records if prepared.id in r["runIds"]]
        assert requesting["numRequested"] == 1
        true_labels = {n["userLabel"] for n in requesting["evaluationNodes"] if n["numTrue"]}
        assert "eager" in true_labels and "code_version_changed" not in true_labels

    chats = [
        *read_jsonl(fresh_home / "storage/artifacts/chat_set/train.jsonl"),
        *read_jsonl(fresh_home / "storage/artifacts/chat_set/val.jsonl"),
    ]
    question = NEW_CHAT["messages"][0]["content"]
    assert any(m["content"] == question for chat in chats for m in chat["messages"])
    metrics = json.loads((fresh_home / "storage/artifacts/lora_adapter/metrics.json").read_text())
    assert metrics["steps"] == 6  # the adapter on disk is the retrained one
