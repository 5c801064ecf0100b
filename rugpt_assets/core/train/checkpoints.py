"""Resumable checkpoints: what identifies a run (its key), where its checkpoints live, saving
the latest and loading it back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rugpt_assets.core import base_model
from rugpt_assets.core.artifacts import collect, publish_dir, publish_file, published, sha256_file
from rugpt_assets.core.configs import to_dict
from rugpt_assets.core.train.job import TrainJob
from rugpt_assets.core.train.model import trainable
from rugpt_assets.core.train.runtime import Runtime

# A run's progress: step, run key, base and eval losses, train losses, tokens seen, time; saved
# in every checkpoint (state.json) and all a resumed run needs besides the weights.
State = dict[str, Any]


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
        with publish_file(run / "run.json") as tmp:
            tmp.write_text(json.dumps({"run_key": key, **job.to_json()}, indent=2))
        collect(run / "checkpoint")  # a resumed run may never save again
    if rt.distributed:
        dist.barrier()  # every rank sees the same checkpoints, so all resume from the same step
    return run, key


def checkpoints(run: Path) -> list[Path]:
    """The run's published checkpoint, if it has one (a one-element list, else empty)."""
    return [run / "checkpoint"] if (run / "checkpoint").exists() else []


def save_checkpoint(run: Path, model, optimizer, scheduler, scaler, state: State) -> None:
    with publish_dir(run / "checkpoint") as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable(model).items()}, tmp / "lora.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
            tmp / "optimizer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state))


def load_checkpoint(path: Path, key: str, model, optimizer, scheduler, scaler, rt: Runtime) -> State:
    path = published(path)  # its three files from one version
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
