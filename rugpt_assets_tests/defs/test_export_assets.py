"""ggml_f16 and ggml_quantized through Dagster on the demo model: one evaluation set (the
adapter's system prompt, chat_set's validation chats) pinned by hash in every file's metadata,
and a partition that refuses a stale f16 evaluation before quantizing."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest
from transformers import AutoTokenizer

from rugpt_assets import settings
from rugpt_assets.core import evaluate
from rugpt_assets.core.artifacts import StorageLayout, read_jsonl, write_jsonl
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, TRAIN_CONFIG_FILE
from rugpt_assets.core.scoring import build_eval_set
from rugpt_assets.definitions import defs
from rugpt_assets_tests.core.test_ggml import demo_export

TRAINED_PROMPT = "Ты — тестовый ассистент. Отвечай кратко."


@pytest.fixture
def layout(instance, tmp_path_factory) -> StorageLayout:
    """Storage as training leaves it: a merged model, the adapter's saved TrainConfig, chat_set."""
    export = demo_export(tmp_path_factory)
    layout = StorageLayout(settings.storage_root())
    shutil.copytree(export.model_dir, layout.merged_model)
    layout.lora_adapter.mkdir(parents=True)
    (layout.lora_adapter / TRAIN_CONFIG_FILE).write_text(json.dumps({"system_prompt": TRAINED_PROMPT}))
    layout.chat_set.mkdir(parents=True)
    write_jsonl(layout.chat_set / "val.jsonl", export.val_chats)
    return layout


def materialize(instance, asset: str, partition: str | None = None) -> dg.ExecuteInProcessResult:
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(asset)})
    return job.execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)


def latest(instance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_ggml_f16_depends_on_chat_set():
    assert dg.AssetKey("chat_set") in defs.resolve_asset_graph().get(dg.AssetKey("ggml_f16")).parent_keys


def test_one_pinned_evaluation_set_and_a_stale_f16_refused(instance, layout):
    export = settings.profile().export
    tokenizer = AutoTokenizer.from_pretrained(layout.merged_model)
    val = list(read_jsonl(layout.chat_set / "val.jsonl"))
    expected = build_eval_set(val, tokenizer, export.eval_max_tokens, TRAINED_PROMPT, export.eval_chats)
    default = build_eval_set(val, tokenizer, export.eval_max_tokens, DEFAULT_SYSTEM_PROMPT, export.eval_chats)
    assert expected.sha256 != default.sha256

    run = materialize(instance, "ggml_f16")
    assert run.success
    # the blocking checks ran on the adapter's prompt too: llm-rs greedy equals the merged model
    assert {e.check_name: e.passed for e in run.get_asset_check_evaluations()} == {
        "ggml_f16_generates": True,
        "ggml_f16_matches_merged_model": True,
    }
    f16 = latest(instance, "ggml_f16")
    assert f16["eval_set_sha256"] == expected.sha256  # the adapter's system prompt, not the constant
    assert f16["eval_tokens"] == expected.target_tokens
    assert evaluate.reference_path(layout.ggml_f16).is_file()
    reference_mtime = evaluate.reference_path(layout.ggml_f16).stat().st_mtime_ns

    assert materialize(instance, "ggml_quantized", "Q8_0").success
    q8 = latest(instance, "ggml_quantized")
    assert q8["eval_set_sha256"] == expected.sha256 and q8["kl_to_f16"] > 0
    assert q8["perplexity_f16"] == f16["perplexity"]
    # figures as a person reads them: whole tokens/s, a few significant digits, a percentage, a path
    assert isinstance(f16["generation_tokens_per_s"], int) and f16["generation_tokens_per_s"] > 0
    assert f16["perplexity"] == float(f"{f16['perplexity']:.5g}") and q8["load_time_s"] == float(f"{q8['load_time_s']:.3g}")
    delta = evaluate.perplexity_delta(evaluate.read_evaluation(layout.ggml_quantized("Q8_0")), evaluate.read_evaluation(layout.ggml_f16))
    assert q8["perplexity_delta_pct"] == pytest.approx(100 * delta, rel=1e-2)
    event = instance.get_latest_materialization_event(dg.AssetKey("ggml_quantized"))
    assert isinstance(event.asset_materialization.metadata["path"], dg.PathMetadataValue)
    # f16's reference was used, not recomputed
    assert evaluate.reference_path(layout.ggml_f16).stat().st_mtime_ns == reference_mtime
    table = {r.data["type"]: r.data for r in q8["quantizations"].records}
    assert table["F16"]["eval_set"] == table["Q8_0"]["eval_set"] == expected.sha256[:12]

    # chat_set changes; f16 was not re-evaluated: the partition fails before quantizing
    write_jsonl(layout.chat_set / "val.jsonl", val[1:])
    result = materialize(instance, "ggml_quantized", "Q4_0")
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.to_string()
    assert "Re-materialize ggml_f16, then this partition" in message, message
    assert not layout.ggml_quantized("Q4_0").exists()

    # re-materializing f16 as told makes the partition run again, on the new set
    assert materialize(instance, "ggml_f16").success
    assert materialize(instance, "ggml_quantized", "Q4_0").success
    assert latest(instance, "ggml_quantized")["eval_set_sha256"] == latest(instance, "ggml_f16")["eval_set_sha256"] != (expected.sha256)


def test_checks_run_with_the_settings_the_asset_ran_with(instance, layout):
    """A launchpad override of the export settings reaches the file's checks, not only the asset:
    the generation check produces as many tokens as the run asked for, not the profile's number."""
    profile_tokens = settings.profile().export.check_new_tokens
    overrides = {"check_new_tokens": profile_tokens - 11, "check_prompt": "Назови три цвета."}
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey("ggml_f16")})
    run = job.execute_in_process(instance=instance, run_config={"ops": {"ggml_f16": {"config": overrides}}}, raise_on_error=False)
    assert run.success
    checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
    assert checks["ggml_f16_generates"].passed and checks["ggml_f16_matches_merged_model"].passed
    assert checks["ggml_f16_generates"].metadata["new_tokens"].value == overrides["check_new_tokens"]
    assert checks["ggml_f16_matches_merged_model"].metadata["tokens"].value == overrides["check_new_tokens"]
    recorded = evaluate.evaluated_with(layout.ggml_f16, "ggml_f16")
    assert (recorded.check_new_tokens, recorded.check_prompt) == (overrides["check_new_tokens"], overrides["check_prompt"])
