"""merged_model on a >= 1B GPT-2: PEFT's merge_and_unload (the seed's way) vs. the streamed merge.

Builds once, in --work-dir, a random GPT-2 (default 1.1B parameters: n_embd 2048, 20 layers,
vocab 50272, context 2048) saved as float32 safetensors shards, and a LoRA on `c_attn` with the
seed's r/alpha whose B factors are random (a fresh LoRA has B = 0 and would merge to a no-op).
Then each method runs in its own fresh process, so that peak RSS (the child's maxrss) is its own:

  peft    load the base in float32, PeftModel.from_pretrained, merge_and_unload, save_pretrained
  stream  rugpt_assets.core.merge.merge_lora(..., dtype="float16")

and the two outputs are compared tensor by tensor (PEFT's float32 result cast to float16).
Times are the work inside each child (imports excluded).

    python bench/merge_bench.py --work-dir /tmp/merge-bench
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

GB = 1e9


def build(work: Path, n_embd: int, n_layer: int, n_head: int, vocab: int, n_positions: int, shard_size: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from rugpt_assets.core.configs import TrainConfig

    torch.manual_seed(0)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab, n_positions=n_positions)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(work / "base", max_shard_size=shard_size)
    train = TrainConfig()
    lora = LoraConfig(
        r=train.lora_r, lora_alpha=train.lora_alpha, target_modules=train.lora_target_modules,
        fan_in_fan_out=True, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(str(work / "adapter"))


def merge_with_peft(base: Path, adapter: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)


def merge_streamed(base: Path, adapter: Path, out: Path) -> None:
    from rugpt_assets.core.merge import merge_lora

    merge_lora(base, adapter, out, dtype="float16")


def child(method: str, work: Path, spec: dict) -> dict:
    start = time.perf_counter()
    if method == "build":
        build(work, **spec)
    else:
        {"peft": merge_with_peft, "stream": merge_streamed}[method](work / "base", work / "adapter", work / method)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}


def run_child(method: str, work: Path, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--work-dir", str(work), "--child", method, "--spec", json.dumps(spec)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def tensor_files(model_dir: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            files |= {name: path for name in f.keys()}
    return files


def compare(peft_dir: Path, stream_dir: Path, base_dir: Path) -> dict:
    """Max |stream - peft.to(float16)| over all tensors, and how far the LoRA moved c_attn."""
    peft_files, stream_files, base_files = tensor_files(peft_dir), tensor_files(stream_dir), tensor_files(base_dir)
    if peft_files.keys() != stream_files.keys():
        raise SystemExit(f"tensor names differ: {sorted(peft_files.keys() ^ stream_files.keys())}")
    max_diff, lora_moved = 0.0, 0.0
    for name, path in stream_files.items():
        with safe_open(path, "pt") as f, safe_open(peft_files[name], "pt") as g:
            ours, theirs = f.get_tensor(name), g.get_tensor(name)
            if ours.dtype != torch.float16:
                raise SystemExit(f"{name} is {ours.dtype} in the streamed output, expected float16")
            max_diff = max(max_diff, (ours.float() - theirs.to(torch.float16).float()).abs().max().item())
        if "c_attn.weight" in name:
            with safe_open(base_files[name], "pt") as b:
                lora_moved = max(lora_moved, (ours.float() - b.get_tensor(name)).abs().max().item())
    return {"tensors": len(stream_files), "max_abs_diff": max_diff, "lora_max_abs_delta": lora_moved}


def dir_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir()) / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="cache for the base and adapter, and outputs")
    parser.add_argument("--n-embd", type=int, default=2048)
    parser.add_argument("--n-layer", type=int, default=20)
    parser.add_argument("--n-head", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--n-positions", type=int, default=2048)
    parser.add_argument("--shard-size", default="2GB")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the two merged models")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work_dir
    if args.child:
        print(json.dumps(child(args.child, work, json.loads(args.spec))))
        return

    spec = {k: getattr(args, k) for k in ("n_embd", "n_layer", "n_head", "vocab", "n_positions", "shard_size")}
    spec_file = work / "spec.json"
    if not spec_file.exists() or json.loads(spec_file.read_text()) != spec:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        built = run_child("build", work, spec)
        spec_file.write_text(json.dumps(spec))
        print(f"built base + adapter in {built['wall_s']:.0f} s (peak RSS {built['peak_rss_gb']:.1f} GB)")
    files = tensor_files(work / "base")
    params = 0
    for name, path in files.items():
        with safe_open(path, "pt") as f:
            params += math.prod(f.get_slice(name).get_shape())
    shards = len(set(files.values()))
    print(f"base: {params / 1e9:.2f}B parameters, float32, {shards} shards, {dir_gb(work / 'base'):.1f} GB")

    results = {}
    for method in ("peft", "stream"):
        shutil.rmtree(work / method, ignore_errors=True)
        results[method] = run_child(method, work, spec)
    check = compare(work / "peft", work / "stream", work / "base")

    print("| method | output | wall s | peak RSS GB | output GB |\n|---|---|---|---|---|")
    for method, label, dtype in (("peft", "PEFT merge_and_unload", "float32"), ("stream", "merge_lora", "float16")):
        r = results[method]
        print(f"| {label} | {dtype} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | {dir_gb(work / method):.2f} |")
    print(
        f"max |merge_lora - PEFT cast to float16| over {check['tensors']} tensors: {check['max_abs_diff']:g} "
        f"(LoRA moved c_attn weights by up to {check['lora_max_abs_delta']:.3g})"
    )
    if not args.keep_outputs:
        for method in ("peft", "stream"):
            shutil.rmtree(work / method)


if __name__ == "__main__":
    main()
