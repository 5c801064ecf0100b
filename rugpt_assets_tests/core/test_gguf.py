"""The GGUF writer without llama.cpp: what the file holds (keys, tokenizer, template, tensors
against the safetensors), the chat template against the training renderer through two
independent Jinja engines, the Modelfile, streaming, atomic writes and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from rugpt_assets.core import gguf
from rugpt_assets.core.artifacts import publish_file, versions_dir
from rugpt_assets.core.chat_template import jinja_chat_template, render_prompt
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, GenerationConfig
from rugpt_assets_tests.core.test_ggml import demo_export, random_gpt2
from rugpt_assets_tests.gguf_support import require_go

CARD = gguf.ModelCard(
    name="demo gigasaiga LoRA",
    base_model="ai-forever/ruGPT-3.5-13B",
    base_model_revision="abc123",
    license="mit",
    datasets=("IlyaGusev/ru_turbo_saiga", "IlyaGusev/oasst1_ru_main_branch"),
    description="trained on the chat set",
)
CHATS = [
    [{"role": "user", "content": "Привет! Что такое ёжик?"}],
    [
        {"role": "system", "content": "Ты — «бот».\tОтвечай кратко."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4 — 😀"},
        {"role": "user", "content": "А 3+3?"},
    ],
    [{"role": "user", "content": "Кто ты?"}, {"role": "bot", "content": "Ассистент."}, {"role": "user", "content": "Ещё"}],
]


def gguf_demo(tmp_path_factory):
    """The demo model's f16 GGUF file, written once per session next to its GGML export."""
    export = demo_export(tmp_path_factory)
    path = export.root / "gguf" / "model-f16.gguf"
    if not path.exists():
        gguf.write_gguf_f16(export.model_dir, path, CARD)
    export.gguf_f16 = path
    return export


@pytest.fixture(scope="session")
def export(tmp_path_factory):
    return gguf_demo(tmp_path_factory)


def as_trained(messages: list[dict]) -> list[dict]:
    """OpenAI's "assistant" is the template's "bot"."""
    return [{**m, "role": "bot" if m["role"] == "assistant" else m["role"]} for m in messages]


def test_one_enum_drives_the_types():
    assert [t.name for t in gguf.GGUFType] == ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    assert [int(t.file_type) for t in gguf.GGUFType] == [15, 17, 18, 7]  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
    assert [t.main_type.name for t in gguf.GGUFType] == ["Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    bounds = [t.max_ppl_increase for t in gguf.GGUFType]
    assert bounds == sorted(bounds, reverse=True) and all(0 < b < 0.2 for b in bounds)


def test_keys_tokenizer_and_provenance(export):
    contents = gguf.read_gguf(export.gguf_f16)
    f = contents.fields
    config = json.loads((export.model_dir / "config.json").read_text())
    assert f["general.architecture"] == "gpt2" and f["general.file_type"] == 1
    assert (f["gpt2.context_length"], f["gpt2.embedding_length"], f["gpt2.block_count"]) == (
        config["n_positions"], config["n_embd"], config["n_layer"])  # fmt: skip
    assert f["gpt2.feed_forward_length"] == 4 * config["n_embd"] and f["gpt2.attention.head_count"] == config["n_head"]
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) == (2, 3, 0)
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["general.name"] == CARD.name and f["general.license"] == "mit"
    assert (f["general.base_model.0.name"], f["general.base_model.0.version"]) == ("ai-forever/ruGPT-3.5-13B", "abc123")
    assert [f[f"general.dataset.{i}.name"] for i in range(f["general.dataset.count"])] == list(CARD.datasets)
    generation = GenerationConfig()
    assert f["general.sampling.top_k"] == generation.top_k
    assert f["general.sampling.temp"] == pytest.approx(generation.temperature)
    assert f["general.sampling.penalty_repeat"] == pytest.approx(generation.repetition_penalty)

    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    tokens, types = contents.tokens, f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config["vocab_size"] and len(set(tokens)) == len(tokens)
    assert tokens[:5] == ["<pad>", "<|endoftext|>", "<s>", "</s>", "<mask>"]
    assert types[:5] == [TokenType.CONTROL] * 5
    for token, i in tokenizer.get_vocab().items():
        assert tokens[i] == token
    padding = range(len(tokenizer), config["vocab_size"])
    assert [tokens[i] for i in padding] == [f"[PAD{i}]" for i in padding]
    assert all(types[i] == TokenType.UNUSED for i in padding)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]


def test_tensors_are_the_checkpoints(export):
    """Names, GGML dims, types and values against the safetensors file itself."""
    reader = GGUFReader(export.gguf_f16)
    hf = load_file(export.model_dir / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    expected = {
        "token_embd.weight": ("transformer.wte.weight", False),
        "position_embd.weight": ("transformer.wpe.weight", False),
        "output_norm.bias": ("transformer.ln_f.bias", False),
        "blk.1.attn_qkv.weight": ("transformer.h.1.attn.c_attn.weight", True),
        "blk.1.attn_qkv.bias": ("transformer.h.1.attn.c_attn.bias", False),
        "blk.0.attn_output.weight": ("transformer.h.0.attn.c_proj.weight", True),
        "blk.0.ffn_up.weight": ("transformer.h.0.mlp.c_fc.weight", True),
        "blk.1.ffn_down.weight": ("transformer.h.1.mlp.c_proj.weight", True),
        "blk.0.ffn_norm.weight": ("transformer.h.0.ln_2.weight", False),
    }
    for name, (hf_name, conv1d) in expected.items():
        tensor, reference = tensors[name], hf[hf_name]
        reference = reference.T if conv1d else reference  # Conv1D weights stored (out, in)
        two_d = reference.ndim == 2 and name != "position_embd.weight"
        assert tensor.tensor_type == (GGMLQuantizationType.F16 if two_d else GGMLQuantizationType.F32), name
        assert tuple(int(n) for n in tensor.shape) == reference.shape[::-1], name
        got = np.asarray(tensor.data).reshape(reference.shape)
        np.testing.assert_array_equal(got, reference.astype(got.dtype), err_msg=name)
    assert len(tensors) == 4 + 12 * json.loads((export.model_dir / "config.json").read_text())["n_layer"]


@pytest.mark.parametrize("messages", CHATS)
def test_jinja_template_renders_the_training_prompt(export, messages):
    """The template inside the file, rendered by transformers' and llama-cpp-python's own Jinja
    set-ups (sandboxed, trim_blocks/lstrip_blocks), is the prompt training and the CLI use."""
    template = gguf.read_gguf(export.gguf_f16).string("tokenizer.chat_template")
    assert template == jinja_chat_template(DEFAULT_SYSTEM_PROMPT)
    expected = render_prompt(as_trained(messages))
    tokenizer = AutoTokenizer.from_pretrained(export.model_dir)
    hf = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert hf == expected
    without_generation = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert without_generation + "<s>bot\n" == expected


def test_modelfile(export):
    text = gguf.modelfile_path(export.gguf_f16).read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./model-f16.gguf"
    generation = GenerationConfig()
    for line in [
        'PARAMETER stop "</s>"',
        f"PARAMETER temperature {generation.temperature}",
        f"PARAMETER top_p {generation.top_p}",
        f"PARAMETER top_k {generation.top_k}",
        f"PARAMETER repeat_penalty {generation.repetition_penalty}",
        f"PARAMETER num_predict {generation.max_new_tokens}",
        "PARAMETER num_ctx 512",
    ]:
        assert line in lines, line
    assert f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == (
        '{{- range .Messages }}<s>{{ if eq .Role "assistant" }}bot{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}</s>\n{{ end }}<s>bot\n'
    )


@pytest.mark.parametrize("messages", CHATS)
def test_ollama_template_in_go_renders_the_training_prompt(export, messages, tmp_path):
    """Ollama's template engine is Go's text/template; given the messages as Ollama passes
    them (its SYSTEM first when the chat has none), it renders the training prompt."""
    require_go()
    text = gguf.modelfile_path(export.gguf_f16).read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    ollama_messages = messages if messages and messages[0]["role"] == "system" else [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]  # fmt: skip
    (tmp_path / "main.go").write_text(GO_RENDER)
    (tmp_path / "input.json").write_text(json.dumps({"template": template, "messages": ollama_messages}))
    out = subprocess.run(["go", "run", "main.go"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == render_prompt(as_trained(messages))


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var input struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	data, _ := os.ReadFile("input.json")
	if err := json.Unmarshal(data, &input); err != nil {
		panic(err)
	}
	t := template.Must(template.New("").Parse(input.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": input.Messages}); err != nil {
		panic(err)
	}
}
"""


def test_write_streams_one_tensor_at_a_time(export, tmp_path):
    """Peak memory of the writer grows by about one tensor, not by the model (in a fresh process)."""
    model_bytes = random_gpt2(tmp_path / "big", export.model_dir, n_embd=512, n_layer=12, vocab_size=512)
    script = (
        "import re, sys, psutil\n"
        "from rugpt_assets.core.gguf import ModelCard, write_gguf_f16\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = psutil.Process().memory_info().rss\n"
        "write_gguf_f16(sys.argv[1], sys.argv[2], ModelCard('m', 'b', 'r', 'mit'))\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "print(peak - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big"), str(tmp_path / "big.gguf")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    growth = int(out.stdout.split()[-1])
    assert growth < model_bytes / 3, f"peak grew by {growth >> 20} MiB for a {model_bytes >> 20} MiB model"
    written = gguf.read_gguf(tmp_path / "big.gguf")
    assert {t.name: t.ne for t in written.tensors}["blk.11.ffn_up.weight"] == (512, 2048)


def test_untied_head_and_padding(export, tmp_path):
    random_gpt2(tmp_path / "untied", export.model_dir, n_embd=64, n_layer=1, vocab_size=520)
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    weights = load_file(tmp_path / "untied" / "model.safetensors")
    head = np.random.default_rng(1).standard_normal((520, 64), dtype=np.float32)
    from safetensors.numpy import save_file

    save_file({**weights, "lm_head.weight": head}, tmp_path / "untied" / "model.safetensors")
    gguf.write_gguf_f16(tmp_path / "untied", tmp_path / "untied.gguf", CARD)
    reader = GGUFReader(tmp_path / "untied.gguf")
    output = next(t for t in reader.tensors if t.name == "output.weight")
    np.testing.assert_array_equal(np.asarray(output.data), head.astype(np.float16))
    assert gguf.read_gguf(tmp_path / "untied.gguf").tokens[512:] == [f"[PAD{i}]" for i in range(512, 520)]


def test_failed_write_leaves_nothing(export, tmp_path, monkeypatch):
    from rugpt_assets.core import ggml

    calls = []
    original = ggml.load_tensor

    def failing(*args):
        calls.append(args)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return original(*args)

    monkeypatch.setattr(ggml, "load_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"), publish_file(tmp_path / "model-f16.gguf") as staged:
        gguf.write_gguf_f16(export.model_dir, staged, CARD)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model-f16.gguf.lock", ".model-f16.gguf.versions"]
    assert not list(versions_dir(tmp_path / "model-f16.gguf").iterdir())  # the Modelfile went with it


def test_bad_inputs_say_what_and_where(export, tmp_path):
    shutil.copytree(export.model_dir, tmp_path / "llama", ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((export.model_dir / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="cannot be exported to GGUF: model_type"):
        gguf.write_gguf_f16(tmp_path / "llama", tmp_path / "x.gguf", CARD)
    (tmp_path / "bad.gguf").write_bytes(b"lmgg" + bytes(64))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        gguf.read_gguf(tmp_path / "bad.gguf")
    with pytest.raises(ValueError, match='cannot contain """'):
        gguf.modelfile_text("m.gguf", 512, system_prompt='say """hi"""')
