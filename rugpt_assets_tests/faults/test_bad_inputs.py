"""Bad inputs, tried through the assets as a run executes them: truncated or corrupt safetensors
shards, truncated GGML files, non-UTF-8 and overlong source lines, an empty source, every
launchpad field with an invalid value, an unknown partition key. Each gets an error that says
what and where before the work starts, and nothing published changes."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._config import ConfigTypeKind, Shape

from rugpt_assets import chat, settings
from rugpt_assets.core import evaluate, ggml, sources, train
from rugpt_assets.core.artifacts import CorruptArtifactError, published
from rugpt_assets.core.quantize import QuantType, quantize_ggml
from rugpt_assets_tests.faults import harness
from rugpt_assets_tests.faults.conftest import EXPORT, SNAPSHOT, TARGETS, layout, materialize, op_config, training_job

pytestmark = pytest.mark.faults


def everything() -> dict[str, str | None]:
    """Digest of every published set, to show a failed run touched none of them."""
    sets = {name: target.final() for name, target in TARGETS.items() if name not in ("lora_checkpoint", "raw_snapshot")}
    sets |= {f"raw_{spec.name}": layout().raw_source(spec.name) for spec in sources.SOURCES}
    return {name: harness.digest(path) for name, path in sets.items()}


def step_error(key: str, partition: str | None = None, run_config: dict | None = None) -> str:
    """The error of a run of `key` that must fail (the asset's own, as the run reports it)."""
    with pytest.raises(Exception) as failure:
        materialize(key, partition, run_config)
    error = getattr(failure.value, "user_exception", failure.value)
    return f"{type(error).__name__}: {error}"


@pytest.mark.parametrize("cut", ["truncated", "corrupt_header"])
def test_broken_safetensors_shard_is_named_before_any_tensor_is_read(storage, cut):
    shard = published(layout().base_model) / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if cut == "truncated" else data[:8] + b"{not json" + data[17:])
    before = everything()
    message = step_error("merged_model")
    assert message.startswith("CorruptArtifactError") and f"{shard} ({shard.stat().st_size} bytes)" in message
    with pytest.raises(CorruptArtifactError, match=str(shard)):  # the trainer: before tokenizing anything
        train.train_lora(training_job(layout().root / "runs"))
    assert not (layout().root / "runs").exists()
    merged = published(layout().merged_model) / "model.safetensors"
    shutil.copy(shard, merged)  # the export reads the merged model
    message = step_error("ggml_f16", run_config=op_config("ggml_f16", EXPORT))
    assert message.startswith("CorruptArtifactError") and str(merged) in message
    after = everything()
    assert {k: v for k, v in after.items() if k != "merged_model"} == {k: v for k, v in before.items() if k != "merged_model"}


@pytest.mark.parametrize("keep", ["header", "vocabulary", "mid_tensor", "tensor_boundary"])
def test_truncated_ggml_file_is_named_before_quantizing_or_loading(storage, tmp_path, keep):
    f16 = published(layout().ggml_f16)
    parsed = ggml.read_ggml(f16)
    data = f16.read_bytes()
    offset = {
        "header": 12,
        "vocabulary": 40,
        "mid_tensor": len(data) // 2,
        "tensor_boundary": _end_of(parsed, list(parsed.tensors)[1]),
    }[keep]
    assert 0 < offset < len(data)
    f16.write_bytes(data[:offset])
    before = everything()
    # The asset finds the file is not the one ggml_f16 evaluated before it quantizes anything ...
    message = step_error("ggml_quantized", "Q4_0", op_config("ggml_quantized", EXPORT))
    assert f"{layout().ggml_f16} changed after ggml_f16 evaluated it: re-materialize ggml_f16" in message, message
    # ... and the quantizer itself names the cut, before llm-rs reads the file.
    with pytest.raises(ValueError, match=rf"{f16}: (truncated|not an unversioned GGML file)"):
        quantize_ggml(f16, QuantType.Q4_0, tmp_path / "model-q4_0.bin")
    assert not (tmp_path / "model-q4_0.bin").exists()
    with pytest.raises(ValueError, match=str(f16)):  # llm-rs would abort the process; this names the file
        evaluate.load_llm_rs(f16, 1)
    with pytest.raises(SystemExit, match=str(f16)):
        chat.main(["--model", str(f16)])
    assert everything() == before


def _end_of(parsed: ggml.GGMLFile, name: str) -> int:
    """Byte offset just past tensor `name`'s data: a cut that leaves whole tensors only."""
    return parsed.tensors[name].offset + parsed.tensors[name].nbytes


def mirror_with(tmp_path: Path, monkeypatch, lines: list[bytes] | None) -> Path:
    """A copy of the bundled samples with the snapshot's source file replaced by `lines`."""
    mirror = tmp_path / "sources"
    shutil.copytree(settings.BUNDLED_SAMPLES_DIR, mirror)
    monkeypatch.setenv("RUGPT_SOURCES_DIR", str(mirror))
    path = sources.SOURCES_BY_NAME[SNAPSHOT].local_path(mirror)
    if lines is not None:
        path.write_bytes(b"".join(lines))
    return path


def test_non_utf8_and_overlong_lines_fail_the_blocking_check_and_stop_chat_set(storage, tmp_path, monkeypatch):
    path = mirror_with(tmp_path, monkeypatch, None)
    good = path.read_bytes()
    overlong = b'{"messages": "' + b"x" * (sources.MAX_LINE_BYTES + 10) + b'"}\n'
    path.write_bytes(good + b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n' + overlong)
    before = everything()
    from rugpt_assets.definitions import defs

    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(f"raw_{SNAPSHOT}"), dg.AssetKey("chat_set")})
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config=op_config(f"raw_{SNAPSHOT}", {"max_reject_rate": 0.01, "max_row_drop": 0.1}),
        )
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        (check,) = result.get_asset_check_evaluations()
    assert materialized == {f"raw_{SNAPSHOT}"}  # chat_set was not built from it
    assert not check.passed
    metadata: dict[str, Any] = {k: v.value for k, v in check.metadata.items()}
    assert "not_utf8 1" in metadata["reasons"] and "line_too_long 1" in metadata["reasons"]
    examples = metadata["reject_examples"]
    lines = len(good.splitlines())
    assert any(e.startswith(f"line {lines + 1}: not_utf8 (byte 0xff at offset") for e in examples), examples
    assert f"line {lines + 2}: line_too_long (longer than {sources.MAX_LINE_BYTES} bytes)" in examples
    assert metadata["rejected_by_reason"]["not_utf8"] == 1
    after = everything()
    assert after.pop(f"raw_{SNAPSHOT}") != before.pop(f"raw_{SNAPSHOT}")  # the snapshot itself is published
    assert after == before


def test_empty_source_fails_the_snapshot_and_keeps_the_previous(storage, tmp_path, monkeypatch):
    path = mirror_with(tmp_path, monkeypatch, [b"\n", b"  \n"])
    before = everything()
    message = step_error(f"raw_{SNAPSHOT}")
    assert message.startswith("EmptySourceError") and f"source '{SNAPSHOT}'" in message and "has no rows" in message
    assert everything() == before
    assert path.exists()


# Every launchpad field: a value of the right type that is out of its range (where it has one).
# Checked by the config itself as the asset starts, naming the field and the value.
INVALID = {
    "chat_set": {
        "seed": -1,
        "train_fraction": 1.5,
        "dedup_threshold": 2.0,
        "dedup_num_perm": 1,
        "merge_short_below_chars": -1,
        "mix_long_above_chars": -5,
        "mix_probability": 1.5,
        "conversation_max_chars": 0,
        "roleplay_greeting_probability": -0.1,
        "roleplay_example_probability": 2.0,
        "bad_substrings_path": "/nonexistent/bad_substrings.txt",
    },
    "lora_adapter": {
        "lora_r": 0,
        "lora_alpha": 0,
        "lora_dropout": 1.0,
        "lora_target_modules": [],
        "max_tokens_count": 1,
        "learning_rate": 0.0,
        "warmup_steps": -1,
        "per_device_batch_size": 0,
        "gradient_accumulation_steps": 0,
        "num_epochs": 0.0,
        "max_steps": 0,
        "weight_decay": -1.0,
        "max_grad_norm": 0.0,
        "seed": -1,
        "eval_steps": 0,
        "save_steps": 0,
        "max_eval_chats": -1,
        "load_in_4bit": True,
        "pack_tokens": 16,
    },
    "ggml_f16": {
        "threads": 0,
        "eval_chats": 0,
        "eval_max_tokens": 1,
        "kl_top_k": 0,
        "check_prompt": "  ",
        "check_new_tokens": 0,
    },
    f"raw_{SNAPSHOT}": {"max_reject_rate": 1.5, "max_row_drop": -0.1},
    "base_model": {"repo": "not a repo!!", "revision": "", "token_env_var": "HF TOKEN", "local_dir": "/nonexistent/model"},
}
# An invalid combination: named with the field it is set together with.
TOGETHER_WITH = {"load_in_4bit": {"load_in_8bit": True}}
# Closed choices are enums in the launchpad: a value outside them is refused before a run exists.
CLOSED = {
    "lora_adapter": {"lr_scheduler": "sometimes", "precision": "fp8", "attn_implementation": "flash", "device": "tpu"},
    "merged_model": {"dtype": "int4"},
}
# Fields whose every value of the right type is valid (free text, switches): wrong types only.
ANY_VALUE = {"lora_adapter": {"system_prompt", "load_in_8bit", "gradient_checkpointing", "compile_blocks", "packing"}}


def defs_of(op: str) -> dg.Definitions:
    """The code location `op` belongs to."""
    from rugpt_assets import definitions, gpu_definitions

    return gpu_definitions.defs if op == "lora_adapter" else definitions.defs


def job_of(op: str) -> dg.JobDefinition:
    return defs_of(op).resolve_implicit_global_asset_job_def()


def launchpad_fields(op: str) -> Mapping[str, Any]:
    config_type = defs_of(op).resolve_assets_def(op).op.config_schema.as_field().config_type
    assert isinstance(config_type, Shape)
    return config_type.fields


def test_every_launchpad_field_is_covered():
    for op in {*INVALID, *CLOSED}:
        covered = set(INVALID.get(op, {})) | set(CLOSED.get(op, {})) | ANY_VALUE.get(op, set())
        assert set(launchpad_fields(op)) == covered, op
    assert set(launchpad_fields("ggml_quantized")) == set(INVALID["ggml_f16"])


@pytest.mark.parametrize("op", list(INVALID))
def test_out_of_range_values_fail_before_work_naming_the_field(storage, op):
    before = everything()
    for field, value in INVALID[op].items():
        together = TOGETHER_WITH.get(field, {})
        message = step_error(op, run_config=op_config(op, {field: value} | together))
        named = all(name in message for name in {field, *together}) if together else f"{field}={value!r}" in message
        assert message.startswith("ValueError") and named, (field, message)
    message = step_error("ggml_quantized", "Q8_0", op_config("ggml_quantized", {"threads": 0}))
    assert "threads=0 must be at least 1" in message
    assert everything() == before


@pytest.mark.parametrize("op", list(CLOSED))
def test_values_outside_closed_choices_are_refused_at_launch_naming_the_field(op):
    for name, value in CLOSED[op].items():
        with pytest.raises(dg.DagsterInvalidConfigError, match=rf"path root:ops:{op}:config:{name}"):
            dg.validate_run_config(job_of(op), op_config(op, {name: value}))


WRONG_TYPE = {"Array": "c_attn", "Int": "abc", "Float": "abc", "String": 5, "Bool": "yes"}  # by config type key


@pytest.mark.parametrize("op", [*INVALID, *CLOSED, "ggml_quantized"])
def test_wrong_types_are_rejected_at_launch_naming_the_field(op):
    for name, field in launchpad_fields(op).items():
        if field.config_type.kind == ConfigTypeKind.ENUM:
            value = 5
        else:
            value = next(v for kind, v in WRONG_TYPE.items() if kind in field.config_type.key)
        with pytest.raises(dg.DagsterInvalidConfigError, match=rf"path root:ops:{op}:config:{name}"):
            dg.validate_run_config(job_of(op), op_config(op, {name: value}))


def test_unknown_partition_key_is_refused_before_the_run(storage):
    before = everything()
    with pytest.raises(dg.DagsterUnknownPartitionError, match="Could not find a partition with key `Q3_K`"):
        materialize("ggml_quantized", "Q3_K", op_config("ggml_quantized", EXPORT))
    with pytest.raises(SystemExit, match="--quant 'Q3_K': choose f16 or one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0"):
        chat.resolve_model_path("Q3_K")
    assert everything() == before
