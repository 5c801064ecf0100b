"""What a GGUF file is worth, measured in llama.cpp itself (llama-cpp-python): load time,
generation speed, tokenization against HF, greedy agreement with HF, and perplexity and KL to
f16 from llama.cpp's own logits.

Perplexity and KL use the same evaluation set and formulas as the GGML files
(`scoring.EvalSet`, `scoring.Scores`, `scoring.Reference`): the validation chats tokenized by
HF exactly as for training, fed to llama.cpp as ids, so every GGML and GGUF file is scored on
the same target tokens (same content hash). The GGUF f16 file is the reference of the GGUF
quantizations' KL, as GGML's f16 is of GGML's. Unlike the GGML numbers (dequantized weights in
a torch forward pass), these include ggml's own arithmetic (8-bit activations in quantized
matmuls).

llama-cpp-python is an optional extra (`gguf`): it is imported only when a function runs.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from rugpt_assets.core import evaluate, gguf
from rugpt_assets.core.chat_template import render_prompt
from rugpt_assets.core.configs import ExportConfig, GenerationConfig
from rugpt_assets.core.scoring import EvalSet, Reference, Scores

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


def llama_logits(llama, ids: Sequence[int]) -> torch.Tensor:
    """llama.cpp's own next-token logits (len(ids), n_vocab) at every position of `ids`
    (needs `logits_all`)."""
    llama.reset()
    llama.eval(list(ids))
    return torch.from_numpy(np.array(llama.scores[: len(ids)], dtype=np.float32))


def target_logprobs(llama, eval_set: EvalSet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Next-token log-probs and target ids at every target token of `eval_set`, in its order,
    one chat at a time, from llama.cpp's logits."""
    for chat, (ids, _) in enumerate(eval_set.chats):
        positions, targets = eval_set.targets(chat)
        yield torch.log_softmax(llama_logits(llama, ids)[positions], dim=-1), torch.tensor(targets)


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
    """Greedy tokens of the GGUF file in llama.cpp against the merged model in `model_dir`: its
    safetensors, streamed, verifying llama.cpp's tokens as a draft in one pass as the GGML
    check does (`evaluate.greedy_agreement`; llama.cpp reports exact ids, special ones too).
    Returns `hf`: the reference's greedy tokens up to and including the first disagreement."""
    llama, _ = load_llama(gguf_path, threads)
    prompt_ids = tokenize(llama, prompt)
    ours, _ = greedy_tokens(llama, prompt, n)
    del llama
    weights = evaluate.CheckpointWeights(model_dir)
    chosen = evaluate.next_token_argmax(weights, prompt_ids + ours[:-1], len(prompt_ids) - 1)
    matching = next((i for i, (a, b) in enumerate(zip(ours, chosen)) if a != b), len(ours))
    return {"tokens": n, "matching_prefix": matching, "equal": matching == n == len(ours), "llama_cpp": ours,
            "hf": chosen[: matching + 1]}  # fmt: skip


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
    if vocab is None:
        raise RuntimeError("llama.cpp returned no vocabulary for the loaded model")
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
    path: Path, eval_set: EvalSet, export: ExportConfig = ExportConfig(), f16_path: Path | None = None
) -> tuple[dict, Reference | None]:
    """Every number a GGUF asset reports about one file (the keys of
    `evaluate.evaluate_ggml_file`, so one table holds both, plus `tensor_types`), and, for the
    f16 file, its reference for KL. With `f16_path` the file is compared with the GGUF f16
    file's stored reference (`evaluate.read_reference`)."""
    path = Path(path)
    reference = evaluate.read_reference(f16_path, eval_set, "gguf_f16") if f16_path is not None else None
    numbers = gguf.file_figures(path, f16_path or path)
    llama, load_time = load_llama(path, export.threads)
    prompt = render_prompt([{"role": "user", "content": export.check_prompt}], eval_set.system_prompt)
    sample = generate(llama, prompt, export.check_new_tokens)

    scores = Scores(reference, top_k=0 if reference else export.kl_top_k)
    start = time.perf_counter()
    for logprobs, targets in target_logprobs(llama, eval_set):
        scores.add(logprobs, targets)
    numbers |= {
        "load_time_s": load_time,
        "eval_time_s": time.perf_counter() - start,
        "tensor_types": gguf.read_gguf(path).type_counts(),
    }
    return evaluate.file_numbers(path, numbers, sample, scores, eval_set, export)
