"""LoRA training throughput on a ruGPT-3.5-13B-shaped model: the seed's batch shape against the
project's packed path, side by side in one process (absolute GPU figures drift between calls: compare inside one run only).

A GPT-2 of ruGPT-3.5's shape (n_embd 5120, 40 layers, 40 heads, vocab 50272, 2048 positions)
is built with random weights directly on the device in bf16 and gets the seed's LoRA (r 16,
alpha 16, dropout 0.05 on c_attn) through `train.add_lora`. The chats are synthetic token ids
with rulm-like lengths under max_tokens_count 1000 (see `synthetic_chats`) and loss on bot
turns only. Every variant runs the trainer's own pieces — `DataPlan`, `rank_batches`,
`collate` (with the trainer's `batch_shape`), `train_step` — on the micro-batches of real
optimizer steps of ``--chats-per-step`` chats (the seed's 256).

Steady state. Each variant is measured ``--repeats`` times; the order of the variants reverses
from one repeat to the next (seed first, then last, ...). Every visit runs ``--warmup`` untimed
steps, then ``--steps`` timed steps (each ``--micro-batches`` micro-batches, synchronized); the
timed micro-batches are the same in every repeat, so a first repeat slower than the others
shows too little warm-up. Reported per variant: the median real (non-padding) tokens/s over the
repeats with its range, MFU = tokens/s × 4N / 790e12 (N = the base model's parameters: forward
and activation gradients, no weight gradients for frozen weights), peak allocated memory, the
graphs torch.compile built during timed steps (0: no recompilation), and the speed-up against
the seed shape: the ratio of the medians, with the range of the per-repeat ratios. A variant
that runs out of memory or fails prints that and the rest go on; results are written after every
visit. Compiled blocks are switched off for eager variants
(``torch.compiler.set_stance("force_eager")``), so variants interleave freely; a quantized
variant loads its own base, so run those with ``--repeats 1``.

The ``_8bit`` and ``_4bit`` (nf4) variants answer how the recipe runs on a 24 GB card. They need
bitsandbytes and a checkpoint on disk: the same random model is written once as bf16
safetensors (with a tokenizer) to a temporary folder and loaded through the trainer's own
`train.load_lora_model`, quantized as TrainConfig ``load_in_8bit`` / ``load_in_4bit`` ask.
Consecutive variants of one base share one load. The folder (26 GB at full size) is deleted at
the end.

    python bench/train_throughput.py --variants seed,packed_varlen_b4_compiled --out /tmp/bench  # the H200 table
    python bench/train_throughput.py --device cpu --n-embd 256 --layers 2 --vocab 1000 \\
        --variants seed,packed_sdpa_b4_compiled --out /tmp/bench           # a smoke run
    python bench/train_throughput.py --no-check --steps 2 --repeats 1 --out /tmp/bench \\
        --variants seed_8bit,packed_varlen_b4_ckpt_8bit,seed_4bit,packed_varlen_b4_ckpt_4bit

``--cli-proof DIR`` instead proves the CLI trainer end to end on the device: it writes a base
model (ruGPT-3.5's width and vocabulary, ``--layers`` layers, a tokenizer trained on the bundled
samples), chat files and job files, runs ``python -m rugpt_assets.core.train --config`` on them
(bf16 with compile_blocks, and 8-bit when bitsandbytes is installed) and prints each run's
metrics.json figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, GPT2Config, get_scheduler

from rugpt_assets.core.artifacts import write_jsonl
from rugpt_assets.core.chat_template import IGNORE_INDEX
from rugpt_assets.core.configs import TrainConfig
from rugpt_assets.core.demo_model import BOS_ID, EOS_ID, PAD_ID, sample_texts, train_tokenizer
from rugpt_assets.core.packing import TokenizedChat, collate
from rugpt_assets.core.train import (
    DataPlan,
    Runtime,
    add_lora,
    batch_shape,
    compile_blocks,
    load_lora_model,
    loss_sum,
    rank_batches,
    train_step,
    trainable,
)

H200_BF16_FLOPS = 790e12  # measured dense bf16 matmul rate (one H200)
SEED_CHATS_PER_STEP = 256  # per-device batch 2 × gradient accumulation 128
SAMPLES = Path(__file__).resolve().parents[1] / "rugpt_assets" / "samples"


@dataclass(frozen=True)
class Variant:
    name: str
    packing: bool
    batch: int  # rows per micro-batch
    checkpointing: bool
    attn: str = "sdpa"
    attention_dropout: bool = True  # False: attention-probability dropout off (other dropouts stay)
    compile_blocks: bool = False  # torch.compile each transformer block (regional compilation)
    quantized: str = ""  # "8bit" | "4bit" (nf4): the base loaded from disk through bitsandbytes


VARIANTS = {
    v.name: v
    for v in [
        Variant("seed", packing=False, batch=2, checkpointing=True),
        Variant("packed_sdpa_b2", packing=True, batch=2, checkpointing=False),
        Variant("packed_varlen_b2", packing=True, batch=2, checkpointing=False, attn="packed_varlen"),
        Variant("packed_sdpa_b4", packing=True, batch=4, checkpointing=False),
        Variant("packed_varlen_b4", packing=True, batch=4, checkpointing=False, attn="packed_varlen"),
        Variant("packed_varlen_b8_ckpt", packing=True, batch=8, checkpointing=True, attn="packed_varlen"),
        # Compiled blocks (the eager variants switch compilation off, see `set_variant`).
        Variant("packed_sdpa_b4_compiled", True, 4, False, compile_blocks=True),
        Variant("packed_varlen_b4_compiled", True, 4, False, "packed_varlen", compile_blocks=True),
        Variant("packed_varlen_b8_compiled", True, 8, False, "packed_varlen", compile_blocks=True),
        Variant("packed_varlen_b4_compiled_no_attn_dropout", True, 4, False, "packed_varlen", False, True),
        # Quantized bases: the seed shape, and packing with checkpointing (eager batch 4 does not fit).
        Variant("seed_8bit", packing=False, batch=2, checkpointing=True, quantized="8bit"),
        Variant("seed_4bit", packing=False, batch=2, checkpointing=True, quantized="4bit"),
        Variant("packed_varlen_b4_ckpt_8bit", True, 4, True, "packed_varlen", quantized="8bit"),
        Variant("packed_varlen_b4_ckpt_4bit", True, 4, True, "packed_varlen", quantized="4bit"),
    ]
}
DEFAULT_VARIANTS = "seed,packed_varlen_b4_compiled"  # the seed's shape against the fast path


def synthetic_chats(n: int, vocab: int, max_tokens: int, seed: int) -> list[TokenizedChat]:
    """Chats shaped like rulm's under max_tokens_count=1000: 30 % were cut at the limit (message
    boundaries land them at 700–1000 tokens), the rest are log-normal around 350 tokens
    (σ 0.6, clipped to 64–1000); mean ≈ 530. Each has a 40-token unlabelled prefix (<s>, system
    prompt), then 1–3 user/bot turns in a 30/70 split; only bot tokens carry loss."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        if rng.random() < 0.3:
            length = rng.randint(700, max_tokens)
        else:
            length = min(max_tokens, max(64, round(rng.lognormvariate(math.log(350), 0.6))))
        ids = [BOS_ID] + [rng.randrange(5, vocab) for _ in range(length - 1)]
        labels = [IGNORE_INDEX] * 40
        turns = rng.randint(1, 3)
        for k in range(turns):
            end = 40 + (length - 40) * (k + 1) // turns
            start = len(labels)
            user = round((end - start) * 0.3)
            labels += [IGNORE_INDEX] * user + ids[start + user : end]
        chats.append(TokenizedChat(ids, labels))
    return chats


def gpt2_config(args) -> GPT2Config:
    return GPT2Config(
        n_embd=args.n_embd, n_layer=args.layers, n_head=args.n_head, vocab_size=args.vocab,
        n_positions=args.n_positions, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )  # fmt: skip


def count_params(args) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(gpt2_config(args)).parameters())


def random_base(args, device: torch.device):
    """ruGPT-3.5's shape with random bf16 weights made on ``device`` (no CPU copy)."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(gpt2_config(args), dtype=torch.bfloat16, attn_implementation="sdpa")


def write_base(args, base_dir: Path, device: torch.device) -> None:
    """A base model folder as the trainer reads it: bf16 safetensors and a tokenizer trained on
    the bundled samples."""
    model = random_base(args, device)
    model.save_pretrained(base_dir, max_shard_size="5GB")
    del model
    free_memory(device)
    train_tokenizer(list(sample_texts(SAMPLES)), 4096).save_pretrained(base_dir)


def load_base(v: Variant, args, cfg: TrainConfig, rt: Runtime, base_dir: Path):
    """The variant's base with the seed LoRA: built on the device, or quantized from ``base_dir``."""
    if not v.quantized:
        return add_lora(random_base(args, rt.device), cfg)
    bits = replace(cfg, load_in_8bit=v.quantized == "8bit", load_in_4bit=v.quantized == "4bit")
    return load_lora_model(base_dir, bits, rt)


def set_variant(model, v: Variant) -> None:
    base = model.get_base_model()
    base.set_attn_implementation(v.attn)
    if v.checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as add_lora
    else:
        base.gradient_checkpointing_disable()
    for block in base.transformer.h:
        block.attn.attn_dropout.p = base.config.attn_pdrop if v.attention_dropout else 0.0
    if v.compile_blocks and not getattr(model, "blocks_compiled", False):
        compile_blocks(model)
        model.blocks_compiled = True
    # Compiled blocks stay compiled; an eager variant runs them eagerly.
    torch.compiler.set_stance("default" if v.compile_blocks else "force_eager")


def variant_config(cfg: TrainConfig, v: Variant) -> TrainConfig:
    return replace(
        cfg,
        packing=v.packing,
        per_device_batch_size=v.batch,
        gradient_checkpointing=v.checkpointing,
        attn_implementation=v.attn,
        compile_blocks=v.compile_blocks,
    )


def step_micro_batches(v: Variant, chats, cfg: TrainConfig, rt: Runtime, args) -> list:
    """The micro-batches (rows) of the first real optimizer steps, in order, grouped
    ``--micro-batches`` to a bench step: ``--warmup`` steps, then ``--steps`` steps."""
    cfg = variant_config(cfg, v)
    plan = DataPlan(chats, args.chats_per_step, seed=0)
    steps = args.warmup + args.steps
    micro: list = []
    for s in range(plan.steps_per_epoch):
        micro += rank_batches(plan.step_chats(s), cfg, rt)
        if len(micro) >= steps * args.micro_batches:
            break
    if len(micro) < steps * args.micro_batches:
        raise ValueError(f"{len(chats)} chats give {len(micro)} micro-batches; raise --chats")
    return [micro[i * args.micro_batches : (i + 1) * args.micro_batches] for i in range(steps)]


def run_variant(model, v: Variant, bench_steps: list, cfg: TrainConfig, rt: Runtime, args, filler_id: int) -> dict:
    """One visit: ``--warmup`` untimed steps, then ``--steps`` timed ones."""
    cfg = variant_config(cfg, v)
    set_variant(model, v)
    shape = batch_shape(cfg)
    optimizer = torch.optim.AdamW(list(trainable(model).values()), lr=cfg.learning_rate)
    scheduler = get_scheduler("constant", optimizer)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=False)
    model.train()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    tokens = padded = 0
    started = first_step_s = 0.0
    for step, rows in enumerate(bench_steps):
        if step == args.warmup:
            sync(rt)
            started = time.perf_counter()
            graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        batches = [collate(r, filler_id, shape).to(rt.device) for r in rows]
        train_step(model, optimizer, scheduler, scaler, batches, sum(b.n_targets for b in batches), cfg, rt)
        if step == 0:
            sync(rt)
            first_step_s = time.perf_counter() - t0
        if step >= args.warmup:
            tokens += sum(b.n_tokens for b in batches)
            padded += sum(b.input_ids.numel() for b in batches)
    sync(rt)
    seconds = time.perf_counter() - started
    cuda = rt.device.type == "cuda"
    return {
        "tokens_per_s": tokens / seconds,
        "peak_gb": torch.cuda.max_memory_allocated(rt.device) / 1e9 if cuda else float("nan"),
        # What the caching allocator held: the figure to hold against a 24 GB card.
        "peak_reserved_gb": torch.cuda.max_memory_reserved(rt.device) / 1e9 if cuda else float("nan"),
        "timed_tokens": tokens,
        "pad_fraction": 1 - tokens / padded,
        "timed_s": seconds,
        "first_step_s": first_step_s,
        "graphs_compiled_in_timed_steps": counters["stats"]["unique_graphs"] - graphs,
    }


def summarize(visits: list[dict], flops_per_token: float) -> list[dict]:
    """Per variant: median tokens/s over its repeats with the range, and the ratio to the seed
    shape (medians; and the range of the ratios within each repeat)."""
    names = list(dict.fromkeys(r["name"] for r in visits))
    ok = [r for r in visits if "error" not in r]
    seed = {r["repeat"]: r["tokens_per_s"] for r in ok if r["name"] == "seed"}
    rows = []
    for name in names:
        runs = [r for r in ok if r["name"] == name]
        if not runs:
            rows.append({"name": name, "error": next(r["error"] for r in visits if r["name"] == name)})
            continue
        tps = [r["tokens_per_s"] for r in runs]
        row = {
            "name": name,
            "repeats": len(runs),
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps),
            "tokens_per_s_by_repeat": tps,
            "mfu": statistics.median(tps) * flops_per_token / H200_BF16_FLOPS,
            "peak_gb": max(r["peak_gb"] for r in runs),
            "peak_reserved_gb": max(r["peak_reserved_gb"] for r in runs),
            "pad_fraction": runs[0]["pad_fraction"],
            "graphs_compiled_in_timed_steps": sum(r["graphs_compiled_in_timed_steps"] for r in runs),
        }
        if seed:
            ratios = [r["tokens_per_s"] / seed[r["repeat"]] for r in runs if r["repeat"] in seed]
            row["vs_seed"] = row["tokens_per_s"] / statistics.median(seed.values())
            row["vs_seed_by_repeat"] = ratios
        rows.append(row)
    return rows


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def attention_check(model, chats, filler_id: int, rt: Runtime) -> dict:
    """Loss of one packed micro-batch under sdpa, packed_varlen and packed_varlen with the chats
    allowed to see each other (one segment per row): the first two agree, the third does not."""
    cfg = TrainConfig(per_device_batch_size=2)
    batch = collate(rank_batches(chats[:64], cfg, rt)[0], filler_id).to(rt.device)
    leaky = replace(batch, cu_seq_lens=torch.arange(0, batch.input_ids.numel() + 1, batch.input_ids.shape[1],
                                                    dtype=torch.int32, device=rt.device))  # fmt: skip
    model.eval()
    out = {}
    with torch.no_grad():
        for name, attn, b in [("sdpa", "sdpa", batch), ("packed_varlen", "packed_varlen", batch),
                              ("packed_varlen_leaky", "packed_varlen", leaky)]:  # fmt: skip
            model.get_base_model().set_attn_implementation(attn)
            out[name] = (loss_sum(model, b, rt) / b.n_targets).item()
    model.train()
    return out


def fmt(row: dict) -> str:
    if "error" in row:
        return f"| {row['name']} | {row['error']} | | | | |"
    spread = f"{row['tokens_per_s_min']:,.0f}–{row['tokens_per_s_max']:,.0f}"
    speedup = "–"
    if row.get("vs_seed_by_repeat"):
        speedup = f"{row['vs_seed']:.2f}× ({min(row['vs_seed_by_repeat']):.2f}–{max(row['vs_seed_by_repeat']):.2f})"
    return (
        f"| {row['name']} | {row['tokens_per_s']:,.0f} ({spread}) | {100 * row['mfu']:.1f} % | {row['peak_gb']:.1f} "
        f"| {row['graphs_compiled_in_timed_steps']} | {speedup} |"
    )


def environment() -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for name, module in [("flash_attn", "flash_attn"), ("bitsandbytes", "bitsandbytes"),
                         ("torch_varlen", "torch.nn.attention.varlen"),
                         ("flex_attention", "torch.nn.attention.flex_attention")]:  # fmt: skip
        try:
            __import__(module)
            env[name] = True
        except Exception as e:  # noqa: BLE001 - absence is the answer
            env[name] = f"no ({type(e).__name__})"
    return env


def throughput(args) -> None:
    # A device with its index: bitsandbytes loads through device_map={"": device}.
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)
    rt = Runtime(device, torch.bfloat16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = environment()
    print("environment:", json.dumps(env), flush=True)
    cfg = replace(TrainConfig(), load_in_8bit=False, precision="bf16", attn_implementation="sdpa")
    chats = synthetic_chats(args.chats, min(args.vocab, 50000), cfg.max_tokens_count, seed=0)
    lengths = [len(c) for c in chats]
    print(f"{len(chats)} chats, mean {sum(lengths) / len(lengths):.0f} tokens, "
          f"targets {sum(c.n_targets for c in chats) / sum(lengths):.0%}", flush=True)  # fmt: skip
    n_params = count_params(args)
    flops_per_token = 4 * n_params
    results = {"environment": env, "n_params": n_params, "args": vars(args), "visits": [], "loads": []}
    names = args.variants.split(",")
    steps = {}  # variant name -> its bench steps (micro-batches of rows), the same in every repeat
    model, loaded = None, None  # the model in memory and the `quantized` value it was loaded for
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as scratch:
        for repeat in range(args.repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                v = VARIANTS[name]
                left = args.time_budget_s - (time.perf_counter() - started)
                need = 150 if v.compile_blocks and not getattr(model, "blocks_compiled", False) else 60
                need += 90 if v.quantized and v.quantized != loaded else 0  # writing and quantizing the base
                if left < need:
                    row = {"name": name, "repeat": repeat, "error": f"skipped ({left:.0f} s of the time budget left)"}
                else:
                    print(f"--- {name}, repeat {repeat + 1}/{args.repeats} ({left:.0f} s left)", flush=True)
                    try:
                        if v.quantized != loaded:
                            model, loaded = None, v.quantized  # a failed load is not retried by the next variant
                            free_memory(device)
                            model = loaded_model(v, args, cfg, rt, Path(scratch), chats, results, started)
                        if model is None:
                            raise RuntimeError(f"no {v.quantized or 'bf16'} model: its load failed above")
                        if name not in steps:
                            steps[name] = step_micro_batches(v, chats, cfg, rt, args)
                        row = {"name": name, "repeat": repeat, **run_variant(model, v, steps[name], cfg, rt, args, EOS_ID)}
                    except torch.OutOfMemoryError:
                        row = {"name": name, "repeat": repeat,
                               "error": f"OOM (at {torch.cuda.max_memory_allocated(device) / 1e9:.0f} GB)"}  # fmt: skip
                    except Exception as e:  # noqa: BLE001 - one broken variant must not hide the others
                        row = {"name": name, "repeat": repeat, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                    if model is not None:
                        for p in trainable(model).values():
                            p.grad = None
                    free_memory(device)
                print(row, flush=True)
                results["visits"].append(row)
                results["variants"] = summarize(results["visits"], flops_per_token)
                (out / "train_throughput.json").write_text(json.dumps(results, indent=2))
    if args.check and device.type == "cuda" and getattr(model, "blocks_compiled", False):
        set_variant(model, VARIANTS["packed_varlen_b4_compiled"])
        results["attention_check_compiled"] = attention_check(model, chats, EOS_ID, rt)
        print("attention check, compiled blocks (mean loss):", results["attention_check_compiled"], flush=True)
        (out / "train_throughput.json").write_text(json.dumps(results, indent=2))
    table = [
        "| variant | real tokens/s: median (range) | MFU | peak GB | graphs compiled in timed steps | vs seed: median (range) |",
        "|---|---|---|---|---|---|",
    ]
    table += [fmt(r) for r in results["variants"]]
    text = "\n".join(table)
    print(text, flush=True)
    (out / "train_throughput.md").write_text(text + "\n")


def loaded_model(v: Variant, args, cfg: TrainConfig, rt: Runtime, base_dir: Path, chats, results: dict, started: float):
    """`load_base`, with the load's time and peak memory recorded (and the attention check after
    building the bf16 model). The first quantized variant writes the base it loads."""
    if v.quantized and not (base_dir / "config.json").exists():
        t0 = time.perf_counter()
        write_base(args, base_dir, rt.device)
        print(f"base written in {time.perf_counter() - t0:.0f} s", flush=True)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    t0 = time.perf_counter()
    model = load_base(v, args, cfg, rt, base_dir)
    peak = torch.cuda.max_memory_allocated(rt.device) / 1e9 if rt.device.type == "cuda" else float("nan")
    load = {"base": v.quantized or "bf16", "load_s": time.perf_counter() - t0, "peak_gb": peak}
    print(f"model ready at {time.perf_counter() - started:.0f} s:", load, flush=True)
    results["loads"].append(load)
    if not v.quantized and args.check and rt.device.type == "cuda":
        results["attention_check"] = attention_check(model, chats, EOS_ID, rt)
        print("attention check (mean loss):", results["attention_check"], flush=True)
    return model


def cli_proof(args) -> None:
    """The CLI trainer on a ruGPT-3.5-wide model of ``--layers`` layers, bf16 (and 8-bit)."""
    work = Path(args.cli_proof)
    texts = list(sample_texts(SAMPLES))
    write_base(args, work / "base", torch.device(args.device))
    rng = random.Random(0)
    chats = []
    for _ in range(288):  # ~200–900 tokens each
        user, bot = rng.sample(texts, rng.randint(1, 6)), rng.sample(texts, rng.randint(2, 16))
        chats.append({"messages": [{"role": "user", "content": "\n".join(user)},
                                   {"role": "bot", "content": "\n".join(bot)}]})  # fmt: skip
    write_jsonl(work / "train.jsonl", chats[:256])
    write_jsonl(work / "val.jsonl", chats[256:])
    train = {"per_device_batch_size": 4, "gradient_accumulation_steps": 16, "max_steps": 3, "eval_steps": 3,
             "save_steps": 3, "warmup_steps": 1, "precision": "bf16", "load_in_8bit": False,
             "gradient_checkpointing": False, "attn_implementation": "packed_varlen", "device": "cuda"}  # fmt: skip
    runs = {"bf16": {"compile_blocks": True}, "8bit": {"load_in_8bit": True}}
    try:
        import bitsandbytes  # noqa: F401  # pyright: ignore[reportMissingImports]  # the gpu extra
    except ImportError:
        del runs["8bit"]
        print("bitsandbytes is not installed: the 8-bit run is skipped", flush=True)
    for name, changes in runs.items():
        job = {"base_model_dir": str(work / "base"), "train_path": str(work / "train.jsonl"),
               "val_path": str(work / "val.jsonl"), "output_dir": str(work / name / "adapter"),
               "runs_dir": str(work / name / "runs"), "train": train | changes}  # fmt: skip
        (work / f"{name}.json").write_text(json.dumps(job, indent=2))
        print(f"--- python -m rugpt_assets.core.train --config {name}.json", flush=True)
        done = subprocess.run([sys.executable, "-m", "rugpt_assets.core.train", "--config", str(work / f"{name}.json")])
        metrics_path = work / name / "adapter" / "metrics.json"
        if done.returncode or not metrics_path.exists():
            print(f"{name}: the trainer failed (exit {done.returncode})", flush=True)
            continue
        m = json.loads(metrics_path.read_text())
        keys = ("steps", "tokens_seen", "tokens_per_second", "peak_memory_gb", "train_loss", "eval_loss",
                "base_eval_loss", "device", "dtype")  # fmt: skip
        print(f"{name} metrics:", json.dumps({k: m[k] for k in keys}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-embd", type=int, default=5120)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--n-head", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--n-positions", type=int, default=2048)
    parser.add_argument("--chats", type=int, default=4096, help="synthetic chats in the pool")
    parser.add_argument("--warmup", type=int, default=5, help="untimed bench steps per visit of a variant")
    parser.add_argument("--steps", type=int, default=12, help="timed bench steps per visit of a variant")
    parser.add_argument("--repeats", type=int, default=3, help="visits per variant, the order reversing each time")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per bench step")
    parser.add_argument("--chats-per-step", type=int, default=SEED_CHATS_PER_STEP,
                        help="chats of the real optimizer steps whose micro-batches are timed")  # fmt: skip
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare sdpa and packed_varlen losses first (CUDA)")  # fmt: skip
    parser.add_argument("--time-budget-s", type=float, default=1e9, help="skip variants that would start past this")
    parser.add_argument("--out", default="bench-out", help="folder for train_throughput.{md,json}")
    parser.add_argument("--cli-proof", metavar="DIR", help="run the CLI trainer end to end instead (see above)")
    args = parser.parse_args()
    print(datetime.now(UTC).isoformat(timespec="seconds"), " ".join(sys.argv), flush=True)
    if args.cli_proof:
        cli_proof(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
