"""`train_lora`: prepare, resume, loop, finish.

`prepare` reads the chats and builds the model, optimizer and schedule (a `Training`); `resume`
restores the latest checkpoint of the same run, or measures the untouched base model; `loop`
runs the optimizer steps, evaluating and checkpointing on schedule; `finish` writes the adapter
and reports the numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoConfig, AutoTokenizer, get_scheduler

from rugpt_assets.core.artifacts import check_safetensors
from rugpt_assets.core.configs import TrainConfig
from rugpt_assets.core.packing import Row, TokenizedChat, collate
from rugpt_assets.core.train.checkpoints import State, checkpoints, load_checkpoint, open_run, save_checkpoint
from rugpt_assets.core.train.data import DataPlan, batch_shape, load_chats, rank_batches
from rugpt_assets.core.train.job import TrainJob, TrainResult
from rugpt_assets.core.train.model import load_lora_model, trainable, write_adapter
from rugpt_assets.core.train.reporting import LogReporter, NullReporter, Reporter, loss_curve_png, peak_memory_gb
from rugpt_assets.core.train.runtime import Runtime, running
from rugpt_assets.core.train.steps import evaluate, rank_divergence, train_step


@dataclass(frozen=True)
class Training:
    """What every step works with, built once before the first."""

    job: TrainJob
    rt: Runtime
    tokenizer: Any
    train_chats: list[TokenizedChat]
    skipped: int  # train chats without a target token within max_tokens_count
    val_chats: list[TokenizedChat]
    plan: DataPlan
    total_steps: int
    val_batches: list[list[Row]]
    shape: tuple[int, int] | None  # see `data.batch_shape`
    run_dir: Path
    run_key: str
    model: PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a transformers learning-rate schedule
    scaler: torch.amp.GradScaler

    @property
    def cfg(self) -> TrainConfig:
        return self.job.config

    @property
    def filler_id(self) -> int:
        return self.tokenizer.eos_token_id

    def eval_loss(self) -> float:
        return evaluate(self.model, self.val_batches, self.filler_id, self.rt, self.shape)


def train_lora(job: TrainJob, reporter: Reporter | None = None) -> TrainResult:
    """Train (or resume) the LoRA adapter of ``job``; rank 0 writes ``job.output_dir``."""
    with running(job.config) as rt:
        return train(job, rt, reporter)


def train(job: TrainJob, rt: Runtime, reporter: Reporter | None = None) -> TrainResult:
    """`train_lora` on a runtime already started (the CLI connects Pipes in between); ranks other
    than 0 report nothing."""
    reporter = (reporter or LogReporter()) if rt.is_main else NullReporter()
    training = prepare(job, rt)
    state = resume(training, reporter)
    resumed_from_step = state["step"]
    loop(training, state, reporter)
    return finish(training, state, resumed_from_step, reporter)


def prepare(job: TrainJob, rt: Runtime) -> Training:
    """The chats, checked against the model and the step size; the run's checkpoint directory;
    the model with a fresh adapter, its optimizer, learning-rate schedule and grad scaler."""
    cfg = job.config
    check_safetensors(job.base_model_dir)  # a truncated shard fails now, not after tokenizing
    tokenizer = AutoTokenizer.from_pretrained(job.base_model_dir, trust_remote_code=False)
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
    run_dir, key = open_run(job, rt)

    model = load_lora_model(job.base_model_dir, cfg, rt)
    optimizer = torch.optim.AdamW(list(trainable(model).values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, cfg.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    return Training(
        job, rt, tokenizer, train_chats, skipped, val_chats, plan, total_steps, rank_batches(val_chats, cfg, rt),
        batch_shape(cfg), run_dir, key, model, optimizer, scheduler, scaler,
    )  # fmt: skip


def resume(t: Training, reporter: Reporter) -> State:
    """The latest checkpoint of this run restored into the model and optimizer, or a fresh state
    with the untouched base model's eval loss."""
    if latest := checkpoints(t.run_dir)[-1:]:
        state = load_checkpoint(latest[0], t.run_key, t.model, t.optimizer, t.scheduler, t.scaler, t.rt)
        reporter.log(f"resuming from {latest[0]} (step {state['step']})")
    else:
        with t.model.disable_adapter():  # LoRA B starts at 0 anyway: this is the untouched base
            base_eval_loss = t.eval_loss()
        state = {"run_key": t.run_key, "step": 0, "base_eval_loss": base_eval_loss, "losses": [], "evals": []}
        state |= {"tokens_seen": 0, "train_time_s": 0.0}
    reporter.log(
        f"{len(t.train_chats)} train chats ({t.skipped} without targets skipped), {len(t.val_chats)} val chats; "
        f"{t.total_steps} steps of {t.plan.chats_per_step} chats on {t.rt.world_size} × {t.rt.device} "
        f"{str(t.rt.dtype).removeprefix('torch.')}; base model eval loss {state['base_eval_loss']:.4f}"
    )
    return state


def loop(t: Training, state: State, reporter: Reporter) -> None:
    """The optimizer steps from ``state["step"]`` to the last, each on the chats the plan gives
    it; evaluates every ``eval_steps`` and checkpoints every ``save_steps`` (and at the end)."""
    cfg, rt = t.cfg, t.rt
    t.model.train()
    ddp = t.model
    if rt.distributed:
        ddp = DistributedDataParallel(t.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    for step in range(state["step"], t.total_steps):
        torch.manual_seed(cfg.seed + step * rt.world_size + rt.rank)  # dropout masks: a function of the step
        started = time.perf_counter()
        chats = t.plan.step_chats(step)
        batches = [collate(rows, t.filler_id, t.shape).to(rt.device) for rows in rank_batches(chats, cfg, rt)]
        lr = t.optimizer.param_groups[0]["lr"]
        n_targets, tokens = sum(c.n_targets for c in chats), sum(len(c) for c in chats)
        loss, grad_norm = train_step(ddp, t.optimizer, t.scheduler, t.scaler, batches, n_targets, cfg, rt)
        seconds = time.perf_counter() - started
        state["step"] = step + 1
        state["losses"].append(loss)
        state["tokens_seen"] += tokens
        state["train_time_s"] += seconds
        reporter.log(
            f"step {step + 1}/{t.total_steps} loss {loss:.4f} lr {lr:.3g} grad_norm {grad_norm:.3f} tokens/s {tokens / seconds:,.0f}"
        )
        last = step + 1 == t.total_steps
        if (step + 1) % cfg.eval_steps == 0 or last:
            state["evals"].append([step + 1, t.eval_loss()])
            reporter.log(f"step {step + 1} eval loss {state['evals'][-1][1]:.4f}")
        if rt.is_main and ((step + 1) % cfg.save_steps == 0 or last):
            save_checkpoint(t.run_dir, t.model, t.optimizer, t.scheduler, t.scaler, state)


def finish(t: Training, state: State, resumed_from_step: int, reporter: Reporter) -> TrainResult:
    """The run's numbers; on rank 0 the adapter (with them and the loss curve) written and reported."""
    cfg, rt = t.cfg, t.rt
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
        "train_chats": len(t.train_chats),
        "train_chats_skipped": t.skipped,
        "val_chats": len(t.val_chats),
        "world_size": rt.world_size,
        "device": rt.device.type,
        "dtype": str(rt.dtype).removeprefix("torch."),
        "run_key": t.run_key,
        "loss_history": state["losses"],
        "eval_history": state["evals"],
    }
    if rt.distributed:
        metrics["ddp_rank_max_abs_diff"] = rank_divergence(t.model, rt)
    if rt.is_main:
        png = loss_curve_png(state["losses"], state["evals"], state["base_eval_loss"])
        write_adapter(t.job, t.model, t.tokenizer, metrics, png)
        reporter.report(metrics, png, t.job.output_dir)
    return TrainResult(t.job.output_dir, metrics)
