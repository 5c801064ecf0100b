"""What a GGUF file is worth, measured in llama.cpp itself (llama-cpp-python): load time,
generation speed, tokenization against HF, greedy agreement with HF, and perplexity and KL to
f16 from llama.cpp's own logits.

Perplexity and KL use the same validation chats, tokenization and formulas as the GGML files
(`evaluate.evaluation_chats`, `evaluate.score_chats`, `evaluate.quality`): the chats are
tokenized by HF exactly as for training and the ids are fed to llama.cpp, so every GGML and
GGUF file is scored on the same target tokens. Unlike the GGML numbers (weights dequantized
into an HF model), these include ggml's own arithmetic (8-bit activations in quantized
matmuls).

llama-cpp-python is an optional extra (`gguf`): it is imported only when a function runs.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rugpt_assets.core import evaluate, gguf
from rugpt_assets.core.chat_template import render_prompt
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, ExportConfig, GenerationConfig

# Text the tokenizer must split exactly as HF does: Cyrillic with ё, «», —, digits, emoji, CJK,
# tabs, runs of spaces and newlines, and the template's literal special tokens.
TOKENIZATION_PROBES = (
    "Привет! Как дела? Ёжик и ёлка: «цитата» — тире… ЁЁЁ",
    "emoji 😀🚀👍🏽 and CJK 漢字かな",
    "tab\there\t\tnewline\n\n  двойной   пробел \t",
    "<s>system\nТы — ассистент.</s>\n<s>user\nПривет</s>\n<s>bot\n",
    "Номер 123456789, 3.14159; x=y+1 — «ёмкость».",
)


def llama_available() -> bool:
    """Whether the `gguf` extra (llama-cpp-python) is installed."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def load_llama(path: Path, threads: int, logits_all: bool = True):
    """The file in llama.cpp; returns (Llama, load seconds).

    The context is the model's own n_positions (a longer one reads past the position table);
    threads are fixed for generation and batches alike, so figures compare with llm-rs's at
    the same thread count. The repetition penalty window is the whole context, as in
    transformers. `logits_all` keeps every position's logits (perplexity, greedy agreement).
    """
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    n_ctx = gguf.read_gguf(path).n_ctx
    start = time.perf_counter()
    llama = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(512, n_ctx),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        last_n_tokens_size=n_ctx,
        verbose=False,
    )
    return llama, time.perf_counter() - start


def tokenize(llama, text: str) -> list[int]:
    """llama.cpp's ids for `text`, literal `<s>`/`</s>` as special tokens (as HF does), no BOS."""
    return llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def tokenization_mismatches(llama, tokenizer, texts: Sequence[str] = TOKENIZATION_PROBES) -> list[dict]:
    """The texts whose llama.cpp ids differ from HF's, with both."""
    out = []
    for text in texts:
        ours, theirs = tokenize(llama, text), tokenizer.encode(text, add_special_tokens=False)
        if ours != theirs:
            out.append({"text": text, "llama_cpp": ours, "hf": theirs})
    return out


def llama_logits(llama) -> evaluate.LogitsFn:
    """llama.cpp's own next-token logits at every position of `ids` (needs `logits_all`)."""

    def logits_of(ids: list[int]) -> torch.Tensor:
        llama.reset()
        llama.eval(ids)
        return torch.from_numpy(np.array(llama.scores[: len(ids)], dtype=np.float32))

    return logits_of


def greedy_tokens(llama, prompt: str, n: int) -> tuple[list[int], float]:
    """n argmax tokens of llama.cpp's logits after `prompt` (no penalties, no stop token) and
    the decoding speed in tokens/s (prompt excluded)."""
    llama.reset()
    llama.eval(tokenize(llama, prompt))
    out = []
    start = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
        out.append(token)
        llama.eval([token])
    return out, n / max(time.perf_counter() - start, 1e-9)


def greedy_agreement(gguf_path: Path, model_dir: Path, prompt: str, n: int, threads: int) -> dict:
    """Greedy tokens of the GGUF file in llama.cpp against the HF model in `model_dir`."""
    hf = evaluate.greedy_tokens_hf(model_dir, prompt, n)
    llama, _ = load_llama(gguf_path, threads)
    ours, _ = greedy_tokens(llama, prompt, n)
    matching = next((i for i, (a, b) in enumerate(zip(ours, hf)) if a != b), min(len(ours), len(hf)))
    return {"tokens": n, "matching_prefix": matching, "equal": ours == hf, "llama_cpp": ours, "hf": hf}


def generate(
    llama,
    prompt: str,
    max_new_tokens: int,
    sampling: GenerationConfig | None = None,
    on_text: Callable[[str], None] | None = None,
    seed: int = 42,
) -> evaluate.Generation:
    """Generate with llama.cpp's sampler until an end-of-generation token (`</s>`) or the
    limit. `sampling=None` is greedy; otherwise the seed's settings (llama.cpp has no
    no_repeat_ngram_size). Pieces are as `evaluate.Generation` defines them."""
    from llama_cpp import llama_cpp as low

    if sampling is None:
        options = {"temp": 0.0, "repeat_penalty": 1.0}
    else:
        llama.set_seed(seed)
        options = {
            "temp": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "min_p": 0.0,
            "repeat_penalty": sampling.repetition_penalty,
        }
    vocab = low.llama_model_get_vocab(llama.model)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces, chunks, ended = [], [], False

    def emit(chunk: str) -> None:
        if chunk:
            chunks.append(chunk)
            if on_text:
                on_text(chunk)

    prompt_ids = tokenize(llama, prompt)
    start = None
    for token in llama.generate(prompt_ids, **options):
        start = start or time.perf_counter()  # the first token comes after the prompt is fed
        if low.llama_vocab_is_control(vocab, token) or low.llama_vocab_is_eog(vocab, token):
            pieces.append("")
            ended = True
            break
        pieces.append(llama._model.token_get_text(token))
        emit(utf8.decode(llama.detokenize([token])))
        if len(pieces) >= max_new_tokens:
            break
    emit(utf8.decode(b"", final=True))
    # The first token's time is the prompt's; the rate is over the tokens after it.
    seconds = time.perf_counter() - start if start else 0.0
    return evaluate.Generation("".join(chunks), pieces, (len(pieces) - 1) / max(seconds, 1e-9), ended)


def evaluate_gguf_file(
    path: Path,
    model_dir: Path,
    val_chats: Sequence[dict],
    export: ExportConfig = ExportConfig(),
    f16_path: Path | None = None,
) -> dict:
    """Every number a GGUF asset reports about one file, with the same keys as
    `evaluate.evaluate_ggml_file` (one table holds both), plus `tensor_types`."""
    from transformers import AutoTokenizer

    path = Path(path)
    numbers = gguf.file_figures(path, f16_path or path)
    llama, load_time = load_llama(path, export.threads)
    prompt = render_prompt([{"role": "user", "content": export.check_prompt}])
    sample = generate(llama, prompt, export.check_new_tokens)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    chats = evaluate.evaluation_chats(val_chats, export)
    models = {path: llama}

    def score(gguf_path: Path) -> evaluate.Scored:
        model = models.get(gguf_path) or load_llama(gguf_path, export.threads)[0]
        return evaluate.score_chats(llama_logits(model), tokenizer, chats, export.eval_max_tokens, DEFAULT_SYSTEM_PROMPT)

    return {
        **numbers,
        **evaluate.quality(score, path, f16_path),
        "load_time_s": load_time,
        "generation_tokens_per_s": sample.tokens_per_s,
        "eval_chats": len(chats),
        "sample_prompt": export.check_prompt,
        "sample_text": sample.text,
        "tensor_types": gguf.read_gguf(path).type_counts(),
    }
