"""A tiny GPT-2 that stands in for ruGPT-3.5 on machines without a GPU or the hub.

It has ruGPT-3.5's architecture class, special tokens and ids (`<pad>`=0, `<|endoftext|>`=1,
`<s>`=2, `</s>`=3, `<mask>`=4) and a byte-level BPE tokenizer, so every later step (chat
template, LoRA, merge, GGML export, llm-rs) runs exactly as for the real model. It is briefly
pre-trained on the bundled sample texts so that losses, generations and quantization errors
mean something. Single-threaded and seeded: the same texts give the same bytes every time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rugpt_assets.core.configs import GenerationConfig

SPECIAL_TOKENS = ("<pad>", "<|endoftext|>", "<s>", "</s>", "<mask>")
PAD_ID, ENDOFTEXT_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Bump by hand whenever `build_demo_model` writes other bytes for the same texts and spec.
DEMO_MODEL_VERSION = "1"


@dataclass(frozen=True)
class DemoModelSpec:
    vocab_size: int = 2048
    n_embd: int = 128  # multiple of 32: GGML quantization blocks
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 512
    pretrain_steps: int = 400
    pretrain_window: int = 128
    pretrain_batch: int = 8
    pretrain_lr: float = 6e-3
    seed: int = 0


def sample_texts(samples_dir: Path) -> Iterator[str]:
    """Every string in every well-formed line of the `*.jsonl` files, in sorted file order."""

    def strings(value) -> Iterator[str]:
        if isinstance(value, str):
            if value.strip():
                yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for path in sorted(Path(samples_dir).rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            yield from strings(row)


def recipe_identity(texts: Iterable[str], spec: DemoModelSpec = DemoModelSpec()) -> dict:
    """What the demo model is a function of: the builder's version, the spec and the texts."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return {"builder": "demo", "version": DEMO_MODEL_VERSION, "spec": asdict(spec), "texts_sha256": h.hexdigest()}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..4, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Wrapping the tokenizers object (not GPT2TokenizerFast(vocab, merges)) keeps encoding
    # working with transformers 5 (docs/ARCHITECTURE.md, "Training").
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        mask_token="<mask>",
        additional_special_tokens=["<|endoftext|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    ids = [wrapped.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {ids} differ from ruGPT-3.5's 0..4")
    return wrapped


def _pretrain(model: GPT2LMHeadModel, token_ids: list[int], spec: DemoModelSpec) -> list[float]:
    data = torch.tensor(token_ids, dtype=torch.long)
    if len(data) <= spec.pretrain_window + 1:
        raise ValueError("not enough sample text to pre-train the demo model")
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr)
    losses = []
    model.train()
    for _ in range(spec.pretrain_steps):
        starts = torch.randint(0, len(data) - spec.pretrain_window - 1, (spec.pretrain_batch,), generator=generator)
        batch = torch.stack([data[s : s + spec.pretrain_window] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_demo_model(texts: Iterable[str], out_dir: Path, spec: DemoModelSpec = DemoModelSpec()) -> dict:
    """Train the tokenizer, build and briefly pre-train the model, save it to `out_dir`.

    Returns a summary (parameters, vocabulary size, pre-training loss first/last).
    """
    texts = list(texts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit reproducible reductions
    try:
        tokenizer = train_tokenizer(texts, spec.vocab_size)
        torch.manual_seed(spec.seed)
        config = GPT2Config(
            # Padded like ruGPT-3.5's 50272: llm-rs rejects quantized rows that are not a
            # multiple of 16 bytes, which an odd vocabulary size produces.
            vocab_size=-(-len(tokenizer) // 64) * 64,
            n_positions=spec.n_positions,
            n_embd=spec.n_embd,
            n_layer=spec.n_layer,
            n_head=spec.n_head,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
        model = GPT2LMHeadModel(config)
        token_ids: list[int] = []
        for text in texts:
            # The backend tokenizer: same ids, without the max-length warning for long texts.
            token_ids += [BOS_ID, *tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids, EOS_ID]
        losses = _pretrain(model, token_ids, spec)
    finally:
        torch.set_num_threads(threads)

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_generation_config(out_dir)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "pretrain_loss_first": losses[0],
        "pretrain_loss_last": losses[-1],
    }


def gpt2_weight_shapes(n_embd: int, n_layer: int, vocab_size: int, n_positions: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a GPT-2 checkpoint's tensors as stored (Conv1D weights are in × out),
    in checkpoint order: for writing random models of any size straight to safetensors."""
    e = n_embd
    block = {
        "ln_1.weight": (e,), "ln_1.bias": (e,), "attn.c_attn.weight": (e, 3 * e), "attn.c_attn.bias": (3 * e,),
        "attn.c_proj.weight": (e, e), "attn.c_proj.bias": (e,), "ln_2.weight": (e,), "ln_2.bias": (e,),
        "mlp.c_fc.weight": (e, 4 * e), "mlp.c_fc.bias": (4 * e,), "mlp.c_proj.weight": (4 * e, e),
        "mlp.c_proj.bias": (e,),
    }  # fmt: skip
    shapes = {"transformer.wte.weight": (vocab_size, e), "transformer.wpe.weight": (n_positions, e)}
    for i in range(n_layer):
        shapes |= {f"transformer.h.{i}.{k}": s for k, s in block.items()}
    return shapes | {"transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,)}


def write_generation_config(model_dir: Path, generation: GenerationConfig = GenerationConfig()) -> None:
    """The seed's generation defaults with ruGPT-3.5's special ids (docs/ARCHITECTURE.md, "Training")."""
    values = {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "do_sample": True,
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "top_k": generation.top_k,
        "repetition_penalty": generation.repetition_penalty,
        "no_repeat_ngram_size": generation.no_repeat_ngram_size,
        "max_new_tokens": generation.max_new_tokens,
    }
    (Path(model_dir) / "generation_config.json").write_text(json.dumps(values, indent=2) + "\n")
