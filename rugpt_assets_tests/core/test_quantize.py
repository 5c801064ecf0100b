"""Quantization with llm-rs: every QuantType loads and generates, block bytes read back right,
quality ordering is sane, an interrupted run publishes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf.quants import quantize as gguf_quantize
from transformers import AutoTokenizer

from rugpt_assets.core import evaluate, ggml
from rugpt_assets.core.artifacts import publish_file, sha256_file, versions_dir
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, ExportConfig
from rugpt_assets.core.quantize import QuantType, quantize_ggml
from rugpt_assets.core.scoring import build_eval_set
from rugpt_assets_tests.core.test_ggml import demo_export


@pytest.fixture(scope="session")
def export(tmp_path_factory):
    return demo_export(tmp_path_factory)


@pytest.fixture(scope="session")
def quantized(export):
    return {q: quantize_ggml(export.f16, q, export.root / "ggml" / f"model-{q.name.lower()}.bin") for q in QuantType}


def test_one_enum_drives_the_types():
    assert [q.name for q in QuantType] == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    assert [q.ftype for q in QuantType] == [2002, 2003, 2008, 2009, 2007]
    assert [q.bits_per_weight for q in QuantType] == [4.5, 5.0, 5.5, 6.0, 8.5]
    bounds = [q.max_ppl_increase for q in QuantType]
    assert bounds == sorted(bounds, reverse=True) and all(0 < b < 0.2 for b in bounds)


def test_reports_and_headers(export, quantized):
    f16 = ggml.read_ggml(export.f16)
    for quant, report in quantized.items():
        written = ggml.read_ggml(report.path)
        assert written.hparams.ftype == quant.ftype
        assert written.vocab == f16.vocab
        # 2-D weights are quantized, biases, norms and the position table stay f32
        assert written.tensors["model/h0/mlp/c_fc/w"].type == quant.ggml_type
        assert written.tensors["model/wte"].type == quant.ggml_type
        assert written.tensors["model/h0/ln_1/g"].type == ggml.GGMLQuantizationType.F32
        assert report.size_bytes == report.path.stat().st_size
        assert report.sha256 == sha256_file(report.path)
        assert report.bits_per_weight == pytest.approx(8 * report.size_bytes / report.parameters)
        assert report.ratio_to_f16 == pytest.approx(report.size_bytes / export.f16.stat().st_size)
        assert ggml.meta_path(report.path).is_file() and ggml.tokenizer_sidecar(report.path).is_file()
    ratios = [quantized[q].ratio_to_f16 for q in QuantType]
    assert ratios[:4] == sorted(ratios[:4]) and max(ratios) < 1


def test_llm_rs_blocks_are_the_gguf_block_format(export, quantized):
    """llm-rs's Q4_0…Q8_0 bytes are gguf's: its numpy quantizer reproduces them (up to rare
    rounding ties) and its dequantizer reads them back within one quantization step."""
    weights = ggml.read_ggml(export.f16).tensors["model/h1/mlp/c_fc/w"].to_numpy()
    for quant, report in quantized.items():
        tensor = ggml.read_ggml(report.path).tensors["model/h1/mlp/c_fc/w"]
        ours = gguf_quantize(weights, quant.ggml_type).reshape(-1)
        assert (ours == tensor.data).mean() > 0.999, quant
        # loose (a block's error is at most one of its steps); a wrong layout errs by the weights' size
        step = np.abs(weights).max() / 2 ** (quant.bits_per_weight - 2)
        assert np.abs(tensor.to_numpy() - weights).max() < step, quant


def test_each_type_loads_and_generates(export, quantized):
    prompt = "<s>user\nПривет! Как дела?</s>\n<s>bot\n"
    f16, _ = evaluate.load_llm_rs(export.f16, threads=1)
    f16_pieces = evaluate.generate(f16, prompt, 16, stop_at_special=False).pieces
    for quant, report in quantized.items():
        model, load_time = evaluate.load_llm_rs(report.path, threads=1)
        out = evaluate.generate(model, prompt, 16, stop_at_special=False)
        assert out.new_tokens == 16 and load_time >= 0 and out.tokens_per_s > 0, quant
        if quant is QuantType.Q8_0:  # 8-bit rounding does not change greedy choices here
            assert out.pieces == f16_pieces


def test_perplexity_ordering_is_sane(export, quantized):
    config = ExportConfig(threads=1, eval_chats=16)
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    eval_set = build_eval_set(export.val_chats, tokenizer, 256, DEFAULT_SYSTEM_PROMPT, config.eval_chats)
    f16, reference = evaluate.evaluate_ggml_file(export.f16, eval_set, config)
    evaluate.write_evaluation(export.f16, f16, reference)
    results = {q: evaluate.evaluate_ggml_file(r.path, eval_set, config, f16_path=export.f16)[0] for q, r in quantized.items()}
    assert math.isfinite(f16["perplexity"]) and "kl_to_f16" not in f16
    delta = {q: r["perplexity"] / f16["perplexity"] - 1 for q, r in results.items()}
    kl = {q: r["kl_to_f16"] for q, r in results.items()}
    for quant in QuantType:
        assert math.isfinite(results[quant]["perplexity"]), quant
        assert delta[quant] <= quant.max_ppl_increase, (quant, delta)
        assert 0 < kl[quant] < 0.05, (quant, kl)
    # KL ranks by rounding error; a perplexity delta on a tiny model is first-order noise of
    # either sign, so only the 8-bit against 4-bit gap is asserted on it.
    assert min(kl, key=lambda q: kl[q]) is QuantType.Q8_0
    assert kl[QuantType.Q8_0] * 20 < min(kl[q] for q in QuantType if q is not QuantType.Q8_0)
    assert abs(delta[QuantType.Q8_0]) < min(abs(delta[QuantType.Q4_0]), abs(delta[QuantType.Q4_1]))


def test_interrupted_quantization_leaves_no_partial_file(export, tmp_path):
    out = tmp_path / "model-q4_0.bin"
    messages = []

    def interrupt(message: str) -> None:
        messages.append(message)
        if len(messages) == 12:  # part-way through the tensors
            raise KeyboardInterrupt("interrupted")

    with pytest.raises(BaseException, match="interrupted"), publish_file(out) as staged:  # llm-rs: a panic
        quantize_ggml(export.f16, QuantType.Q4_0, staged, progress=interrupt)
    assert len(messages) == 12
    assert not out.exists()
    assert not list(versions_dir(out).iterdir())
    with publish_file(out) as staged:  # and a rerun completes
        quantize_ggml(export.f16, QuantType.Q4_0, staged)
    assert ggml.read_ggml(out).hparams.ftype == QuantType.Q4_0.ftype


def test_quantize_rejects_wrong_inputs(export, quantized, tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize ggml_f16"):
        quantize_ggml(tmp_path / "missing.bin", QuantType.Q8_0, tmp_path / "q.bin")
    with pytest.raises(ValueError, match="quantize the f16 file"):
        quantize_ggml(quantized[QuantType.Q8_0].path, QuantType.Q4_0, tmp_path / "q.bin")
