"""Where and how a training runs: device, precision and DDP rank. Settings that cannot run here
fail before anything loads. Under torchrun, rank, world size and local rank are torchrun's, as
torch.distributed reads them (env:// rendezvous)."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import get_node_local_rank

from rugpt_assets.core.configs import TrainConfig

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    """Device, precision and DDP rank; rejects settings that cannot run here before anything loads
    (`TrainConfig` itself rejects values that cannot run anywhere)."""
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
        raise ValueError("attn_implementation='packed_varlen' needs a CUDA GPU and precision bf16 or fp16: use 'sdpa' here")

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
