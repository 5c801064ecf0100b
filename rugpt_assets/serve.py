"""Serve a GGUF file through llama-cpp-python's OpenAI-compatible server:
`python -m rugpt_assets.serve --quant Q5_K_M` (needs the `gguf` extra).

Any OpenAI client then talks to `http://127.0.0.1:8000/v1` (chat completions, streaming,
completions, models). The server formats chats with the GGUF file's own chat template (the
gigasaiga one, default system prompt included) and stops a reply at `</s>`. Sampling
parameters a request leaves out are the seed's (temperature 0.2, top_p 0.9, top_k 30,
repetition penalty 1.15), not the server's generic defaults. Binds to 127.0.0.1 unless
`--host` (or RUGPT_HOST) says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rugpt_assets.core.configs import ExportConfig, GenerationConfig

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def seed_sampling(generation: GenerationConfig = GenerationConfig()) -> dict:
    """The seed's sampling in llama-cpp-python's request fields (no min-p, as in the seed)."""
    return {
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "top_k": generation.top_k,
        "min_p": 0.0,
        "repeat_penalty": generation.repetition_penalty,
    }


class SamplingDefaults:
    """ASGI middleware: a completion request's missing sampling fields get `defaults`.

    llama-cpp-python's server fills them from its own generic defaults (temperature 0.8, …),
    which are not what this model was tuned with; a client that says nothing gets the seed's."""

    def __init__(self, app, defaults: dict):
        self.app = app
        self.defaults = defaults

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in COMPLETION_PATHS:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            request = json.loads(body)
        except ValueError:
            request = None  # the server answers malformed JSON itself
        if isinstance(request, dict):
            body = json.dumps({**self.defaults, **request}, ensure_ascii=False).encode("utf-8")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. the client disconnecting mid-stream
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)


def create_app(path: Path, threads: int, alias: str):
    """llama-cpp-python's FastAPI app for one GGUF file, with the seed's sampling defaults."""
    from llama_cpp.server.app import create_app as llama_server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from rugpt_assets.core import gguf

    n_ctx = gguf.read_gguf(path).n_ctx
    model = ModelSettings(
        model=str(path),
        model_alias=alias,
        n_ctx=n_ctx,  # the model's own: a longer context reads past the position table
        n_batch=min(512, n_ctx),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        last_n_tokens_size=n_ctx,  # repetition penalty over the whole context, as in transformers
        chat_format=None,  # the file's tokenizer.chat_template
        verbose=False,
    )
    app = llama_server_app(server_settings=ServerSettings(), model_settings=[model])
    return SamplingDefaults(app, seed_sampling())


def main(argv: list[str] | None = None) -> int:
    from rugpt_assets import settings
    from rugpt_assets.chat import resolve_model_path
    from rugpt_assets.core import gguf_eval

    parser = argparse.ArgumentParser(
        prog="python -m rugpt_assets.serve",
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quant", default="Q5_K_M", help="f16 or a GGUF quantization type, from the storage layout")
    which.add_argument("--model", type=Path, help="a GGUF file instead of the storage layout's")
    parser.add_argument("--host", default=settings.environment().serve_host)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=ExportConfig().threads, help="llama.cpp threads")
    parser.add_argument("--alias", default="rugpt", help="the model name clients ask for")
    args = parser.parse_args(argv)

    if not gguf_eval.llama_available():
        raise SystemExit("serving needs llama-cpp-python: install the project with the `gguf` extra")
    path = args.model or resolve_model_path(args.quant, "gguf")
    if not path.is_file():
        raise SystemExit(f"GGUF file {path} does not exist")
    import uvicorn

    app = create_app(path, args.threads, args.alias)
    print(f"serving {path.name} as {args.alias!r} at http://{args.host}:{args.port}/v1 — Ctrl+C stops it", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
