"""The model side: the base model (safetensors only, no remote code) with a fresh LoRA adapter,
and the adapter written out with everything needed to use it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from rugpt_assets.core.artifacts import publish_dir
from rugpt_assets.core.configs import TRAIN_CONFIG_FILE, TrainConfig, to_dict
from rugpt_assets.core.train.job import TrainJob
from rugpt_assets.core.train.runtime import Runtime


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


def write_adapter(job: TrainJob, model: PeftModel, tokenizer: Any, metrics: dict[str, Any], png: bytes) -> None:
    """adapter_config.json, adapter_model.safetensors, tokenizer, generation_config.json (from the
    base), the TrainConfig (train_config.json), metrics.json and loss_curve.png; checked, then
    published."""
    with publish_dir(job.output_dir) as tmp:
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
