"""LoRA fine-tuning of the GPT-2 base on the chat set (docs/ARCHITECTURE.md, "Training"): a plain loop, not HF Trainer.

Run ``python -m rugpt_assets.core.train --config job.json`` (under ``torchrun --nproc_per_node N``
for DDP), or call `train_lora` in-process. ``job.json`` holds the `TrainJob` paths and a
``"train"`` object of `TrainConfig` values. Launched by Dagster Pipes, rank 0 streams progress
lines and the final materialization metadata back; otherwise progress goes to stdout. Rank,
world size and local rank are torchrun's, as torch.distributed reads them. ``output_dir/metrics.json`` holds the same numbers either way.

Resume. Checkpoints live in ``runs_dir/<run key>/checkpoint-<step>/`` (LoRA weights, optimizer,
scheduler, grad scaler, step, history). The run key hashes the TrainConfig, the world size, the
bytes of the train/val files and the base model's content hash (the one its snapshot manifest
recorded, see `base_model`; hashed from the files when there is no manifest). A run with the
same key continues from its latest checkpoint; anything else starts fresh. Data order and
dropout masks are functions of (seed, step, rank), so the step is all the data position and RNG
state a resumed run needs to repeat the uninterrupted one.

Loss. Every optimizer step averages next-token cross-entropy over all target tokens of its
rows, whichever micro-batch or rank they land on; so packing, gradient accumulation and DDP
change the arithmetic grouping only.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure  # renders with Agg; no pyplot, no display
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from torch.distributed.distributed_c10d import get_node_local_rank
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    get_scheduler,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from rugpt_assets.core import base_model
from rugpt_assets.core.artifacts import atomic_dir, atomic_file, read_jsonl, sha256_file
from rugpt_assets.core.chat_template import IGNORE_INDEX, tokenize_chat
from rugpt_assets.core.configs import TRAIN_CONFIG_FILE, TrainConfig, from_dict, to_dict
from rugpt_assets.core.figures import MEASURE_DIGITS, QUALITY_DIGITS, significant
from rugpt_assets.core.packing import Batch, Row, TokenizedChat, collate, pack

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
JOB_PATHS = ("base_model_dir", "train_path", "val_path", "output_dir", "runs_dir")
# Bump by hand whenever the adapter this module produces changes (Dagster code_version).
TRAINER_VERSION = "1"


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainJob:
    base_model_dir: Path
    train_path: Path  # jsonl rows {"messages": [{"role", "content"}, ...], "source": ...}
    val_path: Path
    output_dir: Path  # the adapter, written atomically
    runs_dir: Path  # checkpoints, one subdirectory per run key
    config: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name in JOB_PATHS:
            object.__setattr__(self, name, Path(getattr(self, name)))

    @classmethod
    def from_json(cls, path: Path) -> TrainJob:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = sorted(set(values) - {*JOB_PATHS, "train"})
        missing = [k for k in JOB_PATHS if k not in values]
        if unknown or missing:
            raise ValueError(
                f"{path}: unknown keys {unknown}, missing keys {missing}; expected {JOB_PATHS} and 'train'"
            )
        return cls(**{k: values[k] for k in JOB_PATHS}, config=from_dict(TrainConfig, values.get("train", {})))

    def to_json(self) -> dict[str, Any]:
        return {**{k: str(getattr(self, k)) for k in JOB_PATHS}, "train": to_dict(self.config)}

    def write(self, path: Path) -> None:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # base weights and autocast; LoRA weights stay fp32
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False
    started: float = field(default_factory=time.perf_counter)  # wall_time_s counts from here

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_runtime(cfg: TrainConfig) -> Runtime:
    """Device, precision and DDP rank; rejects settings that cannot run here before anything loads."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ValueError("device='cuda' but no CUDA GPU is visible: set device to 'auto' or 'cpu'")
    started = time.perf_counter()
    on_gpu = cuda and cfg.device != "cpu"
    device = torch.device("cuda", get_node_local_rank(fallback_rank=0)) if on_gpu else torch.device("cpu")

    if cfg.precision == "auto":
        dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = PRECISIONS[cfg.precision]
    if dtype == torch.float16 and not on_gpu:
        raise ValueError("precision='fp16' needs a CUDA GPU: use 'fp32' (or 'bf16') on the CPU")
    for flag in ("load_in_8bit", "load_in_4bit"):
        if getattr(cfg, flag) and not on_gpu:
            raise ValueError(
                f"{flag}=true needs a CUDA GPU (bitsandbytes quantizes on the GPU) and this run is on the CPU: "
                f"set {flag} to false, or run on a GPU"
            )
        if getattr(cfg, flag) and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{flag}=true needs bitsandbytes: pip install 'rugpt-assets[gpu]', or set {flag} to false")
    if cfg.attn_implementation == "packed_varlen" and not (on_gpu and dtype in (torch.bfloat16, torch.float16)):
        raise ValueError(
            "attn_implementation='packed_varlen' needs a CUDA GPU and precision bf16 or fp16: use 'sdpa' here"
        )

    # Under torchrun the process group is set up from its rendezvous (env://); otherwise one process.
    owns_group = dist.is_torchelastic_launched() and not dist.is_initialized()
    if owns_group:
        if on_gpu:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Runtime(device, dtype, rank, world_size, owns_group, started)


@contextmanager
def running(cfg: TrainConfig) -> Iterator[Runtime]:
    """`start_runtime`, and the process group it started torn down at the end."""
    rt = start_runtime(cfg)
    try:
        yield rt
    finally:
        if rt.owns_process_group:
            dist.destroy_process_group()


# --- model -----------------------------------------------------------------------------------


def lora_config(cfg: TrainConfig) -> LoraConfig:
    # GPT-2's Conv1D stores weights transposed: fan_in_fan_out (docs/ARCHITECTURE.md, "Training").
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        target_modules=list(cfg.lora_target_modules),
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )


def load_lora_model(base_model_dir: Path, cfg: TrainConfig, rt: Runtime) -> PeftModel:
    """The base model (safetensors only, no remote code) on ``rt.device`` with a fresh LoRA adapter."""
    quantization = None
    if cfg.load_in_8bit or cfg.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_8bit=cfg.load_in_8bit,
            load_in_4bit=cfg.load_in_4bit,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=rt.dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        base_model_dir,
        dtype=rt.dtype,
        device_map={"": rt.device},
        quantization_config=quantization,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=False,
        use_safetensors=True,
    )
    return add_lora(model, cfg, quantized=quantization is not None)


def add_lora(model: PreTrainedModel, cfg: TrainConfig, quantized: bool = False) -> PeftModel:
    """A loaded base model made ready for training (no cache, checkpointing as configured) with a
    fresh LoRA adapter."""
    model.config.use_cache = False
    # Non-reentrant checkpointing gets gradients through frozen embeddings by itself, so PEFT's
    # enable_input_require_grads workaround (needed for the reentrant kind) is not needed.
    checkpointing = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    lora_model = get_peft_model(model, lora_config(cfg))
    if cfg.compile_blocks:
        compile_blocks(lora_model)
    return lora_model


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each transformer block in place. Compiling block by block (not the whole
    model) compiles once for all layers and keeps the mask building and the loss outside."""
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to compile: set compile_blocks to false")
    for block in blocks:
        block.compile()


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --- data ------------------------------------------------------------------------------------


def load_chats(path: Path, tokenizer: Any, cfg: TrainConfig) -> tuple[list[TokenizedChat], int]:
    """Tokenized chats of a jsonl split, and how many were skipped for having no target token
    within ``max_tokens_count`` (they would add nothing to the loss)."""
    chats, skipped = [], 0
    for n, row in enumerate(read_jsonl(path), 1):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError(f'{path}, row {n}: expected {{"messages": [{{"role": str, "content": str}}, ...]}}')
        chat = TokenizedChat(*tokenize_chat(messages, tokenizer, cfg.max_tokens_count, cfg.system_prompt))
        if chat.n_targets:
            chats.append(chat)
        else:
            skipped += 1
    if not chats:
        raise ValueError(f"{path}: no chat has a bot message within max_tokens_count={cfg.max_tokens_count}")
    return chats, skipped


def make_rows(chats: Sequence[TokenizedChat], cfg: TrainConfig) -> list[Row]:
    """Packed rows, or one chat per row (the seed's shape) when packing is off."""
    if not cfg.packing:
        return [[chat] for chat in chats]
    return [[chats[i] for i in row] for row in pack([len(c) for c in chats], cfg.pack_tokens)]


def batch_shape(cfg: TrainConfig) -> tuple[int, int] | None:
    """The one micro-batch shape of a run with compiled blocks and packing: ``pack_tokens`` long,
    short micro-batches completed with padding rows. Compiled blocks recompile for every new
    shape (and after the first, compile for any shape, which is slower); eager runs pad only to
    the longest row, which costs less."""
    return (cfg.per_device_batch_size, cfg.pack_tokens) if cfg.packing and cfg.compile_blocks else None


def rank_batches(chats: Sequence[TokenizedChat], cfg: TrainConfig, rt: Runtime) -> list[list[Row]]:
    """This rank's share of ``chats`` as micro-batches of ``per_device_batch_size`` rows."""
    rows = make_rows(chats[rt.rank :: rt.world_size], cfg)
    return [rows[i : i + cfg.per_device_batch_size] for i in range(0, len(rows), cfg.per_device_batch_size)]


@dataclass(frozen=True)
class DataPlan:
    """The chats of each optimizer step: a function of (seed, step) only, so a resumed run reads
    exactly what the uninterrupted one would have. Each epoch reshuffles; the last partial step's
    worth of chats sits that epoch out.

    A step always takes the seed's global batch of chats (per_device_batch_size ×
    gradient_accumulation_steps × world size), packed or not: packing changes how many forward
    passes a step needs, not what it learns from.
    """

    chats: Sequence[TokenizedChat]
    chats_per_step: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.chats) // self.chats_per_step

    def step_chats(self, step: int) -> list[TokenizedChat]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.chats), generator=torch.Generator().manual_seed(self.seed + epoch))
        return [self.chats[i] for i in order[k * self.chats_per_step : (k + 1) * self.chats_per_step].tolist()]


# --- steps -----------------------------------------------------------------------------------


def loss_sum(model: torch.nn.Module, batch: Batch, rt: Runtime) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's targets (fp32).

    No attention_mask and no cache: that is when transformers reads the restarting position_ids
    as packed chats and masks attention between them; packed_varlen takes the chat boundaries
    from the batch's attention kwargs instead (see `packing`).
    """
    with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype != torch.float32):
        logits = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **batch.attention_kwargs()
        ).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def train_step(
    model, optimizer, scheduler, scaler, batches: Sequence[Batch], n_targets: int, cfg: TrainConfig, rt: Runtime
) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches; ``n_targets`` counts the targets of the
    whole step (all ranks). Returns the step's mean loss and the gradient norm before clipping."""
    total = torch.zeros((), device=rt.device)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or not rt.distributed
        with nullcontext() if sync else model.no_sync():
            loss = loss_sum(model, batch, rt)
            # DDP averages gradients over ranks; × world_size turns that into the global sum.
            scaler.scale(loss * (rt.world_size / n_targets)).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if rt.distributed:
        dist.all_reduce(total)
    return total.item() / n_targets, grad_norm.item()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Sequence[Sequence[Row]],
    filler_id: int,
    rt: Runtime,
    shape: tuple[int, int] | None = None,
) -> float:
    """Mean next-token loss over all target tokens of every rank's ``batches`` (collated to
    ``shape``, see `batch_shape`)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for rows in batches:
        batch = collate(rows, filler_id, shape).to(rt.device)
        sums[0] += loss_sum(model, batch, rt)
        sums[1] += batch.n_targets
    if rt.distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    return (sums[0] / sums[1]).item()


# --- checkpoints -----------------------------------------------------------------------------


def run_key(job: TrainJob, world_size: int) -> str:
    """What a training is a function of, by content: settings, world size, the chat files' bytes
    and the base model's content hash. No paths or timestamps: rewriting identical inputs (or
    reading them from another storage root) finds the same checkpoints."""
    identity = {
        "config": to_dict(job.config),
        "world_size": world_size,
        "train": sha256_file(job.train_path),
        "val": sha256_file(job.val_path),
        "base_model": base_model.content_sha256(job.base_model_dir),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def open_run(job: TrainJob, rt: Runtime) -> tuple[Path, str]:
    """This job's checkpoint directory (``runs_dir/<key prefix>``) and its full run key."""
    key = run_key(job, rt.world_size)
    run = job.runs_dir / key[:16]
    if rt.is_main:
        run.mkdir(parents=True, exist_ok=True)
        for stale in run.glob(".checkpoint-*"):  # temporaries of a killed save
            shutil.rmtree(stale, ignore_errors=True)
        (run / "run.json").write_text(json.dumps({"run_key": key, **job.to_json()}, indent=2))
    if rt.distributed:
        dist.barrier()  # every rank sees the same checkpoints, so all resume from the same step
    return run, key


def checkpoints(run: Path) -> list[Path]:
    return sorted(run.glob("checkpoint-*"))  # zero-padded steps sort in order


def save_checkpoint(run: Path, model, optimizer, scheduler, scaler, state: dict[str, Any]) -> None:
    with atomic_dir(run / f"checkpoint-{state['step']:06d}") as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable(model).items()}, tmp / "lora.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
            tmp / "optimizer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state))
    for old in checkpoints(run)[:-1]:
        shutil.rmtree(old)


def load_checkpoint(path: Path, key: str, model, optimizer, scheduler, scaler, rt: Runtime) -> dict[str, Any]:
    state = json.loads((path / "state.json").read_text())
    if state["run_key"] != key:
        raise RuntimeError(f"{path} belongs to another run; delete it to start fresh")
    weights, params = load_file(path / "lora.safetensors"), trainable(model)
    if weights.keys() != params.keys():
        raise RuntimeError(f"{path}: its LoRA tensors do not match this model's; delete the checkpoint to start fresh")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    states = torch.load(path / "optimizer.pt", map_location=rt.device, weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    scaler.load_state_dict(states["scaler"])
    return state


# --- reporting -------------------------------------------------------------------------------


class Reporter(Protocol):
    def log(self, message: str) -> None: ...

    def report(self, metrics: dict[str, Any], loss_curve_png: bytes, adapter_dir: Path) -> None: ...


class LogReporter:
    """Progress and the final numbers through `logging` (stdout under the CLI)."""

    def log(self, message: str) -> None:
        log.info(message)

    def report(self, metrics: dict[str, Any], loss_curve_png: bytes, adapter_dir: Path) -> None:
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
        log.info("result %s", json.dumps(scalars))


class NullReporter:
    """DDP ranks other than 0 stay quiet."""

    def log(self, message: str) -> None:
        pass

    def report(self, metrics: dict[str, Any], loss_curve_png: bytes, adapter_dir: Path) -> None:
        pass


# The digits each float keeps in the UI (metrics.json keeps them all).
FLOAT_METRICS = {
    "eval_loss": QUALITY_DIGITS,
    "base_eval_loss": QUALITY_DIGITS,
    "train_loss": QUALITY_DIGITS,
    "wall_time_s": MEASURE_DIGITS,
    "peak_memory_gb": MEASURE_DIGITS,
}
INT_METRICS = ("steps", "tokens_seen", "resumed_from_step")


class PipesReporter:
    """Progress as Dagster log lines, the result as the asset's materialization metadata."""

    def __init__(self, context: Any):  # dagster_pipes.PipesContext
        self.context = context

    def log(self, message: str) -> None:
        self.context.log.info(message)

    def report(self, metrics: dict[str, Any], loss_curve_png: bytes, adapter_dir: Path) -> None:
        image = base64.b64encode(loss_curve_png).decode()
        metadata = {key: {"raw_value": significant(metrics[key], digits), "type": "float"} for key, digits in FLOAT_METRICS.items()}
        metadata |= {key: {"raw_value": metrics[key], "type": "int"} for key in INT_METRICS}
        metadata["tokens_per_second"] = {"raw_value": round(metrics["tokens_per_second"]), "type": "int"}
        metadata["lora_config"] = {"raw_value": metrics["lora_config"], "type": "json"}
        metadata["loss_curve"] = {"raw_value": f"![loss](data:image/png;base64,{image})", "type": "md"}
        metadata["path"] = {"raw_value": str(adapter_dir), "type": "path"}
        self.context.report_asset_materialization(metadata=metadata)


def loss_curve_png(losses: Sequence[float], evals: Sequence[Sequence[float]], base_eval_loss: float) -> bytes:
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, label="train")
    ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval")
    ax.axhline(base_eval_loss, linestyle="--", color="gray", label="base model eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def write_adapter(job: TrainJob, model: PeftModel, tokenizer: Any, metrics: dict[str, Any], png: bytes) -> None:
    """adapter_config.json, adapter_model.safetensors, tokenizer, generation_config.json (from the
    base), the TrainConfig (train_config.json), metrics.json and loss_curve.png; checked, then
    renamed into place."""
    with atomic_dir(job.output_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)
        generation = job.base_model_dir / "generation_config.json"
        if generation.exists():
            shutil.copy2(generation, tmp / generation.name)
        (tmp / "loss_curve.png").write_bytes(png)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(to_dict(job.config), indent=2, ensure_ascii=False), encoding="utf-8")
        saved = load_file(tmp / "adapter_model.safetensors")
        if len(saved) != len(trainable(model)) or not all(t.isfinite().all() for t in saved.values()):
            raise RuntimeError(f"adapter written to {tmp} is incomplete or not finite")


# --- the run ---------------------------------------------------------------------------------


def train_lora(job: TrainJob, reporter: Reporter | None = None) -> TrainResult:
    """Train (or resume) the LoRA adapter of ``job``; rank 0 writes ``job.output_dir``."""
    with running(job.config) as rt:
        return _train(job, rt, reporter)


def _train(job: TrainJob, rt: Runtime, reporter: Reporter | None) -> TrainResult:
    reporter = (reporter or LogReporter()) if rt.is_main else NullReporter()
    cfg = job.config
    tokenizer = AutoTokenizer.from_pretrained(job.base_model_dir, trust_remote_code=False)
    filler_id = tokenizer.eos_token_id
    train_chats, skipped = load_chats(job.train_path, tokenizer, cfg)
    val_chats = load_chats(job.val_path, tokenizer, cfg)[0][: cfg.max_eval_chats or None]
    positions = AutoConfig.from_pretrained(job.base_model_dir, trust_remote_code=False).max_position_embeddings
    if (longest := max(len(c) for c in train_chats + val_chats)) > positions:
        raise ValueError(f"chats reach {longest} tokens, past the model's {positions} positions: lower max_tokens_count")
    plan = DataPlan(train_chats, cfg.per_device_batch_size * cfg.gradient_accumulation_steps * rt.world_size, cfg.seed)
    if plan.steps_per_epoch == 0:
        raise ValueError(
            f"{job.train_path} has {len(train_chats)} usable chats, fewer than one optimizer step's "
            f"{plan.chats_per_step} (per_device_batch_size × gradient_accumulation_steps × {rt.world_size} "
            "processes): lower those or add data"
        )
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * plan.steps_per_epoch))
    val_batches, shape = rank_batches(val_chats, cfg, rt), batch_shape(cfg)
    run, key = open_run(job, rt)

    model = load_lora_model(job.base_model_dir, cfg, rt)
    optimizer = torch.optim.AdamW(list(trainable(model).values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, cfg.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    if latest := checkpoints(run)[-1:]:
        state = load_checkpoint(latest[0], key, model, optimizer, scheduler, scaler, rt)
        reporter.log(f"resuming from {latest[0]} (step {state['step']})")
    else:
        with model.disable_adapter():  # LoRA B starts at 0 anyway: this is the untouched base
            base_eval_loss = evaluate(model, val_batches, filler_id, rt, shape)
        state = {"run_key": key, "step": 0, "base_eval_loss": base_eval_loss, "losses": [], "evals": []}
        state |= {"tokens_seen": 0, "train_time_s": 0.0}
    resumed_from_step = state["step"]
    reporter.log(
        f"{len(train_chats)} train chats ({skipped} without targets skipped), {len(val_chats)} val chats; "
        f"{total_steps} steps of {plan.chats_per_step} chats on {rt.world_size} × {rt.device} "
        f"{str(rt.dtype).removeprefix('torch.')}; base model eval loss {state['base_eval_loss']:.4f}"
    )

    model.train()
    ddp = model
    if rt.distributed:
        ddp = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    for step in range(state["step"], total_steps):
        torch.manual_seed(cfg.seed + step * rt.world_size + rt.rank)  # dropout masks: a function of the step
        t0 = time.perf_counter()
        chats = plan.step_chats(step)
        batches = [collate(rows, filler_id, shape).to(rt.device) for rows in rank_batches(chats, cfg, rt)]
        lr = optimizer.param_groups[0]["lr"]
        n_targets, tokens = sum(c.n_targets for c in chats), sum(len(c) for c in chats)
        loss, grad_norm = train_step(ddp, optimizer, scheduler, scaler, batches, n_targets, cfg, rt)
        seconds = time.perf_counter() - t0
        state["step"] = step + 1
        state["losses"].append(loss)
        state["tokens_seen"] += tokens
        state["train_time_s"] += seconds
        reporter.log(
            f"step {step + 1}/{total_steps} loss {loss:.4f} lr {lr:.3g} grad_norm {grad_norm:.3f} "
            f"tokens/s {tokens / seconds:,.0f}"
        )
        last = step + 1 == total_steps
        if (step + 1) % cfg.eval_steps == 0 or last:
            state["evals"].append([step + 1, evaluate(model, val_batches, filler_id, rt, shape)])
            reporter.log(f"step {step + 1} eval loss {state['evals'][-1][1]:.4f}")
        if rt.is_main and ((step + 1) % cfg.save_steps == 0 or last):
            save_checkpoint(run, model, optimizer, scheduler, scaler, state)

    metrics = {
        "eval_loss": state["evals"][-1][1],
        "base_eval_loss": state["base_eval_loss"],
        "train_loss": sum(state["losses"]) / len(state["losses"]),
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "tokens_per_second": state["tokens_seen"] / state["train_time_s"],
        "wall_time_s": time.perf_counter() - rt.started,
        "peak_memory_gb": peak_memory_gb(rt.device),
        "resumed_from_step": resumed_from_step,
        "lora_config": {k: getattr(cfg, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}
        | {"bias": "none", "fan_in_fan_out": True},
        "train_chats": len(train_chats),
        "train_chats_skipped": skipped,
        "val_chats": len(val_chats),
        "world_size": rt.world_size,
        "device": rt.device.type,
        "dtype": str(rt.dtype).removeprefix("torch."),
        "run_key": key,
        "loss_history": state["losses"],
        "eval_history": state["evals"],
    }
    if rt.distributed:
        metrics["ddp_rank_max_abs_diff"] = _rank_divergence(model, rt)
    if rt.is_main:
        png = loss_curve_png(state["losses"], state["evals"], state["base_eval_loss"])
        write_adapter(job, model, tokenizer, metrics, png)
        reporter.report(metrics, png, job.output_dir)
    return TrainResult(job.output_dir, metrics)


def _rank_divergence(model: torch.nn.Module, rt: Runtime) -> float:
    """Largest difference between any rank's LoRA weights and this rank's (DDP keeps it 0)."""
    flat = torch.cat([p.detach().flatten() for p in trainable(model).values()])
    gathered = [torch.empty_like(flat) for _ in range(rt.world_size)]
    dist.all_gather(gathered, flat)
    return max((g - flat).abs().max().item() for g in gathered)


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """End this process once the one that started it (the Dagster run worker, torchrun's agent,
    a shell) is gone. A trainer left running alone holds the GPU and keeps writing checkpoints
    into the run directory that the next run of the same job resumes from."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        log.error("the process that started this trainer (pid %d) is gone: exiting", launcher)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LoRA-tune a GPT-2 base on chat jsonl files.")
    parser.add_argument("--config", type=Path, required=True, help="job JSON: TrainJob paths and 'train' settings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    exit_with_launcher()
    job = TrainJob.from_json(args.config)
    with running(job.config) as rt, dagster_pipes_reporter(rt) as reporter:
        _train(job, rt, reporter)


@contextmanager
def dagster_pipes_reporter(rt: Runtime) -> Iterator[Reporter | None]:
    """On rank 0 of a process that Dagster Pipes launched, a `PipesReporter` on the open Pipes
    connection (the other ranks stay quiet); otherwise None. dagster_pipes itself recognises its
    launch, and is not needed where the trainer runs without Dagster."""
    if not rt.is_main or importlib.util.find_spec("dagster_pipes") is None:
        yield None
        return
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        yield None
        return
    with open_dagster_pipes() as context:
        yield PipesReporter(context)


if __name__ == "__main__":
    main()
