"""The model assets through Dagster: base_model materialized again reuses its snapshot with the
same data version (so nothing downstream turns stale), and a step whose upstream was never
materialized fails at once, naming what to materialize first."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from rugpt_assets import settings
from rugpt_assets.core import base_model as base_model_core
from rugpt_assets.core import demo_model
from rugpt_assets.core.artifacts import StorageLayout
from rugpt_assets.definitions import resources_for
from rugpt_assets.defs import export, model

RESOURCES = resources_for(settings.profile())


@dg.asset(deps=[model.base_model], code_version="1", name="lora_adapter")
def downstream_of_base_model() -> None:
    """Stands in for the real training: only its staleness matters here."""


@pytest.fixture
def demo_builds(monkeypatch) -> list[str]:
    """The demo builder replaced by one that writes in milliseconds bytes that depend on the
    builder's version (the real one pre-trains for minutes); returns the versions built."""
    built: list[str] = []

    def build(texts: list[str], out_dir: Path) -> dict:
        built.append(demo_model.DEMO_MODEL_VERSION)
        config = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 512, "vocab_size": 2048}
        (out_dir / "config.json").write_text(json.dumps(config))
        (out_dir / "model.safetensors").write_bytes(f"{demo_model.DEMO_MODEL_VERSION}:{len(texts)}".encode())
        return {"parameters": 1}

    monkeypatch.setattr(base_model_core, "_build_demo_snapshot", build)
    return built


def materialize(instance, *assets) -> dg.ExecuteInProcessResult:
    return dg.materialize(list(assets), instance=instance, resources=RESOURCES)


def base_model_record(instance):
    event = instance.get_latest_materialization_event(model.base_model.key)
    return event.asset_materialization, event.run_id


def downstream_status(instance) -> StaleStatus:
    resolver = get_stale_status_resolver(instance, [model.base_model, downstream_of_base_model])
    return resolver.get_status(downstream_of_base_model.key)


def test_base_model_again_is_reused_and_keeps_downstream_fresh(instance, demo_builds, monkeypatch):
    assert materialize(instance, model.base_model, downstream_of_base_model).success
    first, _ = base_model_record(instance)
    assert downstream_status(instance) == StaleStatus.FRESH

    result = materialize(instance, model.base_model)
    again, run_id = base_model_record(instance)
    assert demo_builds == ["1"]  # built once
    assert again.metadata["reused"].value is True and first.metadata["reused"].value is False
    assert again.tags["dagster/data_version"] == first.tags["dagster/data_version"]
    assert again.tags["dagster/data_version"] == again.metadata["content_sha256"].value
    logs = [e.user_message for e in instance.all_logs(run_id)]
    assert any(m.startswith("reused the base model snapshot") for m in logs), logs
    assert downstream_status(instance) == StaleStatus.FRESH
    assert result.success

    # A new demo recipe is a new snapshot: another data version, and downstream is stale.
    monkeypatch.setattr(demo_model, "DEMO_MODEL_VERSION", "2")
    assert materialize(instance, model.base_model).success
    newer, _ = base_model_record(instance)
    assert demo_builds == ["1", "2"] and newer.metadata["reused"].value is False
    assert newer.tags["dagster/data_version"] != first.tags["dagster/data_version"]
    assert downstream_status(instance) == StaleStatus.STALE


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    (failure,) = result.get_step_failure_events()
    error = failure.step_failure_data.error
    return "\n".join(e.message for e in (error, error.cause) if e)


@pytest.mark.parametrize(
    "asset, present, names",
    [
        (model.lora_adapter, ["base_model/config.json"], "chat_set"),
        (model.lora_adapter, ["chat_set/train.jsonl", "chat_set/val.jsonl"], "base_model"),
        (model.merged_model, ["base_model/config.json"], "lora_adapter"),
        (model.merged_model, [], "base_model and lora_adapter"),
        (export.ggml_f16, ["chat_set/val.jsonl"], "merged_model"),
    ],
    ids=[
        "lora_adapter-without-chat_set",
        "lora_adapter-without-base_model",
        "merged_model-without-lora_adapter",
        "merged_model-without-anything",
        "ggml_f16-without-merged_model",
    ],
)
def test_missing_upstream_fails_at_once_naming_what_to_materialize(instance, asset, present, names):
    layout = StorageLayout(settings.storage_root())
    for name in present:
        (layout.root / name).parent.mkdir(parents=True, exist_ok=True)
        (layout.root / name).write_text("{}")
    before = sorted(p.relative_to(layout.root).as_posix() for p in layout.root.rglob("*"))

    result = dg.materialize([asset], instance=instance, resources=RESOURCES, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    step = asset.key.to_user_string()
    assert f"MissingUpstreamError: {step} reads {names}, which" in message, message
    assert f"Materialize {names} first, then {step}." in message
    # Nothing started: no training job file, no checkpoint folder, no output.
    assert sorted(p.relative_to(layout.root).as_posix() for p in layout.root.rglob("*")) == before
