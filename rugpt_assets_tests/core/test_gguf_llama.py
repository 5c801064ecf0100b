"""GGUF files in llama.cpp itself: they load, tokenize and generate as HF does, llama.cpp's f16
logits are the HF model's, every GGUFType is made by llama.cpp's quantizer with its fallbacks
reported, quality ranks sanely, the chat template is applied by llama-cpp-python, and an
interrupted quantization publishes nothing."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from rugpt_assets.core import evaluate, gguf
from rugpt_assets.core.artifacts import publish_file, versions_dir
from rugpt_assets.core.chat_template import render_prompt
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, ExportConfig, GenerationConfig
from rugpt_assets.core.scoring import build_eval_set
from rugpt_assets_tests.core.test_evaluate import hf_logprobs
from rugpt_assets_tests.core.test_ggml import RARE_TEXTS
from rugpt_assets_tests.core.test_gguf import CHATS, as_trained, gguf_demo
from rugpt_assets_tests.gguf_support import require_llama_cpp

require_llama_cpp()

from rugpt_assets.core import gguf_eval  # noqa: E402  (only with llama-cpp-python)

PROMPT = render_prompt([{"role": "user", "content": "Расскажи о себе."}])


@pytest.fixture(scope="session")
def export(tmp_path_factory):
    return gguf_demo(tmp_path_factory)


@pytest.fixture(scope="session")
def quantized(export):
    return {
        t: gguf.quantize_gguf(export.gguf_f16, t, export.root / "gguf" / f"model-{t.name.lower()}.gguf", threads=1) for t in gguf.GGUFType
    }


@pytest.fixture(scope="session")
def f16_llama(export):
    return gguf_eval.load_llama(export.gguf_f16, threads=1)[0]


@pytest.fixture(scope="session")
def hf_model(export):
    """The oracle: transformers' own GPT-2 on the merged checkpoint."""
    return GPT2LMHeadModel.from_pretrained(export.model_dir).eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids, out = list(prompt_ids), []
    for _ in range(n):
        out.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        ids.append(out[-1])
    return out


def test_tokenizes_like_hf(export, f16_llama):
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    texts = [*gguf_eval.TOKENIZATION_PROBES, *RARE_TEXTS]
    assert gguf_eval.tokenization_mismatches(f16_llama, tokenizer, texts) == []
    # without special=True the template's <s>/</s> would be split into characters
    assert f16_llama.tokenize(b"<s>bot\n", add_bos=False, special=True)[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in f16_llama.tokenize(b"<s>bot\n", add_bos=False, special=False)


def test_f16_logits_are_the_hf_models(export, f16_llama, hf_model):
    """llama.cpp's own next-token logits on a validation chat against transformers'."""
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    ids = tokenizer(render_prompt(export.val_chats[0]["messages"]), add_special_tokens=False).input_ids
    with torch.inference_mode():
        ours = gguf_eval.llama_logits(f16_llama, ids)
        hf = hf_model(input_ids=torch.tensor([ids])).logits[0]
    assert ours.shape == hf.shape == (len(ids), hf_model.config.vocab_size)
    assert ((ours - hf).norm() / hf.norm()).item() < 2e-3
    assert torch.equal(ours.argmax(-1), hf.argmax(-1))


def test_f16_greedy_tokens_equal_hf(export, f16_llama, hf_model):
    result = gguf_eval.greedy_agreement(export.gguf_f16, export.model_dir, PROMPT, n=16, threads=1)
    assert result["equal"], result
    prompt_ids = gguf_eval.tokenize(f16_llama, PROMPT)
    assert result["llama_cpp"] == hf_greedy(hf_model, prompt_ids, 16)


def test_generation_stops_at_end_of_reply(export, f16_llama, hf_model):
    """Greedy generation through llama.cpp's sampler gives the HF model's greedy reply and
    stops at </s>; seeded sampling is repeatable."""
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    reply = gguf_eval.generate(f16_llama, PROMPT, 64)
    hf_ids = hf_greedy(hf_model, gguf_eval.tokenize(f16_llama, PROMPT), 64)
    eos_at = hf_ids.index(tokenizer.eos_token_id)
    assert reply.ended and reply.new_tokens == eos_at + 1 and reply.pieces[-1] == ""
    assert reply.text == tokenizer.decode(hf_ids[:eos_at])
    seeded = [gguf_eval.generate(f16_llama, PROMPT, 32, sampling=GenerationConfig(), seed=7).text for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("messages", CHATS)
def test_llama_cpp_python_applies_the_files_template(export, f16_llama, messages):
    """llama-cpp-python picks up tokenizer.chat_template by itself: its formatter renders the
    training prompt with a stop at </s>, and a chat completion is fed exactly that prompt."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    assert f16_llama.chat_format == "chat_template.default"
    formatter = Jinja2ChatFormatter(f16_llama.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    rendered = formatter(messages=messages)
    expected = render_prompt(as_trained(messages))
    assert rendered.prompt == expected and rendered.stop == ["</s>"]
    completion = f16_llama.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
    assert completion["usage"]["prompt_tokens"] == len(gguf_eval.tokenize(f16_llama, expected))


def test_every_type_is_llama_cpps_with_fallbacks_reported(export, quantized):
    f16 = gguf.read_gguf(export.gguf_f16)
    for gguf_type, report in quantized.items():
        written = gguf.read_gguf(report.path)
        assert written.file_type == gguf_type.file_type
        assert written.tokens == f16.tokens and written.string("tokenizer.chat_template") == f16.string("tokenizer.chat_template")
        assert gguf.modelfile_path(report.path).read_text().startswith(f"FROM ./{report.path.name}\n")
        assert report.bits_per_weight == pytest.approx(8 * report.size_bytes / report.parameters)
        assert report.tensor_types == written.type_counts()
        assert report.ratio_to_f16 < 1, gguf_type
        weights = {t.name: t for t in written.tensors if len(t.ne) == 2 and t.name not in gguf.UNQUANTIZED}
        if gguf_type is gguf.GGUFType.Q8_0:  # 32-blocks: every row fits
            assert {t.type.name for t in weights.values()} == {"Q8_0"} and report.fallbacks == {}
            continue
        # The demo's rows of 128 do not fit 256-blocks: llama.cpp used a 32-block type for those,
        # and a K-quant where rows fit (ffn_down's rows are 4 × 128 = 512).
        short = {name for name, t in weights.items() if t.ne[0] % 256}
        assert set(report.fallbacks) == short and "token_embd.weight" in short
        assert all(t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") for t in report.fallbacks.values()), report.fallbacks
        assert {weights[n].type.name for n in weights if n not in short} <= {"Q4_K", "Q5_K", "Q6_K"}
        assert weights["blk.0.ffn_down.weight"].type.name.endswith("_K")


def test_perplexity_and_kl_from_llama_cpps_logits(export, quantized, hf_model, tmp_path):
    """On the GGML files' evaluation set: llama.cpp's f16 perplexity is transformers', the f16
    file becomes the KL reference, and KL to it ranks the types."""
    config = ExportConfig(threads=1, eval_chats=16)
    eval_set = build_eval_set(
        export.val_chats, AutoTokenizer.from_pretrained(export.model_dir), 256, DEFAULT_SYSTEM_PROMPT, config.eval_chats
    )
    f16, reference = gguf_eval.evaluate_gguf_file(export.gguf_f16, eval_set, config)
    logprobs, targets = hf_logprobs(hf_model, eval_set)
    hf_perplexity = math.exp(-logprobs.gather(1, targets[:, None]).mean().item())
    assert f16["perplexity"] == pytest.approx(hf_perplexity, rel=1e-3) and "kl_to_f16" not in f16
    assert f16["eval_set_sha256"] == eval_set.sha256 and reference.eval_set_sha256 == eval_set.sha256
    evaluate.write_evaluation(export.gguf_f16, f16, reference)
    results = {t: gguf_eval.evaluate_gguf_file(r.path, eval_set, config, f16_path=export.gguf_f16)[0] for t, r in quantized.items()}
    kl = {t: r["kl_to_f16"] for t, r in results.items()}
    for gguf_type, numbers in results.items():
        assert math.isfinite(numbers["perplexity"]) and numbers["generation_tokens_per_s"] > 0
        assert evaluate.perplexity_delta(numbers, f16) <= gguf_type.max_ppl_increase, (gguf_type, numbers)
        assert 0 < kl[gguf_type] < 0.05, kl
    assert min(kl, key=lambda t: kl[t]) is gguf.GGUFType.Q8_0
    assert kl[gguf.GGUFType.Q8_0] < kl[gguf.GGUFType.Q6_K] < kl[gguf.GGUFType.Q4_K_M]
    # A reference from another evaluation set is refused, naming the GGUF asset.
    other = build_eval_set(export.val_chats[1:], AutoTokenizer.from_pretrained(export.model_dir), 256, "x", 4)
    with pytest.raises(ValueError, match="Re-materialize gguf_f16, then this partition"):
        gguf_eval.evaluate_gguf_file(quantized[gguf.GGUFType.Q8_0].path, other, config, f16_path=export.gguf_f16)


def test_interrupted_quantization_leaves_no_file(export, tmp_path, monkeypatch):
    import llama_cpp

    original = llama_cpp.llama_model_quantize

    def dies_half_way(source, target, params):
        original(source, target, params)
        with open(target, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", dies_half_way)
    out = tmp_path / "model-q6_k.gguf"
    with pytest.raises(KeyboardInterrupt), publish_file(out) as staged:
        gguf.quantize_gguf(export.gguf_f16, gguf.GGUFType.Q6_K, staged, threads=1)
    assert not out.exists() and not gguf.modelfile_path(out).exists()
    assert not list(versions_dir(out).iterdir())
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", original)
    with publish_file(out) as staged:  # and a rerun completes
        gguf.quantize_gguf(export.gguf_f16, gguf.GGUFType.Q6_K, staged, threads=1)
    assert gguf.read_gguf(out).file_type == gguf.GGUFType.Q6_K.file_type
    assert gguf.modelfile_path(out).read_text(encoding="utf-8").startswith("FROM ./model-q6_k.gguf\n")


def test_quantize_rejects_wrong_inputs(export, quantized, tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize gguf_f16"):
        gguf.quantize_gguf(tmp_path / "missing.gguf", gguf.GGUFType.Q8_0, tmp_path / "q.gguf", threads=1)
    with pytest.raises(ValueError, match="quantize the f16 file"):
        gguf.quantize_gguf(quantized[gguf.GGUFType.Q8_0].path, gguf.GGUFType.Q4_K_M, tmp_path / "q.gguf", threads=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf_eval.load_llama(tmp_path / "missing.gguf", threads=1)
