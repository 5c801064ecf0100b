"""The chat CLI, driven through stdin like a user would."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from rugpt_assets.chat import ChatSession, resolve_model_path
from rugpt_assets.core.chat_template import render_prompt
from rugpt_assets_tests.core.test_gguf import gguf_demo
from rugpt_assets_tests.gguf_support import require_llama_cpp


@pytest.fixture(scope="session")
def export(tmp_path_factory):
    return gguf_demo(tmp_path_factory)


@pytest.mark.parametrize("file_format", ["ggml", "gguf"])
def test_two_turns_reset_and_exit(export, file_format):
    if file_format == "gguf":
        require_llama_cpp()
    stdin = "Назови столицу России.\nЧто такое ёжик?\n/reset\nНазови столицу России.\n/exit\nnot read\n"
    path = export.f16 if file_format == "ggml" else export.gguf_f16
    args = ["--model", str(path), "--threads", "1", "--max-new-tokens", "64"]
    out = subprocess.run([sys.executable, "-m", "rugpt_assets.chat", *args], input=stdin, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    replies = re.findall(r"bot> (.*)", out.stdout)
    # every reply stopped at </s>, not at the token limit
    status = re.findall(r"reply: (\d+) tokens .*, end of reply; context (\d+)/", out.stderr)
    status = [tuple(map(int, m)) for m in status]
    assert len(replies) == 3 and len(status) == 3, out.stdout + out.stderr
    assert all(replies) and "<s>" not in out.stdout and "</s>" not in out.stdout
    (_, first), (_, second), (_, after_reset) = status
    assert second > first  # the second prompt carries the first turn
    assert "(history cleared)" in out.stderr
    assert after_reset == first and replies[2] == replies[0]  # same fresh prompt, seeded sampling
    assert out.stdout.count("user> ") == 5  # nothing was read after /exit


def test_missing_file_says_what_to_materialize(tmp_path, monkeypatch):
    monkeypatch.setenv("RUGPT_STORAGE_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match=r"not materialized yet.*partition Q5_1 of the asset ggml_quantized"):
        resolve_model_path("q5_1")
    with pytest.raises(SystemExit, match="materialize the asset ggml_f16"):
        resolve_model_path("f16")
    with pytest.raises(SystemExit, match="choose f16 or one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0"):
        resolve_model_path("Q3_K")
    (tmp_path / "ggml").mkdir()
    (tmp_path / "ggml" / "model-q8_0.bin").write_bytes(b"x")
    assert resolve_model_path("Q8_0") == tmp_path / "ggml" / "model-q8_0.bin"
    with pytest.raises(SystemExit, match=r"partition Q5_K_M of the asset gguf_quantized.*--select gguf_quantized --partition Q5_K_M"):
        resolve_model_path("q5_k_m", "gguf")
    with pytest.raises(SystemExit, match="choose f16 or one of Q4_K_M, Q5_K_M, Q6_K, Q8_0 \\(format gguf\\)"):
        resolve_model_path("Q5_1", "gguf")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model-f16.gguf").write_bytes(b"x")
    assert resolve_model_path("F16", "gguf") == tmp_path / "gguf" / "model-f16.gguf"


def test_history_is_trimmed_oldest_first():
    session = ChatSession(system_prompt="S")
    session.history = [
        {"role": "user", "content": "a" * 50},
        {"role": "bot", "content": "b" * 50},
        {"role": "user", "content": "c"},
    ]
    full = session.prompt(len, budget=10_000)
    assert full == render_prompt(session.history, "S") and "a" * 50 in full
    trimmed = session.prompt(len, budget=60)
    assert session.history == [{"role": "user", "content": "c"}]
    assert trimmed == render_prompt([{"role": "user", "content": "c"}], "S")
