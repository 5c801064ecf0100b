"""What a GGML file is worth: load time and speed in llm-rs, perplexity, greedy agreement with HF.

llm-rs exposes no logits, so perplexity is measured on an HF GPT-2 that carries the file's own
weights, dequantized to float32 (`ggml.ggml_to_hf_model`). It captures the weight rounding of
each type — the quality cost of quantization — though not ggml's own arithmetic (8-bit
activations in quantized matmuls), which the greedy check against llm-rs covers for f16.

Perplexity is only-target: exp of the mean negative log-likelihood of the bot tokens of each
validation chat, tokenized exactly as for training (`chat_template.tokenize_chat`), so it is
the training eval loss of the same chats. The same function and chats serve f16 and every
quantized file, so the deltas between them are paired.
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from llm_rs import GenerationConfig as LlmRsGenerationConfig
from llm_rs import Gpt2, SessionConfig

from rugpt_assets.core import ggml
from rugpt_assets.core.chat_template import IGNORE_INDEX, render_prompt, tokenize_chat
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, ExportConfig, GenerationConfig


def load_llm_rs(path: Path, threads: int) -> tuple[Gpt2, float]:
    """The file in llm-rs with its BPE tokenizer sidecar; returns (model, load seconds).

    Threads are always set: llm-rs's default oversubscribes small machines (DESIGN §5). The
    context is the model's own n_ctx: llm-rs would otherwise allow 2048 positions and read
    past a smaller position table.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGML file {path} does not exist")
    tokenizer = ggml.tokenizer_sidecar(path)
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer} is missing; write GGML files with ggml.write_ggml_f16 / quantize_ggml")
    contents = ggml.read_ggml(path)
    if problems := ggml.llm_rs_load_problems(contents):
        raise ValueError(f"llm-rs 0.2.15 cannot load {path}: " + "; ".join(problems))
    session = SessionConfig(threads=threads, context_length=contents.hparams.n_ctx)
    start = time.perf_counter()
    model = Gpt2(str(path), session, str(tokenizer))
    return model, time.perf_counter() - start


class TokenText:
    """Text from llm-rs's generated pieces: each is one token's byte-level string (the
    sidecar's `Fuse` decoder), turned back into bytes and decoded as UTF-8 across tokens."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: str) -> str:
        return self._utf8.decode(bytes(ggml.BYTE_OF_CHAR[ch] for ch in piece))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@dataclass(frozen=True)
class Generation:
    text: str
    pieces: list[str] = field(repr=False)  # one per token: byte-level string, "" for a special token
    tokens_per_s: float  # generated tokens over generation time, prompt feeding excluded
    ended: bool  # stopped at a special token (`</s>` ends a reply) rather than at the length limit

    @property
    def new_tokens(self) -> int:
        return len(self.pieces)


def generate(
    model: Gpt2,
    prompt: str,
    max_new_tokens: int,
    sampling: GenerationConfig | None = None,
    stop_at_special: bool = True,
    on_text: Callable[[str], None] | None = None,
    seed: int = 42,
) -> Generation:
    """Generate with llm-rs. `sampling=None` is greedy (top_k=1, no repetition penalty: the
    HF-comparable mode); otherwise the seed's sampling settings (llm-rs has no
    no_repeat_ngram_size). `on_text` receives the text as it is produced."""
    if sampling is None:
        config = LlmRsGenerationConfig(
            top_k=1, top_p=1.0, temperature=1.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens
        )
    else:
        config = LlmRsGenerationConfig(
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            temperature=sampling.temperature,
            repetition_penalty=sampling.repetition_penalty,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
    pieces: list[str] = []
    chunks: list[str] = []
    text = TokenText()
    ended = False

    def on_piece(piece: str) -> bool:
        nonlocal ended
        pieces.append(piece)
        if piece == "" and stop_at_special:
            ended = True
            return True  # tells llm-rs to stop
        chunk = text.push(piece)
        if chunk:
            chunks.append(chunk)
            if on_text:
                on_text(chunk)
        return False

    start = time.perf_counter()
    result = model.generate(prompt, config, callback=on_piece)
    seconds = time.perf_counter() - start - result.times.prompt_feeding / 1000
    if tail := text.flush():
        chunks.append(tail)
        if on_text:
            on_text(tail)
    return Generation("".join(chunks), pieces, len(pieces) / max(seconds, 1e-6), ended)


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


@torch.inference_mode()
def greedy_tokens(model, tokenizer, prompt: str, n: int) -> list[int]:
    """n greedy next tokens (argmax, no penalties, no stop token), with the KV cache."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    cache, out = None, []
    for _ in range(n):
        step = model(input_ids=ids, cache=cache, use_cache=True)
        cache = step.cache
        ids = step.logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(ids))
    return out


def greedy_tokens_hf(model_dir: Path, prompt: str, n: int) -> list[int]:
    model, tokenizer = load_hf(model_dir)
    return greedy_tokens(model, tokenizer, prompt, n)


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """HF ids as llm-rs reports generated tokens: byte-level strings, "" for special tokens."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ["" if i in special else tokenizer.convert_ids_to_tokens(i) for i in ids]


def greedy_agreement(ggml_path: Path, model_dir: Path, prompt: str, n: int, threads: int) -> dict:
    """Greedy tokens of the GGML file in llm-rs against the HF model in `model_dir`."""
    from transformers import AutoTokenizer

    hf_ids = greedy_tokens_hf(model_dir, prompt, n)
    expected = token_pieces(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False), hf_ids)
    model, _ = load_llm_rs(ggml_path, threads)
    got = generate(model, prompt, n, stop_at_special=False).pieces
    matching = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    return {"tokens": n, "matching_prefix": matching, "equal": got == expected, "llm_rs": got, "hf": expected}


Scored = list[tuple[torch.Tensor, torch.Tensor]]  # per chat: log-probs (tokens, vocab), target ids
# A model as evaluation sees it: token ids → next-token logits at every position (len(ids), vocab).
LogitsFn = Callable[[list[int]], torch.Tensor]


def hf_logits(model) -> LogitsFn:
    """An HF causal LM as a `LogitsFn`."""
    return lambda ids: model(input_ids=torch.tensor([ids])).logits[0]


def evaluation_chats(val_chats: Sequence[dict], export: ExportConfig) -> list[dict]:
    """The validation chats every exported file is scored on (GGML and GGUF alike)."""
    return list(val_chats)[: export.eval_chats]


@torch.inference_mode()
def score_chats(logits_of: LogitsFn, tokenizer, chats: Sequence[dict], max_tokens: int, system_prompt: str) -> Scored:
    """Next-token log-probabilities at the target (bot) positions of each chat."""
    scored = []
    for chat in chats:
        input_ids, labels = tokenize_chat(chat["messages"], tokenizer, max_tokens, system_prompt)
        targets = torch.tensor(labels[1:], dtype=torch.long)
        keep = targets != IGNORE_INDEX
        if keep.any():
            logits = logits_of(input_ids)[:-1]
            scored.append((logits[keep].float().log_softmax(-1), targets[keep]))
    if not scored:
        raise ValueError(f"none of the {len(chats)} chats has a bot message within {max_tokens} tokens")
    return scored


def _perplexity(scored: Scored) -> float:
    nll = sum(-lp.gather(1, t[:, None]).sum().item() for lp, t in scored)
    return math.exp(nll / sum(len(t) for _, t in scored))


def _kl_divergence(reference: Scored, scored: Scored) -> float:
    """Mean KL(reference || scored) per target token, in nats."""
    kl_div = torch.nn.functional.kl_div
    kl = sum(kl_div(q, p, log_target=True, reduction="sum").item() for (p, _), (q, _) in zip(reference, scored))
    return kl / sum(len(t) for _, t in scored)


def perplexity(
    model, tokenizer, chats: Sequence[dict], max_tokens: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> float:
    """Only-target perplexity over `chats` (rows with `messages`), see the module docstring."""
    return _perplexity(score_chats(hf_logits(model), tokenizer, chats, max_tokens, system_prompt))


def quality(score: Callable[[Path], Scored], path: Path, f16_path: Path | None) -> dict:
    """Perplexity of the file at `path` and, with `f16_path` (its source), the mean KL divergence
    of its next-token distributions from the f16 file's on the same target tokens. `score`
    gives one file's `Scored` on the evaluation chats.

    Unlike a perplexity delta, which on a small model is dominated by first-order noise of
    either sign, KL is never negative and grows with the rounding error, so it ranks the types
    reliably; it costs a second pass over the chats."""
    scored = score(Path(path))
    numbers = {"perplexity": _perplexity(scored)}
    if f16_path is not None and Path(f16_path).resolve() != Path(path).resolve():
        numbers["kl_to_f16"] = _kl_divergence(score(Path(f16_path)), scored)
    return numbers


def evaluate_ggml_file(
    path: Path,
    model_dir: Path,
    val_chats: Sequence[dict],
    export: ExportConfig = ExportConfig(),
    f16_path: Path | None = None,
) -> dict:
    """Every number an export asset reports about one GGML file.

    `model_dir` (the merged model) provides the architecture config and the tokenizer. With
    `f16_path` (a quantized file's source), also `ratio_to_f16` and `kl_to_f16` (`quality`).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    numbers = ggml.file_figures(path, f16_path or path)
    model, load_time = load_llm_rs(path, export.threads)
    prompt = render_prompt([{"role": "user", "content": export.check_prompt}])
    sample = generate(model, prompt, export.check_new_tokens)
    del model

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    chats = evaluation_chats(val_chats, export)

    def score(ggml_path: Path) -> Scored:
        hf_model = ggml.ggml_to_hf_model(ggml_path, model_dir)
        return score_chats(hf_logits(hf_model), tokenizer, chats, export.eval_max_tokens, DEFAULT_SYSTEM_PROMPT)

    return {
        **numbers,
        **quality(score, path, f16_path),
        "load_time_s": load_time,
        "generation_tokens_per_s": sample.tokens_per_s,
        "eval_chats": len(chats),
        "sample_prompt": export.check_prompt,
        "sample_text": sample.text,
    }
