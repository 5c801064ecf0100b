"""Streamed evaluation of GGML files against the whole-model HF path, the KL reference against
exact KL, the evaluation set's content hash, stale references, and memory independent of depth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from rugpt_assets.core import evaluate, ggml
from rugpt_assets.core.chat_template import IGNORE_INDEX, render_prompt
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, TRAIN_CONFIG_FILE, ExportConfig
from rugpt_assets.core.quantize import QuantType, quantize_ggml
from rugpt_assets.core.scoring import EvalSet, Reference, Scores, build_eval_set
from rugpt_assets_tests.core.test_ggml import demo_export, random_gpt2

CONFIG = ExportConfig(threads=1, eval_chats=16)


@pytest.fixture(scope="session")
def export(tmp_path_factory):
    return demo_export(tmp_path_factory)


@pytest.fixture(scope="session")
def eval_set(export) -> EvalSet:
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    return build_eval_set(export.val_chats, tokenizer, 256, DEFAULT_SYSTEM_PROMPT, CONFIG.eval_chats)


@pytest.fixture(scope="session")
def q4_0(export):
    return quantize_ggml(export.f16, QuantType.Q4_0, export.root / "eval" / "model-q4_0.bin").path


@torch.inference_mode()
def hf_logprobs(model, eval_set: EvalSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: a whole HF GPT2LMHeadModel (for a file: `ggml.ggml_to_hf_model`), one chat
    per forward, log-softmax at the positions whose next label is a target."""
    rows, targets = [], []
    for ids, labels in eval_set.chats:
        next_labels = torch.tensor(labels[1:])
        keep = next_labels != IGNORE_INDEX
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        rows.append(logits[keep].float().log_softmax(-1))
        targets.append(next_labels[keep])
    return torch.cat(rows), torch.cat(targets)


def streamed(path, eval_set: EvalSet, tokens_per_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    weights = evaluate.GGMLWeights(path) if path.is_file() else evaluate.CheckpointWeights(path)
    chunks = list(evaluate.target_logprobs(weights, eval_set, tokens_per_chunk))
    assert all(len(t) <= tokens_per_chunk for _, t in chunks) and len(chunks) > 1
    return torch.cat([lp for lp, _ in chunks]), torch.cat([t for _, t in chunks])


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean full-vocabulary KL(p ‖ q) per token, from log-probs."""
    return torch.nn.functional.kl_div(q.double(), p.double(), log_target=True, reduction="sum").item() / len(p)


def scores(logprobs: torch.Tensor, targets: torch.Tensor, chunk: int, **kwargs) -> Scores:
    result = Scores(**kwargs)
    for start in range(0, len(targets), chunk):
        result.add(logprobs[start : start + chunk].numpy(), targets[start : start + chunk].numpy())
    return result


def test_streamed_logprobs_equal_the_whole_model(export, eval_set, q4_0):
    """Demo model, f16 and Q4_0: same log-probs, perplexity and KL as the HF model of each file."""
    oracle = {p: hf_logprobs(ggml.ggml_to_hf_model(p, export.model_dir), eval_set) for p in (export.f16, q4_0)}
    ours = {p: streamed(p, eval_set, tokens_per_chunk=37) for p in (export.f16, q4_0)}
    for path in oracle:
        torch.testing.assert_close(ours[path][1], oracle[path][1], rtol=0, atol=0)
        assert (ours[path][0] - oracle[path][0]).abs().max() < 1e-4
    f16_lp, targets = oracle[export.f16]
    assert len(targets) == eval_set.target_tokens > 200
    perplexity = torch.exp(-f16_lp.gather(1, targets[:, None]).double().mean()).item()
    assert scores(*ours[export.f16], 50).perplexity == pytest.approx(perplexity, rel=1e-6)
    # With k = the vocabulary the reference is exact: KL equals the full-vocabulary KL.
    vocab = f16_lp.shape[1]
    reference = scores(*ours[export.f16], 50, top_k=vocab).as_reference(eval_set, {})
    kl = scores(*ours[q4_0], 50, reference=reference)
    assert kl.kl == pytest.approx(exact_kl(f16_lp, oracle[q4_0][0]), rel=1e-4)
    assert kl.reference_tail_mass == 0


def hf_model(model_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids, cache, out = torch.tensor([prompt_ids]), None, []
    for _ in range(n):
        step = model(input_ids=ids, cache=cache, use_cache=True)
        cache = step.cache
        ids = step.logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(ids))
    return out


def test_f16_file_scores_like_the_original_model(export, eval_set):
    """The f16 file, streamed, against the merged HF model it was written from: equal up to f16
    rounding of the weights; the merged checkpoint itself, streamed, equal to HF."""
    original = hf_logprobs(hf_model(export.model_dir), eval_set)
    checkpoint = streamed(export.model_dir, eval_set, 100)
    assert torch.equal(checkpoint[1], original[1]) and (checkpoint[0] - original[0]).abs().max() < 1e-4
    perplexity = scores(*original, 256).perplexity
    assert scores(*streamed(export.f16, eval_set, 100), 256).perplexity == pytest.approx(perplexity, rel=1e-3)


def test_greedy_agreement_is_greedy_decoding_of_the_merged_model(export, tmp_path):
    """The f16 check's one verification pass gives what HF's token-by-token greedy decoding
    gives: the same tokens where llm-rs agrees, and the first disagreement at the same place."""
    model, tokenizer = hf_model(export.model_dir), AutoTokenizer.from_pretrained(export.model_dir)
    weights = evaluate.CheckpointWeights(export.model_dir)
    # another model with the same tokenizer: llm-rs on it parts from the merged model early
    random_gpt2(tmp_path / "other", export.model_dir, n_embd=64, n_layer=2, vocab_size=512)
    ggml.write_ggml_f16(tmp_path / "other", tmp_path / "other.bin")
    cases = []
    for chat in export.val_chats[:2]:  # the first one's greedy tokens hold `</s>` and then `<s>`
        prompt = render_prompt(chat["messages"][:1])
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        expected = hf_greedy(model, prompt_ids, 16)
        assert evaluate.next_token_argmax(weights, prompt_ids + expected[:-1], len(prompt_ids) - 1) == expected
        pieces = evaluate.token_pieces(tokenizer, expected)
        for path in (export.f16, tmp_path / "other.bin"):
            result = evaluate.greedy_agreement(path, export.model_dir, prompt, 16, threads=1)
            first = next((i for i, (a, b) in enumerate(zip(result["llm_rs"], pieces)) if a != b), 16)
            assert result["matching_prefix"] == first and result["equal"] == (first == 16)
            assert result["hf"] == pieces[: first + 1]
            cases.append((path.name, first, "" in pieces[:first]))
    assert {name for name, first, _ in cases if first == 16} == {export.f16.name}
    assert any(first < 16 for _, first, _ in cases) and any(special for *_, special in cases)


def test_streamed_equals_the_whole_model_on_a_random_deep_gpt2(export, tmp_path):
    random_gpt2(tmp_path / "deep", export.model_dir, n_embd=128, n_layer=6, vocab_size=512)
    ggml.write_ggml_f16(tmp_path / "deep", tmp_path / "deep.bin")
    quantized = quantize_ggml(tmp_path / "deep.bin", QuantType.Q5_1, tmp_path / "deep-q5_1.bin").path
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "deep")
    chats = build_eval_set(export.val_chats, tokenizer, 200, "Системный промпт.", 6)
    # the GGML files, and the float32 checkpoint itself (Conv1D weights turned to (out, in))
    for path, model in [(tmp_path / "deep.bin", ggml.ggml_to_hf_model(tmp_path / "deep.bin", tmp_path / "deep")),
                        (quantized, ggml.ggml_to_hf_model(quantized, tmp_path / "deep")),
                        (tmp_path / "deep", hf_model(tmp_path / "deep"))]:  # fmt: skip
        ours, oracle = streamed(path, chats, tokens_per_chunk=64), hf_logprobs(model, chats)
        assert torch.equal(ours[1], oracle[1])
        assert (ours[0] - oracle[0]).abs().max() < 1e-4, path


def test_top_k_reference_bounds_the_exact_kl(export, eval_set, q4_0):
    """KL over f16's top k + tail is a lower bound of the exact KL that tightens as k grows; the
    relative gap stays within a few times f16's mean tail mass (docs/PERFORMANCE.md)."""
    f16 = streamed(export.f16, eval_set, 256)
    quantized = streamed(q4_0, eval_set, 256)
    exact = exact_kl(f16[0], quantized[0])
    assert exact > 1e-4
    previous = 0.0
    for k in (4, 16, 64, 256):
        reference = scores(*f16, 256, top_k=k).as_reference(eval_set, {})
        assert reference.top_ids.shape == (eval_set.target_tokens, k)
        result = scores(*quantized, 256, reference=reference)
        tail = result.reference_tail_mass
        assert 0 < tail < 0.1
        assert previous <= result.kl <= exact * (1 + 1e-6), k
        assert exact - result.kl <= 6 * tail * exact, (k, result.kl, exact, tail)
        previous = result.kl


def test_scores_from_plain_arrays_match_a_hand_computation():
    """What another runtime's logits go through: numpy log-probs, KL by the definition."""
    rng = np.random.default_rng(0)
    p = torch.log_softmax(torch.from_numpy(rng.standard_normal((40, 30)) * 3), -1).float()
    q = torch.log_softmax(p + torch.from_numpy(rng.standard_normal((40, 30)) * 0.3).float(), -1)
    targets = torch.from_numpy(rng.integers(0, 30, 40))
    eval_set = EvalSet.of([((0,) * 41, (IGNORE_INDEX,) + tuple(targets.tolist()))], "")
    reference = scores(p, targets, 7, top_k=3).as_reference(eval_set, {"file": "x"})
    pn, qn = p.double().numpy(), q.double().numpy()
    by_hand = 0.0
    for row in range(40):
        top = np.argsort(-pn[row])[:3]
        rest = np.setdiff1d(np.arange(30), top)
        p_tail, q_tail = np.exp(pn[row, rest]).sum(), np.exp(qn[row, rest]).sum()
        by_hand += (np.exp(pn[row, top]) * (pn[row, top] - qn[row, top])).sum() + p_tail * np.log(p_tail / q_tail)
    result = scores(q, targets, 9, reference=reference)
    assert result.kl == pytest.approx(by_hand / 40, rel=1e-5)
    assert result.perplexity == pytest.approx(np.exp(-qn[np.arange(40), targets.numpy()].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="more target tokens than the reference"):
        Scores(reference).add(q.repeat(2, 1), targets.repeat(2))


def test_reference_round_trips_through_its_file(export, eval_set, tmp_path):
    f16 = streamed(export.f16, eval_set, 256)
    reference = scores(*f16, 256, top_k=8).as_reference(eval_set, {"file": "model-f16.bin", "size_bytes": 1})
    reference.save(tmp_path / "ref.npz")
    loaded = Reference.load(tmp_path / "ref.npz")
    assert (loaded.eval_set_sha256, loaded.source) == (eval_set.sha256, reference.source)
    for name in ("top_ids", "top_logprobs", "tail_logprobs"):
        assert np.array_equal(getattr(loaded, name), getattr(reference, name))
    assert loaded.top_ids.dtype == np.int32 and loaded.top_logprobs.dtype == np.float32


def test_eval_set_is_pinned_by_its_tokens(export, eval_set):
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    again = build_eval_set(export.val_chats, tokenizer, 256, DEFAULT_SYSTEM_PROMPT, CONFIG.eval_chats)
    assert again == eval_set
    other_prompt = build_eval_set(export.val_chats, tokenizer, 256, "Ты — бот.", CONFIG.eval_chats)
    assert other_prompt.sha256 != eval_set.sha256
    edited = [dict(c) for c in export.val_chats]
    edited[3] = {"messages": [*edited[3]["messages"][:-1], {"role": "bot", "content": "Другой ответ."}]}
    assert build_eval_set(edited, tokenizer, 256, DEFAULT_SYSTEM_PROMPT, CONFIG.eval_chats).sha256 != eval_set.sha256
    # Chats past the limit do not count: the hash is of what is scored.
    assert build_eval_set(edited[:3] + export.val_chats[3:], tokenizer, 256, DEFAULT_SYSTEM_PROMPT, 3) == (
        build_eval_set(export.val_chats, tokenizer, 256, DEFAULT_SYSTEM_PROMPT, 3)
    )
    with pytest.raises(ValueError, match="none of the 2 evaluation chats"):
        build_eval_set([{"messages": [{"role": "user", "content": "только вопрос"}]}] * 2, tokenizer, 256, "", 5)


def test_quantized_file_is_compared_only_with_a_fresh_f16_evaluation(export, eval_set, tmp_path):
    """f16 evaluated once (its reference written beside it); a quantized file uses it, and a
    stale or missing one fails with what to re-materialize."""
    f16 = tmp_path / "model-f16.bin"
    for suffix in (".bin", ".tokenizer.json", ".meta"):
        f16.with_suffix(suffix).write_bytes(export.f16.with_suffix(suffix).read_bytes())
    with pytest.raises(FileNotFoundError, match="materialize ggml_f16"):
        evaluate.read_reference(f16, eval_set)
    config = replace(CONFIG, kl_top_k=32)
    numbers, reference = evaluate.evaluate_ggml_file(f16, eval_set, config)
    evaluate.write_evaluation(f16, numbers, reference)
    assert reference.top_ids.shape == (eval_set.target_tokens, 32)  # 8 bytes a token each, not the vocabulary's 4 × 512
    assert evaluate.reference_path(f16).stat().st_size < eval_set.target_tokens * (32 * 8 + 4) + 4096  # + npz headers
    assert numbers["eval_set_sha256"] == eval_set.sha256 and numbers["eval_tokens"] == eval_set.target_tokens

    q8 = quantize_ggml(f16, QuantType.Q8_0, tmp_path / "model-q8_0.bin").path
    quantized, none = evaluate.evaluate_ggml_file(q8, eval_set, config, f16_path=f16)
    assert none is None and 0 < quantized["kl_to_f16"] < 1e-3 and 0 < quantized["f16_tail_mass"] < 1
    assert abs(evaluate.perplexity_delta(quantized, numbers)) < 0.01

    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    other = build_eval_set(export.val_chats[1:], tokenizer, 256, DEFAULT_SYSTEM_PROMPT, CONFIG.eval_chats)
    with pytest.raises(ValueError, match="Re-materialize ggml_f16, then this partition"):
        evaluate.read_reference(f16, other)
    with pytest.raises(ValueError, match=r"re-materialize the f16 asset \(ggml_f16 or gguf_f16\)"):
        evaluate.perplexity_delta({**quantized, "eval_set_sha256": other.sha256}, numbers)
    os.utime(f16)  # rewritten after its evaluation
    with pytest.raises(ValueError, match="changed after ggml_f16 evaluated it"):
        evaluate.evaluate_ggml_file(q8, eval_set, config, f16_path=f16)


def test_system_prompt_comes_from_the_adapters_training_config(tmp_path):
    assert evaluate.trained_system_prompt(tmp_path, "профиль") == "профиль"
    (tmp_path / TRAIN_CONFIG_FILE).write_text(json.dumps({"system_prompt": "Ты — кот."}, ensure_ascii=False))
    assert evaluate.trained_system_prompt(tmp_path, "профиль") == "Ты — кот."


PEAK_SCRIPT = """
import re, sys, psutil
from rugpt_assets.core import evaluate
from rugpt_assets.core.scoring import EvalSet
eval_set = EvalSet.of([(list(range(4, 200)), [-100] + list(range(5, 200)))] * 4, "")
open('/proc/self/clear_refs', 'w').write('5')
before = psutil.Process().memory_info().rss
for _ in evaluate.target_logprobs(evaluate.GGMLWeights(sys.argv[1]), eval_set):
    pass
print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024 - before)
"""


def test_peak_memory_does_not_grow_with_depth(export, tmp_path):
    """Peak RSS growth of the streamed pass (fresh process): a 12-layer model peaks within one
    layer of a 2-layer model of the same width, while its float32 weights are 10 layers more."""
    growth = {}
    for layers in (2, 12):
        random_gpt2(tmp_path / f"h{layers}", export.model_dir, n_embd=512, n_layer=layers, vocab_size=512)
        ggml.write_ggml_f16(tmp_path / f"h{layers}", tmp_path / f"h{layers}.bin")
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / f"h{layers}.bin")],
                             capture_output=True, text=True, check=True)  # fmt: skip
        growth[layers] = int(out.stdout.split()[-1])
    layer_f32 = 12 * 512 * 512 * 4
    assert growth[12] < growth[2] + layer_f32, {k: v >> 20 for k, v in growth.items()}
