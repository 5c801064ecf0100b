"""Chat with an exported GGML file in the terminal: `python -m rugpt_assets.chat --quant Q5_1`.

`--quant f16|Q4_0|…` picks a materialized file from the storage layout; `--model PATH` any
file written by `ggml.write_ggml_f16`/`quantize_ggml`. Prompts use the gigasaiga template
(system prompt, the history, `<s>bot`); a reply ends at `</s>`. Sampling uses the seed's
generation defaults. `/reset` clears the history, `/exit` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rugpt_assets.core.chat_template import BOT_ROLE, Message, render_prompt
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, ExportConfig, GenerationConfig

F16 = "f16"


def resolve_model_path(quant: str) -> Path:
    """The materialized file of `quant` (f16 or a QuantType name) in the storage layout."""
    from rugpt_assets import settings
    from rugpt_assets.core.artifacts import StorageLayout
    from rugpt_assets.core.quantize import QuantType

    layout = StorageLayout(settings.storage_root())
    if quant.lower() == F16:
        path, how = layout.ggml_f16, "the asset ggml_f16"
    else:
        names = {q.name.lower(): q.name for q in QuantType}
        if quant.lower() not in names:
            raise SystemExit(f"--quant {quant!r}: choose f16 or one of {', '.join(names.values())}")
        name = names[quant.lower()]
        path, how = layout.ggml_quantized(name), f"partition {name} of the asset ggml_quantized"
    if not path.is_file():
        raise SystemExit(
            f"{path} is not materialized yet: materialize {how} first "
            f"(e.g. in the Dagster UI, or `dagster asset materialize -m rugpt_assets.definitions "
            f"--select {'ggml_f16' if quant.lower() == F16 else 'ggml_quantized --partition ' + name}`)."
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


def main(argv: list[str] | None = None) -> int:
    from rugpt_assets.core import evaluate, ggml

    defaults = GenerationConfig()
    parser = argparse.ArgumentParser(
        prog="python -m rugpt_assets.chat",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quant", default="Q5_1", help="f16 or a quantization type, from the storage layout")
    which.add_argument("--model", type=Path, help="a GGML file instead of the storage layout's")
    parser.add_argument("--threads", type=int, default=ExportConfig().threads, help="llm-rs threads")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="per reply")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    args = parser.parse_args(argv)

    path = args.model or resolve_model_path(args.quant)
    try:
        model, load_time = evaluate.load_llm_rs(path, args.threads)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from exc
    n_ctx = ggml.read_hparams(path).n_ctx
    # Leave room for a reply: the history is trimmed so the prompt takes at most half the context.
    budget = n_ctx - min(args.max_new_tokens, n_ctx // 2)
    print(f"{path.name} loaded in {load_time:.2f} s; /reset clears the chat, /exit quits.", file=sys.stderr)

    def count_tokens(text: str) -> int:
        return len(model.tokenize(text))

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
        prompt = session.prompt(count_tokens, budget)
        used = count_tokens(prompt)
        if used >= n_ctx:
            session.history.pop()
            print(f"(message too long for the model's context of {n_ctx} tokens)", file=sys.stderr)
            continue
        print("bot> ", end="", flush=True)
        reply = evaluate.generate(
            model,
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
