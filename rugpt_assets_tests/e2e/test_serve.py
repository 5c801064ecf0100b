"""`python -m rugpt_assets.serve --quant Q5_K_M` as a user runs it, talked to with the official
`openai` client: chat completion and streaming, the chat template applied by the server, the
reply ending at </s>; and the seed's sampling defaults for requests that leave them out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from rugpt_assets.core import gguf
from rugpt_assets.core.chat_template import render_prompt
from rugpt_assets_tests.core.test_gguf import gguf_demo
from rugpt_assets_tests.e2e.dagster_dev import free_port, interrupt
from rugpt_assets_tests.gguf_support import require_llama_cpp

require_llama_cpp()

from rugpt_assets.core import gguf_eval  # noqa: E402  (only with llama-cpp-python)
from rugpt_assets.serve import SamplingDefaults, seed_sampling  # noqa: E402

MESSAGES: list[Any] = [{"role": "user", "content": "Привет! Как дела?"}]  # openai's message dicts
GREEDY = {"temperature": 0.0, "max_tokens": 200, "extra_body": {"repeat_penalty": 1.0}}


@contextlib.contextmanager
def serving(args: list[str], env: dict, port: int):
    process = subprocess.Popen(
        [sys.executable, "-m", "rugpt_assets.serve", *args, "--port", str(port), "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline, models = time.monotonic() + 120, None
        while models is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
                    models = json.load(answer)
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not come up:\n{process.stdout.read()}") from None
                time.sleep(0.5)
        yield models
    finally:
        interrupt(process)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """A storage root holding the demo model's Q5_K_M GGUF, where `--quant Q5_K_M` finds it."""
    export = gguf_demo(tmp_path_factory)
    root = tmp_path_factory.mktemp("serve-artifacts")
    gguf.quantize_gguf(export.gguf_f16, gguf.GGUFType.Q5_K_M, root / "gguf" / "model-q5_k_m.gguf", threads=1)
    return root


@pytest.mark.e2e
def test_openai_client_chat_and_stream(storage):
    import openai

    path = storage / "gguf" / "model-q5_k_m.gguf"
    llama, _ = gguf_eval.load_llama(path, threads=1, logits_all=False)  # as the server loads it
    prompt = render_prompt(MESSAGES)  # the gigasaiga prompt, default system prompt included
    expected = gguf_eval.generate(llama, prompt, GREEDY["max_tokens"])
    assert expected.ended and expected.text  # the file's own greedy reply ends at </s>
    prompt_tokens = len(gguf_eval.tokenize(llama, prompt))
    del llama

    port = free_port()
    env = {**os.environ, "RUGPT_STORAGE_DIR": str(storage)}
    with serving(["--quant", "Q5_K_M"], env, port) as models:
        assert [m["id"] for m in models["data"]] == ["rugpt"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-checked")

        reply = client.chat.completions.create(model="rugpt", messages=MESSAGES, **GREEDY)
        choice = reply.choices[0]
        # The server built the training prompt from the file's template: same prompt length,
        # same greedy continuation; the reply stopped at </s>, which is not part of it.
        assert reply.usage.prompt_tokens == prompt_tokens
        assert choice.message.content == expected.text and "</s>" not in choice.message.content
        assert choice.finish_reason == "stop" and reply.usage.completion_tokens < GREEDY["max_tokens"]

        stream = client.chat.completions.create(model="rugpt", messages=MESSAGES, stream=True, **GREEDY)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected.text and len(chunks) > 2
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_requests_without_sampling_get_the_seeds():
    seen = []

    async def app(scope, receive, send):
        message = await receive()
        seen.append((dict(scope["headers"]), json.loads(message["body"])))

    async def call(path: str, body: dict):
        raw = json.dumps(body).encode()
        messages = [{"type": "http.request", "body": raw[:5], "more_body": True},
                    {"type": "http.request", "body": raw[5:], "more_body": False}]  # fmt: skip

        async def receive():
            return messages.pop(0)

        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(len(raw)).encode())]}
        await SamplingDefaults(app, seed_sampling())(scope, receive, None)

    asyncio.run(call("/v1/chat/completions", {"messages": [], "temperature": 0.7}))
    asyncio.run(call("/v1/completions", {"prompt": "x"}))
    (headers, chat), (_, completion) = seen
    assert chat == {**seed_sampling(), "messages": [], "temperature": 0.7}  # what the client set stays
    assert completion == {**seed_sampling(), "prompt": "x"}
    assert seed_sampling() == {"temperature": 0.2, "top_p": 0.9, "top_k": 30, "min_p": 0.0, "repeat_penalty": 1.15}
    assert int(headers[b"content-length"]) == len(json.dumps(chat).encode())
