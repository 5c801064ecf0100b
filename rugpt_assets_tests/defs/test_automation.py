"""Retraining when a dataset changes, evaluated without a daemon."""

import shutil

import dagster as dg
import pytest

from rugpt_assets import settings
from rugpt_assets.core import sources
from rugpt_assets.core.gguf import GGUFType
from rugpt_assets.core.gguf_eval import llama_available
from rugpt_assets.core.quantize import QuantType
from rugpt_assets.definitions import defs, observe_sources_job

# The GGUF assets are in the code location when llama-cpp-python is installed (CI).
CHAIN = ["chat_set", "lora_adapter", "merged_model", "ggml_f16", *(["gguf_f16"] if llama_available() else [])]
# Partitioned exports and their partition keys.
PARTITIONS = {
    "ggml_quantized": {q.name for q in QuantType},
    **({"gguf_quantized": {t.name for t in GGUFType}} if llama_available() else {}),
}
EDITED = sources.SOURCES_BY_NAME["ru_turbo_saiga"]


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A copy of the bundled samples that the test may edit, used as the local source mirror."""
    target = tmp_path / "sources"
    shutil.copytree(settings.BUNDLED_SAMPLES_DIR, target)
    monkeypatch.setenv("RUGPT_SOURCES_DIR", str(target))
    monkeypatch.setenv("RUGPT_MIN_RETRAIN_HOURS", "0")
    return target


def observe(instance) -> None:
    assert defs.resolve_job_def(observe_sources_job.name).execute_in_process(instance=instance).success


def record_everything_materialized(instance) -> None:
    """Runless materializations: the automation logic only looks at the event log."""
    for key in defs.resolve_asset_graph().materializable_asset_keys:
        for partition in sorted(PARTITIONS.get(key.to_user_string(), [None]), key=str):
            instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))


def requested(result) -> set[str]:
    return {
        key.to_user_string() for key in defs.resolve_asset_graph().materializable_asset_keys
        if result.get_num_requested(key) > 0
    }


def settled(instance, monkeypatch):
    """Observed, everything materialized, and one evaluation to set the cursor."""
    observe(instance)
    record_everything_materialized(instance)
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert result.total_requested == 0
    return result.cursor


def test_edited_source_requests_the_chain_then_nothing(instance, mirror, monkeypatch):
    cursor = settled(instance, monkeypatch)

    # Nothing changed: a new observation with the same data version requests nothing.
    observe(instance)
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    assert result.total_requested == 0

    path = EDITED.local_path(mirror)
    path.write_text(path.read_text(encoding="utf-8") + path.read_text(encoding="utf-8").splitlines(True)[0], encoding="utf-8")
    observe(instance)
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    # One tick requests the unpartitioned chain as one run, in dependency order ...
    assert requested(result) == {f"raw_{EDITED.name}", *CHAIN}

    # ... and once it ran (recorded here), every quantization partition follows.
    for key in [f"raw_{EDITED.name}", *CHAIN]:
        instance.report_runless_asset_event(dg.AssetMaterialization(key))
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert requested(result) == set(PARTITIONS)
    for name, keys in PARTITIONS.items():
        assert result.get_requested_partitions(dg.AssetKey(name)) == keys

    # Then nothing more.
    for name, keys in PARTITIONS.items():
        for key in keys:
            instance.report_runless_asset_event(dg.AssetMaterialization(name, partition=key))
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert result.total_requested == 0


def test_recipe_code_version_bump_requests_from_chat_set_down(instance, mirror, monkeypatch):
    cursor = settled(instance, monkeypatch)
    bumped = dg.Definitions.merge(
        dg.Definitions(
            assets=[
                a.map_asset_specs(lambda spec: spec.replace_attributes(code_version="bumped"))
                if a.key == dg.AssetKey("chat_set") else a
                for a in defs.assets
            ],
            asset_checks=defs.asset_checks, jobs=defs.jobs, resources=defs.resources,
        )
    )
    result = dg.evaluate_automation_conditions(defs=bumped, instance=instance, cursor=cursor)
    assert requested(result) == set(CHAIN)


def test_minimum_interval_holds_training_back(instance, mirror, monkeypatch):
    cursor = settled(instance, monkeypatch)
    monkeypatch.setenv("RUGPT_MIN_RETRAIN_HOURS", "6")  # lora_adapter was materialized just now
    path = EDITED.local_path(mirror)
    path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    observe(instance)
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    assert requested(result) == {f"raw_{EDITED.name}", "chat_set"}
