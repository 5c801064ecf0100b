"""LoRA fine-tuning of the GPT-2 base on the chat set (docs/ARCHITECTURE.md, "Training"): a plain
loop, not HF Trainer.

Run ``python -m rugpt_assets.core.train --config job.json`` (under ``torchrun --nproc_per_node N``
for DDP), or call `train_lora` in-process. ``job.json`` holds the `TrainJob` paths and a
``"train"`` object of `TrainConfig` values. Launched by Dagster Pipes, rank 0 streams progress
lines and the final materialization metadata back; otherwise progress goes to stdout.
``output_dir/metrics.json`` holds the same numbers either way.

Where things are:

- `job`: the trainer's input (`TrainJob`) and output (`TrainResult`);
- `runtime`: device, precision and DDP rank (torchrun's, as torch.distributed reads them);
- `model`: the base model with a fresh LoRA adapter, and the adapter written out;
- `data`: tokenized chats, packed rows, the chats of each optimizer step;
- `steps`: the loss, one optimizer step, the evaluation;
- `checkpoints`: the run key, saving and loading a resumable checkpoint;
- `reporting`: progress lines, the loss curve, peak memory;
- `pipes`: the one place in core that talks to Dagster Pipes;
- `loop`: `train_lora` — prepare, resume, loop, finish;
- `cli`: ``python -m rugpt_assets.core.train``.

Resume. The latest checkpoint lives in ``runs_dir/<run key>/checkpoint/`` (LoRA weights,
optimizer, scheduler, grad scaler, step, history), replaced at each save by the publication
rule. The run key hashes the TrainConfig, the world size, the bytes of the train/val files and
the base model's content hash (the one its snapshot manifest recorded, see `base_model`; hashed
from the files when there is no manifest). A run with the same key continues from its latest
checkpoint; anything else starts fresh. Data order and dropout masks are functions of (seed,
step, rank), so the step is all the data position and RNG state a resumed run needs to repeat
the uninterrupted one.

Loss. Every optimizer step averages next-token cross-entropy over all target tokens of its
rows, whichever micro-batch or rank they land on; so packing, gradient accumulation and DDP
change the arithmetic grouping only.
"""

from rugpt_assets.core.train.checkpoints import run_key
from rugpt_assets.core.train.data import DataPlan, batch_shape, load_chats, rank_batches
from rugpt_assets.core.train.job import TrainJob, TrainResult
from rugpt_assets.core.train.loop import train_lora
from rugpt_assets.core.train.model import add_lora, compile_blocks, load_lora_model, lora_config, trainable
from rugpt_assets.core.train.pipes import PipesReporter
from rugpt_assets.core.train.runtime import Runtime
from rugpt_assets.core.train.steps import evaluate, loss_sum, train_step

# Bump by hand whenever the adapter this package produces changes (Dagster code_version).
TRAINER_VERSION = "1"

__all__ = [
    "TRAINER_VERSION",
    "DataPlan",
    "PipesReporter",
    "Runtime",
    "TrainJob",
    "TrainResult",
    "add_lora",
    "batch_shape",
    "compile_blocks",
    "evaluate",
    "load_chats",
    "load_lora_model",
    "lora_config",
    "loss_sum",
    "rank_batches",
    "run_key",
    "train_lora",
    "train_step",
    "trainable",
]
