"""Where progress and the result go (a `Reporter`: logging, nothing, or Dagster Pipes in
`pipes`), the loss curve and the peak memory."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from matplotlib.figure import Figure  # renders with Agg; no pyplot, no display

log = logging.getLogger(__name__)


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
