"""Chat with an exported GGML or GGUF file in the terminal: `python -m rugpt_assets.chat --quant Q5_1`.

`--format ggml` (llm-rs, the default) or `gguf` (llama.cpp; needs the `gguf` extra);
`--quant f16|Q4_0|…|Q5_K_M|…` picks a materialized file of that format from the storage
layout; `--model PATH` any file written by this project (a `.gguf` suffix means GGUF). Prompts
use the gigasaiga template (system prompt, the history, `<s>bot`); a reply ends at `</s>`.
Sampling uses the seed's generation defaults. `/reset` clears the history, `/exit` (or end of
input) quits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rugpt_assets.core.chat_template import BOT_ROLE, Message, render_prompt
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, ExportConfig, GenerationConfig

if TYPE_CHECKING:  # imported when a file is loaded, not at start-up
    from rugpt_assets.core.evaluate import Generation

F16 = "f16"
FORMATS = ("ggml", "gguf")
DEFAULT_QUANT = {"ggml": "Q5_1", "gguf": "Q5_K_M"}


def resolve_model_path(quant: str, file_format: str = "ggml") -> Path:
    """The materialized file of `quant` (f16 or a QuantType/GGUFType name) in the storage layout."""
    from rugpt_assets import settings
    from rugpt_assets.core.artifacts import StorageLayout
    from rugpt_assets.core.gguf import GGUFType
    from rugpt_assets.core.quantize import QuantType

    layout = StorageLayout(settings.storage_root())
    types, f16_path, quantized_path = {
        "ggml": (QuantType, layout.ggml_f16, layout.ggml_quantized),
        "gguf": (GGUFType, layout.gguf_f16, layout.gguf_quantized),
    }[file_format]
    f16_asset, quantized_asset = f"{file_format}_f16", f"{file_format}_quantized"
    if quant.lower() == F16:
        path, how, select = f16_path, f"the asset {f16_asset}", f16_asset
    else:
        names = {q.name.lower(): q.name for q in types}
        if quant.lower() not in names:
            raise SystemExit(f"--quant {quant!r}: choose f16 or one of {', '.join(names.values())} (format {file_format})")
        name = names[quant.lower()]
        path, how = quantized_path(name), f"partition {name} of the asset {quantized_asset}"
        select = f"{quantized_asset} --partition {name}"
    if not path.is_file():
        raise SystemExit(
            f"{path} is not materialized yet: materialize {how} first "
            f"(e.g. in the Dagster UI, or `dagster asset materialize -m rugpt_assets.definitions --select {select}`)."
        )
    return path


@dataclass
class ChatSession:
    """The history and the prompt it renders to; trims the oldest turns to fit the context."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    history: list[Message] = field(default_factory=list)

    def prompt(self, count_tokens, budget: int) -> str:
        """The prompt for the next reply, dropping the oldest messages while it passes `budget` tokens."""
        while True:
            prompt = render_prompt(self.history, self.system_prompt)
            if count_tokens(prompt) <= budget or len(self.history) <= 1:
                return prompt
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]

    def reset(self) -> None:
        self.history = []


@dataclass
class Runtime:
    """One loaded file behind the chat loop, whichever the format."""

    n_ctx: int
    count_tokens: Callable[[str], int]
    generate: Callable[..., Generation]  # (prompt, max_new_tokens, sampling=, on_text=, seed=)
    load_time_s: float


def load_runtime(path: Path, file_format: str, threads: int) -> Runtime:
    from rugpt_assets.core import evaluate

    if file_format == "gguf":
        from rugpt_assets.core import gguf, gguf_eval

        if not gguf_eval.llama_available():
            raise SystemExit("--format gguf needs llama-cpp-python: install the project with the `gguf` extra")
        llama, load_time = gguf_eval.load_llama(path, threads, logits_all=False)
        return Runtime(
            gguf.read_gguf(path).n_ctx,
            lambda text: len(gguf_eval.tokenize(llama, text)),
            lambda *a, **kw: gguf_eval.generate(llama, *a, **kw),
            load_time,
        )
    from rugpt_assets.core import ggml

    model, load_time = evaluate.load_llm_rs(path, threads)
    return Runtime(
        ggml.read_hparams(path).n_ctx,
        lambda text: len(model.tokenize(text)),
        lambda *a, **kw: evaluate.generate(model, *a, **kw),
        load_time,
    )


def main(argv: list[str] | None = None) -> int:
    defaults = GenerationConfig()
    parser = argparse.ArgumentParser(
        prog="python -m rugpt_assets.chat",
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--format", choices=FORMATS, help="ggml (llm-rs) or gguf (llama.cpp); default: from --model's suffix, else ggml")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--quant", help="f16 or a quantization type of the format, from the storage layout (default: ggml Q5_1, gguf Q5_K_M)"
    )
    which.add_argument("--model", type=Path, help="a GGML or GGUF file instead of the storage layout's")
    parser.add_argument("--threads", type=int, default=ExportConfig().threads, help="inference threads")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="per reply")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    args = parser.parse_args(argv)

    file_format = args.format or ("gguf" if args.model and args.model.suffix == ".gguf" else "ggml")
    path = args.model or resolve_model_path(args.quant or DEFAULT_QUANT[file_format], file_format)
    try:
        runtime = load_runtime(path, file_format, args.threads)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from exc
    n_ctx = runtime.n_ctx
    # Leave room for a reply: the history is trimmed so the prompt takes at most half the context.
    budget = n_ctx - min(args.max_new_tokens, n_ctx // 2)
    print(f"{path.name} loaded in {runtime.load_time_s:.2f} s; /reset clears the chat, /exit quits.", file=sys.stderr)

    session = ChatSession(args.system_prompt)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        session.history.append({"role": "user", "content": text})
        prompt = session.prompt(runtime.count_tokens, budget)
        used = runtime.count_tokens(prompt)
        if used >= n_ctx:
            session.history.pop()
            print(f"(message too long for the model's context of {n_ctx} tokens)", file=sys.stderr)
            continue
        print("bot> ", end="", flush=True)
        reply = runtime.generate(
            prompt,
            min(args.max_new_tokens, n_ctx - used),
            sampling=defaults,
            on_text=lambda chunk: print(chunk, end="", flush=True),
            seed=args.seed,
        )
        print()
        session.history.append({"role": BOT_ROLE, "content": reply.text.strip()})
        end = "end of reply" if reply.ended else "length limit"
        print(
            f"(reply: {reply.new_tokens} tokens at {reply.tokens_per_s:.1f} tokens/s, {end}; "
            f"context {used + reply.new_tokens}/{n_ctx} tokens)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
