"""The arithmetic of a step: the summed loss of a batch, one optimizer step over this rank's
micro-batches, the evaluation loss, and how far the ranks' weights drifted apart."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rugpt_assets.core.chat_template import IGNORE_INDEX
from rugpt_assets.core.configs import TrainConfig
from rugpt_assets.core.packing import Batch, Row, collate
from rugpt_assets.core.train.model import trainable
from rugpt_assets.core.train.runtime import Runtime


def loss_sum(model: torch.nn.Module, batch: Batch, rt: Runtime) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's targets (fp32).

    No attention_mask and no cache: that is when transformers reads the restarting position_ids
    as packed chats and masks attention between them; packed_varlen takes the chat boundaries
    from the batch's attention kwargs instead (see `packing`).
    """
    with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype != torch.float32):
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **batch.attention_kwargs()).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


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


def rank_divergence(model: torch.nn.Module, rt: Runtime) -> float:
    """Largest difference between any rank's LoRA weights and this rank's (DDP keeps it 0)."""
    flat = torch.cat([p.detach().flatten() for p in trainable(model).values()])
    gathered = [torch.empty_like(flat) for _ in range(rt.world_size)]
    dist.all_gather(gathered, flat)
    return max((g - flat).abs().max().item() for g in gathered)
