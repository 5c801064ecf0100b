"""The GGML container: layout against llm-rs's own converter, vocabulary bytes, greedy equality
with HF, streaming, errors. The demo export is shared with the other export tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file
from transformers import AutoTokenizer

from rugpt_assets.core import evaluate, ggml
from rugpt_assets.core.artifacts import publish_file, versions_dir
from rugpt_assets.core.chat_template import render_message, render_prompt, with_system_prompt
from rugpt_assets.core.demo_model import DemoModelSpec, build_demo_model, gpt2_weight_shapes

PAIRS = [
    ("Привет! Как дела?", "Всё хорошо, спасибо. А у тебя?"),
    ("Что такое ёжик?", "Ёжик — маленький зверёк с иголками, «колючий» друг."),
    ("Назови столицу России.", "Москва — столица России."),
    ("Сколько будет 2+2?", "2 + 2 = 4."),
    ("Translate: dog", "Собака, dog.\tПёс."),
    ("Расскажи о себе.", "Я — ruGPT-3.5, русскоязычный автоматический ассистент."),
]
RARE_TEXTS = [
    "Ёжик и ёлка: «цитата» — тире… ЁЁЁ",
    "emoji 😀🚀 and CJK 漢字かな",
    "tab\there\nnewline  двойной   пробел\t\t",
    "<s>user\nПривет</s>\n<s>bot\n",
    "Номер 123456789 Москва — столица",
]
N_TRAIN = 60


def demo_chats() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{u} ({i})"}, {"role": "bot", "content": f"{b} Номер {i}."}]}
        for i in range(80)
        for u, b in [PAIRS[i % len(PAIRS)]]
    ]


def demo_export(tmp_path_factory) -> SimpleNamespace:
    """A tiny demo GPT-2 (vocabulary 512: quantized tensors stay 16-byte sized) and its f16
    file, built once per test session and shared by the export test modules."""
    root = tmp_path_factory.getbasetemp() / "ggml-demo"
    chats = demo_chats()
    if not (root / "ready").exists():
        chat_texts = (with_system_prompt(c["messages"]) for c in chats[:N_TRAIN])
        texts = ["".join(render_message(m["role"], m["content"]) for m in chat) for chat in chat_texts]
        build_demo_model(texts, root / "model", DemoModelSpec(vocab_size=512, pretrain_steps=120, pretrain_lr=3e-3))
        ggml.write_ggml_f16(root / "model", root / "ggml" / "model-f16.bin")
        (root / "ready").touch()
    return SimpleNamespace(model_dir=root / "model", f16=root / "ggml" / "model-f16.bin", val_chats=chats[N_TRAIN:], root=root)


@pytest.fixture(scope="session")
def export(tmp_path_factory):
    return demo_export(tmp_path_factory)


def random_gpt2(out: Path, tokenizer_dir: Path, n_embd: int, n_layer: int, vocab_size: int) -> int:
    """A random float32 GPT-2 checkpoint written straight to safetensors; returns its bytes."""
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    config = json.loads((tokenizer_dir / "config.json").read_text())
    config.update(n_embd=n_embd, n_layer=n_layer, n_head=8, vocab_size=vocab_size, n_positions=256)
    (out / "config.json").write_text(json.dumps(config))
    shapes = gpt2_weight_shapes(n_embd, n_layer, vocab_size, n_positions=256)
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}
    save_file(tensors, out / "model.safetensors")
    return (out / "model.safetensors").stat().st_size


def test_f16_tensors_equal_llm_rs_converter(export, tmp_path):
    """Same tensor names, order, types, GGML dims and f16 bytes as llm-rs's own converter."""
    from llm_rs.convert.auto_converter import AutoConverter

    theirs = ggml.read_ggml(Path(AutoConverter.convert(str(export.model_dir), str(tmp_path))))
    ours = ggml.read_ggml(export.f16)
    assert ours.hparams == theirs.hparams
    assert list(ours.tensors) == list(theirs.tensors)
    for name, mine in ours.tensors.items():
        other = theirs.tensors[name]
        assert (mine.type, mine.ne) == (other.type, other.ne), name
        if mine.type == ggml.GGMLQuantizationType.F16:
            assert np.array_equal(mine.data, other.data), name
        else:  # llm-rs rounds everything through f16 first; we keep f32 precision
            np.testing.assert_array_equal(mine.to_numpy().astype(np.float16), other.to_numpy().astype(np.float16))
    # The vocabulary is where they differ: raw bytes instead of decoded text.
    assert b"\xef\xbf\xbd" in theirs.vocab and b"\xef\xbf\xbd" not in ours.vocab


def test_vocabulary_is_the_tokenizers_bytes(export):
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    vocab = ggml.read_ggml(export.f16).vocab
    assert vocab[:5] == [b"<pad>", b"<|endoftext|>", b"<s>", b"</s>", b"<mask>"]
    for text in RARE_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(vocab[i] for i in ids) == text.encode("utf-8"), text


def test_llm_rs_tokenizes_like_hf(export):
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    model, _ = evaluate.load_llm_rs(export.f16, threads=1)
    for text in RARE_TEXTS:
        assert model.tokenize(text) == tokenizer.encode(text, add_special_tokens=False), text


def test_generated_pieces_decode_to_exact_text(export):
    """Tokens that hold parts of a UTF-8 character still give the exact text."""
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    for text in RARE_TEXTS[:3]:
        decoder = evaluate.TokenText()
        pieces = evaluate.token_pieces(tokenizer, tokenizer.encode(text, add_special_tokens=False))
        assert "".join(decoder.push(p) for p in pieces) + decoder.flush() == text


def test_f16_greedy_tokens_equal_hf(export):
    prompt = render_prompt([{"role": "user", "content": "Расскажи о себе."}])
    result = evaluate.greedy_agreement(export.f16, export.model_dir, prompt, n=16, threads=1)
    assert result["equal"], result
    assert len(result["llm_rs"]) == 16


def test_write_streams_one_tensor_at_a_time(export, tmp_path):
    """Peak memory of the writer grows by about one tensor, not by the model (in a fresh process)."""
    model_bytes = random_gpt2(tmp_path / "big", export.model_dir, n_embd=512, n_layer=12, vocab_size=512)
    largest = 512 * 2048 * 4
    # Peak RSS of the fresh process's own memory (VmHWM, reset first): ru_maxrss would count
    # this test process too, which a forked child inherits.
    script = (
        "import re, sys, psutil\n"
        "from rugpt_assets.core.ggml import write_ggml_f16\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = psutil.Process().memory_info().rss\n"
        "write_ggml_f16(sys.argv[1], sys.argv[2])\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "print(peak - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big"), str(tmp_path / "big.bin")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    growth = int(out.stdout.split()[-1])
    assert model_bytes > 30 * largest
    assert growth < model_bytes / 3, f"peak grew by {growth >> 20} MiB for a {model_bytes >> 20} MiB model"
    written = ggml.read_ggml(tmp_path / "big.bin")
    assert written.tensors["model/h11/mlp/c_fc/w"].shape == (2048, 512)


def test_vocab_padding_and_misaligned_vocab(export, tmp_path):
    # An embedding padded past the tokenizer (as ruGPT-3.5's 50272) gets empty vocabulary entries.
    random_gpt2(tmp_path / "padded", export.model_dir, n_embd=64, n_layer=1, vocab_size=520)
    ggml.write_ggml_f16(tmp_path / "padded", tmp_path / "padded.bin")
    assert ggml.read_ggml(tmp_path / "padded.bin").vocab[512:] == [b""] * 8
    # 515 rows × 2 blocks is not a multiple of 8: its quantized files would crash llm-rs.
    random_gpt2(tmp_path / "odd", export.model_dir, n_embd=64, n_layer=1, vocab_size=515)
    with pytest.raises(ValueError, match="pad vocab_size to a multiple of 8"):
        ggml.write_ggml_f16(tmp_path / "odd", tmp_path / "odd.bin")
    assert not (tmp_path / "odd.bin").exists()


def test_failed_write_leaves_no_file(export, tmp_path, monkeypatch):
    calls = []

    def failing(name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return original(name, tensor)

    original = ggml._ggml_array
    monkeypatch.setattr(ggml, "_ggml_array", failing)
    with pytest.raises(RuntimeError, match="disk full"), publish_file(tmp_path / "model-f16.bin") as staged:
        ggml.write_ggml_f16(export.model_dir, staged)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model-f16.bin.lock", ".model-f16.bin.versions"]
    assert not list(versions_dir(tmp_path / "model-f16.bin").iterdir())


def test_bad_inputs_say_what_and_where(export, tmp_path):
    shutil.copytree(export.model_dir, tmp_path / "empty", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ggml.write_ggml_f16(tmp_path / "empty", tmp_path / "x.bin")
    config = json.loads((export.model_dir / "config.json").read_text())
    (tmp_path / "empty" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        ggml.write_ggml_f16(tmp_path / "empty", tmp_path / "x.bin")
    (tmp_path / "bad.bin").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="not an unversioned GGML file"):
        ggml.read_ggml(tmp_path / "bad.bin")
