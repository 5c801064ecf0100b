"""The streamed merge against PEFT itself, on a tiny random GPT-2 and a non-zero LoRA."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from rugpt_assets.core.artifacts import published, sha256_tree, versions_dir
from rugpt_assets.core.merge import INDEX_FILE, merge_lora

VOCAB = 300


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(p).items()}


def _save_adapter(base_dir: Path, out_dir: Path, **lora) -> Path:
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir), LoraConfig(task_type="CAUSAL_LM", **lora))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a fresh LoRA has B = 0, which would merge to the base unchanged
            torch.nn.init.normal_(param, std=0.1)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128))
    model.save_pretrained(root / "base")
    model.save_pretrained(root / "base_sharded", max_shard_size="200KB")
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (root / "base" / "training_args.bin").write_bytes(b"stale pickle")
    # Hub GPT-2 checkpoints name weights without the "transformer." prefix.
    unprefixed = root / "base_unprefixed"
    shutil.copytree(root / "base", unprefixed)
    weights = {k.removeprefix("transformer."): v for k, v in load_file(unprefixed / "model.safetensors").items()}
    save_file(weights, unprefixed / "model.safetensors", {"format": "pt"})

    _save_adapter(root / "base", root / "adapter", r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True)
    # rsLoRA scaling, and square Conv1D weights (attn.c_proj) where only the module kind says which way to transpose.
    _save_adapter(
        root / "base", root / "adapter_rslora", r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True, use_rslora=True,
    )  # fmt: skip
    return root


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def _peft_logits(work: Path, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    return _logits(PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(work / "base"), work / adapter), ids)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("adapter, n_merged", [("adapter", 2), ("adapter_rslora", 6)])
def test_fp32_merge_matches_peft(work, tmp_path, adapter, n_merged):
    report = merge_lora(work / "base", work / adapter, tmp_path / "out", dtype="float32")

    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    want = _peft_logits(work, adapter, ids)
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "out", trust_remote_code=False)
    assert _rel_err(_logits(merged, ids), want) <= 1e-3  # 2e-7 to 1e-6 seen: only summation order differs
    # The LoRA really moves the logits, so a merge that dropped it would fail the bound above.
    assert _rel_err(_logits(GPT2LMHeadModel.from_pretrained(work / "base"), ids), want) > 1e-2
    assert (report.tensors_merged, report.shards, report.dtype) == (n_merged, 1, "float32")
    # Same float32 operations in the same order as PEFT's own merge: the weights agree bit for bit.
    peft_merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(work / "base"), work / adapter)
    peft_weights = peft_merged.merge_and_unload().state_dict()
    assert all(torch.equal(t, peft_weights[name]) for name, t in _tensors(tmp_path / "out").items())
    assert report.output_bytes == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())


def test_fp16_merge_is_close_and_keeps_non_weight_files(work, tmp_path):
    out = tmp_path / "out"
    merge_lora(work / "base", work / "adapter", out)  # MergeConfig's default dtype: float16

    assert {t.dtype for t in _tensors(out).values()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert (out / "tokenizer_config.json").read_bytes() == (work / "base" / "tokenizer_config.json").read_bytes()
    assert (out / "generation_config.json").is_file() and not (out / "training_args.bin").exists()
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    merged = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32)
    # float16 rounds each weight by up to 2^-11 relative; 3e-4 seen here, 1e-2 leaves room.
    assert _rel_err(_logits(merged, ids), _peft_logits(work, "adapter", ids)) <= 1e-2


def test_sharded_and_unprefixed_bases_give_the_same_weights(work, tmp_path):
    merge_lora(work / "base", work / "adapter", tmp_path / "single", "float32")
    report = merge_lora(work / "base_sharded", work / "adapter", tmp_path / "sharded", "float32")
    merge_lora(work / "base_unprefixed", work / "adapter", tmp_path / "unprefixed", "float32")

    shard_names = sorted(p.name for p in (work / "base_sharded").glob("*.safetensors"))
    assert report.shards == len(shard_names) > 1
    assert sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors")) == shard_names
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert index["weight_map"] == json.loads((work / "base_sharded" / INDEX_FILE).read_text())["weight_map"]
    single, sharded = _tensors(tmp_path / "single"), _tensors(tmp_path / "sharded")
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in sharded.values())

    unprefixed = {f"transformer.{k}": v for k, v in _tensors(tmp_path / "unprefixed").items()}
    assert single.keys() == sharded.keys() == unprefixed.keys()
    assert all(torch.equal(single[k], sharded[k]) and torch.equal(single[k], unprefixed[k]) for k in single)


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


@pytest.mark.parametrize(
    "extra, error",
    [
        ("base_model.model.transformer.h.7.attn.c_attn.lora_{}.weight", r"no weight in .*h\.7\.attn\.c_attn"),
        ("base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector{}", "unexpected key"),
    ],
)
def test_adapter_key_that_matches_nothing_fails(work, tmp_path, extra, error):
    adapter = shutil.copytree(work / "adapter", tmp_path / "adapter")
    factors = load_file(adapter / "adapter_model.safetensors")
    copy = {ab: factors[f"base_model.model.transformer.h.0.attn.c_attn.lora_{ab}.weight"].clone() for ab in "AB"}
    factors |= {extra.format(ab): tensor for ab, tensor in copy.items()}
    save_file(factors, adapter / "adapter_model.safetensors", {"format": "pt"})

    with pytest.raises(ValueError, match=error):
        merge_lora(work / "base", adapter, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "field, value",
    [("use_dora", True), ("bias", "all"), ("modules_to_save", ["lm_head"]), ("init_lora_weights", "pissa")],
)
def test_unsupported_adapter_config_is_rejected(work, tmp_path, field, value):
    adapter = shutil.copytree(work / "adapter", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {field: value}))

    with pytest.raises(ValueError, match=f"{field}=.*merge_and_unload"):
        merge_lora(work / "base", adapter, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_failure_mid_write_leaves_the_previous_output_intact(work, tmp_path):
    out = tmp_path / "out"
    merge_lora(work / "base", work / "adapter", out)
    before = sha256_tree(out)
    base = shutil.copytree(work / "base_sharded", tmp_path / "base")
    last_shard = sorted(base.glob("*.safetensors"))[-1]
    weights = load_file(last_shard)
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], 1e6)  # overflows float16
    save_file(weights, last_shard, {"format": "pt"})

    with pytest.raises(ValueError, match=f"{name} has values outside the torch.float16 range"):
        merge_lora(base, work / "adapter", out, "float16")
    assert sha256_tree(out) == before
    assert [p.name for p in versions_dir(out).iterdir()] == [published(out).name]  # no leftovers


def test_pickle_only_base_is_refused(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"pickle")

    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors only"):
        merge_lora(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
