"""Retraining when a dataset changes, evaluated without a daemon, one code location at a time.

Each location has its own sensor, evaluated here the way the daemon does it:
- the CPU location's sensor runs in the daemon, on the workspace's asset graph (both locations)
  but requests only the CPU location's assets: `WORKSPACE` with `CPU_TARGETS` below;
- the GPU location's sensor runs in its code server, on that location's graph alone: `GPU`.
"""

import shutil
from typing import Any

import dagster as dg
import pytest

from rugpt_assets import definitions, gpu_definitions, settings
from rugpt_assets.core import sources
from rugpt_assets.core.gguf import GGUFType
from rugpt_assets.core.gguf_eval import llama_available
from rugpt_assets.core.quantize import QuantType
from rugpt_assets.defs import jobs

CPU, GPU = definitions.defs, gpu_definitions.defs
WORKSPACE = dg.Definitions(assets=[*CPU.assets, *GPU.assets], asset_checks=CPU.asset_checks, resources=CPU.resources)
CPU_TARGETS = dg.AssetSelection.assets(*CPU.resolve_asset_graph().materializable_asset_keys)
ALL_KEYS = WORKSPACE.resolve_asset_graph().materializable_asset_keys
EDITED = sources.SOURCES_BY_NAME["ru_turbo_saiga"]
LORA_CHECK = dg.AssetCheckKey(dg.AssetKey("lora_adapter"), "eval_loss_below_base")
BLOCKING_CHECKS = {  # what a run of each asset evaluates with it
    **{f"raw_{spec.name}": [dg.AssetCheckKey(dg.AssetKey(f"raw_{spec.name}"), "source_healthy")] for spec in sources.SOURCES},
    "lora_adapter": [LORA_CHECK],
    "ggml_f16": [
        dg.AssetCheckKey(dg.AssetKey("ggml_f16"), "ggml_f16_generates"),
        dg.AssetCheckKey(dg.AssetKey("ggml_f16"), "ggml_f16_matches_merged_model"),
    ],
    "gguf_f16": [
        dg.AssetCheckKey(dg.AssetKey("gguf_f16"), "gguf_f16_loads_and_tokenizes"),
        dg.AssetCheckKey(dg.AssetKey("gguf_f16"), "gguf_f16_matches_merged_model"),
    ],
}
# The GGUF assets are in the code location when llama-cpp-python is installed (CI).
GGUF = llama_available()
EXPORT = {"merged_model", "ggml_f16", *(["gguf_f16"] if GGUF else [])}


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A copy of the bundled samples that the test may edit, used as the local source mirror."""
    target = tmp_path / "sources"
    shutil.copytree(settings.BUNDLED_SAMPLES_DIR, target)
    monkeypatch.setenv("RUGPT_SOURCES_DIR", str(target))
    monkeypatch.setenv("RUGPT_MIN_RETRAIN_HOURS", "0")
    return target


class Sensors:
    """Both locations' sensors, each with its own cursor, as two daemon ticks would see them."""

    def __init__(self, instance):
        self.instance = instance
        self.cursors: dict[str, Any] = {"cpu": None, "gpu": None}

    def tick(self) -> dict[str, set[str]]:
        """What each location's sensor requests now, by location: asset names (`name[partition]`)."""
        requested = {}
        for location, defs, selection in (("cpu", WORKSPACE, CPU_TARGETS), ("gpu", GPU, None)):
            result = dg.evaluate_automation_conditions(
                defs=defs, instance=self.instance, asset_selection=selection, cursor=self.cursors[location]
            )
            self.cursors[location] = result.cursor
            requested[location] = {
                key.to_user_string() + (f"[{p}]" if p else "")
                for key in ALL_KEYS
                if result.get_num_requested(key)
                for p in (result.get_requested_partitions(key) or {None})
            }
        return requested


def observe(instance) -> None:
    job = CPU.resolve_job_def(jobs.observe_sources_job.name)
    assert job.execute_in_process(instance=instance).success


def record(instance, *names: str, checks_pass: bool = True) -> None:
    """Runless materializations (`name` or `name[partition]`), with the blocking checks a run of
    that asset evaluates: the automation logic only looks at the event log."""
    for name in names:
        key, _, partition = name.removesuffix("]").partition("[")
        instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition or None))
        for check in BLOCKING_CHECKS.get(key, []):
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(asset_key=check.asset_key, check_name=check.name, passed=checks_pass)
            )


QUANTIZED = {f"ggml_quantized[{q.name}]" for q in QuantType} | ({f"gguf_quantized[{t.name}]" for t in GGUFType} if GGUF else set())
EVERYTHING = {k.to_user_string() for k in ALL_KEYS} - {"ggml_quantized", "gguf_quantized"} | QUANTIZED


def settled(instance) -> Sensors:
    """Observed, everything materialized, and one evaluation of each sensor to set the cursors."""
    observe(instance)
    record(instance, *EVERYTHING)
    sensors = Sensors(instance)
    assert sensors.tick() == {"cpu": set(), "gpu": set()}
    return sensors


def append_a_row(mirror) -> None:
    path = EDITED.local_path(mirror)
    first = path.read_text(encoding="utf-8").splitlines(True)[0]
    path.write_text(path.read_text(encoding="utf-8") + first, encoding="utf-8")


def test_edited_source_requests_the_chain_one_location_at_a_time_then_nothing(instance, mirror):
    sensors = settled(instance)

    # Nothing changed: a new observation with the same data version requests nothing.
    observe(instance)
    assert sensors.tick() == {"cpu": set(), "gpu": set()}

    append_a_row(mirror)
    observe(instance)
    # Each stretch of one location is requested once the stretch before it was materialized
    # (recorded here); a sensor never requests another location's asset.
    chain = [
        {"cpu": {f"raw_{EDITED.name}", "chat_set"}, "gpu": set()},
        {"cpu": set(), "gpu": {"lora_adapter"}},
        {"cpu": EXPORT, "gpu": set()},
        {"cpu": QUANTIZED, "gpu": set()},
    ]
    for expected in chain:
        requested = sensors.tick()
        assert requested == expected
        record(instance, *requested["cpu"], *requested["gpu"])
    assert sensors.tick() == {"cpu": set(), "gpu": set()}


def test_unhealthy_snapshot_stops_the_chain_until_a_healthy_one(instance, mirror):
    sensors = settled(instance)
    append_a_row(mirror)
    observe(instance)
    assert sensors.tick() == {"cpu": {f"raw_{EDITED.name}", "chat_set"}, "gpu": set()}  # one run: the check gates chat_set in it

    # The snapshot landed and its blocking health check failed: nothing downstream is requested.
    record(instance, f"raw_{EDITED.name}", checks_pass=False)
    for _ in range(2):
        assert sensors.tick() == {"cpu": set(), "gpu": set()}

    # A later healthy snapshot lets chat_set (and then the rest) go.
    record(instance, f"raw_{EDITED.name}")
    assert sensors.tick() == {"cpu": {"chat_set"}, "gpu": set()}


def test_failed_eval_loss_check_stops_the_export_in_the_other_location(instance, mirror):
    sensors = settled(instance)
    append_a_row(mirror)
    observe(instance)
    record(instance, *sensors.tick()["cpu"])
    assert sensors.tick()["gpu"] == {"lora_adapter"}

    record(instance, "lora_adapter", checks_pass=False)
    assert sensors.tick() == {"cpu": set(), "gpu": set()}
    # A later training that passes its check is exported.
    record(instance, "lora_adapter")
    assert sensors.tick() == {"cpu": EXPORT, "gpu": set()}


def test_failed_f16_check_stops_the_quantizations(instance, mirror):
    sensors = settled(instance)
    record(instance, *EXPORT, checks_pass=False)
    assert sensors.tick() == {"cpu": set(), "gpu": set()}


def test_recipe_code_version_bump_requests_from_chat_set_down(instance, mirror):
    sensors = settled(instance)
    bumped = dg.Definitions(
        assets=[
            a.map_asset_specs(lambda spec: spec.replace_attributes(code_version="bumped"))
            if isinstance(a, dg.AssetsDefinition) and a.key == dg.AssetKey("chat_set")
            else a
            for a in WORKSPACE.assets
        ],
        asset_checks=WORKSPACE.asset_checks,
        resources=WORKSPACE.resources,
    )
    result = dg.evaluate_automation_conditions(defs=bumped, instance=instance, asset_selection=CPU_TARGETS, cursor=sensors.cursors["cpu"])
    assert {k.to_user_string() for k in ALL_KEYS if result.get_num_requested(k)} == {"chat_set"}
    record(instance, "chat_set")
    assert sensors.tick()["gpu"] == {"lora_adapter"}


def test_minimum_interval_holds_training_back(instance, mirror, monkeypatch):
    sensors = settled(instance)
    monkeypatch.setenv("RUGPT_MIN_RETRAIN_HOURS", "6")  # lora_adapter was materialized just now
    path = EDITED.local_path(mirror)
    path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    observe(instance)
    record(instance, *sensors.tick()["cpu"])
    assert sensors.tick() == {"cpu": set(), "gpu": set()}
