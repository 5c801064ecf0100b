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

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from llm_rs import GenerationConfig as LlmRsGenerationConfig
from llm_rs import Gpt2, SessionConfig

from rugpt_assets.core import ggml
from rugpt_assets.core.chat_template import IGNORE_INDEX, render_prompt, tokenize_chat
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, ExportConfig


def load_llm_rs(path: Path, threads: int) -> tuple[Gpt2, float]:
    """The file in llm-rs, with its BPE tokenizer sidecar when present; returns (model, load seconds).

    Threads are always set: llm-rs's default oversubscribes small machines (DESIGN §5). The
    context is the model's own n_ctx: llm-rs would otherwise allow 2048 positions and read past
    a smaller position table.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGML file {path} does not exist")
    contents = ggml.read_ggml(path)
    if problems := ggml.llm_rs_load_problems(contents):
        raise ValueError(f"llm-rs 0.2.15 cannot load {path}: " + "; ".join(problems))
    tokenizer = ggml.tokenizer_sidecar(path)
    session = SessionConfig(threads=threads, context_length=contents.hparams.n_ctx)
    start = time.perf_counter()
    model = Gpt2(str(path), session, str(tokenizer) if tokenizer.is_file() else None)
    return model, time.perf_counter() - start


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    tokens_per_s: float  # generated tokens over generation time, prompt feeding excluded


def generate(
    model: Gpt2, prompt: str, max_new_tokens: int, greedy: bool = True, config: LlmRsGenerationConfig | None = None
) -> Generation:
    """Generate with llm-rs; greedy is top_k=1 without repetition penalty (the HF-comparable mode)."""
    if config is None:
        if not greedy:
            raise ValueError("pass a sampling config when greedy=False")
        config = LlmRsGenerationConfig(
            top_k=1, top_p=1.0, temperature=1.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens
        )
    pieces: list[str] = []
    result = model.generate(prompt, config, callback=pieces.append)  # called once per new token
    seconds = max(result.times.generation, 1) / 1000
    return Generation(result.text, len(pieces), len(pieces) / seconds)


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.inference_mode()
def greedy_tokens(model, tokenizer, prompt: str, n: int) -> list[int]:
    """n greedy next tokens (argmax, no penalties, no stop token), with the KV cache."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    past, out = None, []
    for _ in range(n):
        step = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = step.past_key_values
        ids = step.logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(ids))
    return out


def greedy_tokens_hf(model_dir: Path, prompt: str, n: int) -> list[int]:
    model, tokenizer = load_hf(model_dir)
    return greedy_tokens(model, tokenizer, prompt, n)


@torch.inference_mode()
def perplexity(
    model, tokenizer, chats: Sequence[dict], max_tokens: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> float:
    """Only-target perplexity over `chats` (rows with `messages`), see the module docstring."""
    total_nll, total_tokens = 0.0, 0
    for chat in chats:
        input_ids, labels = tokenize_chat(chat["messages"], tokenizer, max_tokens, system_prompt)
        if not any(label != IGNORE_INDEX for label in labels):
            continue
        logits = model(input_ids=torch.tensor([input_ids])).logits[0, :-1].float()
        targets = torch.tensor(labels[1:])
        total_nll += torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError(f"none of the {len(chats)} chats has a bot message within {max_tokens} tokens")
    return math.exp(total_nll / total_tokens)


def evaluate_ggml_file(
    path: Path,
    model_dir: Path,
    val_chats: Sequence[dict],
    export: ExportConfig = ExportConfig(),
    f16_path: Path | None = None,
) -> dict:
    """Every number an export asset reports about one GGML file.

    `model_dir` (the merged model) provides the architecture config and the tokenizer;
    `f16_path` is the reference for `ratio_to_f16` (the file itself when omitted).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    numbers = ggml.file_figures(path, f16_path or path)
    model, load_time = load_llm_rs(path, export.threads)
    prompt = render_prompt([{"role": "user", "content": export.check_prompt}])
    sample = generate(model, prompt, export.check_new_tokens)
    del model
    hf_model = ggml.ggml_to_hf_model(path, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chats = list(val_chats)[: export.eval_chats]
    return {
        **numbers,
        "load_time_s": load_time,
        "generation_tokens_per_s": sample.tokens_per_s,
        "perplexity": perplexity(hf_model, tokenizer, chats, export.eval_max_tokens),
        "eval_chats": len(chats),
        "sample_prompt": export.check_prompt,
        "sample_text": sample.text,
    }
