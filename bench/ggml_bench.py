"""ggml_f16 / ggml_quantized on a 1.3B GPT-2: our streamed writer vs. llm-rs's own converter,
then llm-rs quantization to every QuantType.

Builds once, in --work-dir, a random GPT-2 (default 1.31B parameters: n_embd 2048, 24 layers,
vocab 50272, context 2048) saved as float16 safetensors shards — what `merged_model` writes —
with a small byte-level BPE tokenizer (ids past it are padding, as in ruGPT-3.5). Each step
runs in its own fresh process; peak RSS is that process's VmHWM (the high-water mark of its
own memory: ru_maxrss would include the parent's, inherited through fork), time is the work
inside it (imports excluded).

  ours     rugpt_assets.core.ggml.write_ggml_f16 (streams tensor by tensor)
  llm-rs   llm_rs.convert.AutoConverter.convert (the seed's way: loads the whole model)
  Q…       rugpt_assets.core.quantize.quantize_ggml (llm-rs's quantizer, checks, sha256)

The two f16 files are compared tensor by tensor. Load time and greedy generation speed of each
file in llm-rs are measured with --threads threads on a 16-token prompt.

    python bench/ggml_bench.py --work-dir /tmp/ggml-bench
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GB = 1e9


def build(work: Path, n_embd: int, n_layer: int, n_head: int, vocab: int, n_positions: int, peaked: bool = False) -> None:
    """A random GPT-2: every tensor N(0, 0.02). `peaked`: layer norms at weight 1 and bias 0 and the
    token embedding (also the head) N(0, 0.1), so next-token distributions are peaked as a trained
    model's are, not near uniform; quantization error then shows in KL instead of vanishing in it."""
    from safetensors.numpy import save_file
    from transformers import GPT2Config

    from rugpt_assets.core.demo_model import gpt2_weight_shapes, train_tokenizer

    out = work / "model"
    out.mkdir(parents=True)
    texts = ["Привет! Как дела? Всё хорошо, спасибо.", "Москва — столица России.", "The quick brown fox."] * 50
    train_tokenizer(texts, 1024).save_pretrained(out)
    GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab, n_positions=n_positions,
               bos_token_id=2, eos_token_id=3, pad_token_id=0, architectures=["GPT2LMHeadModel"]).save_pretrained(out)  # fmt: skip
    rng = np.random.default_rng(0)
    items = list(gpt2_weight_shapes(n_embd, n_layer, vocab, n_positions).items())
    shards = [dict(items[: len(items) // 2]), dict(items[len(items) // 2 :])]  # two shards, in checkpoint order
    weight_map = {}
    for n, shapes in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: random_tensor(rng, k, s, peaked) for k, s in shapes.items()}
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], peaked: bool) -> np.ndarray:
    if peaked and ".ln_" in name:
        return np.full(shape, 1.0 if name.endswith(".weight") else 0.0, dtype=np.float16)
    std = 0.1 if peaked and name.endswith("wte.weight") else 0.02
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)


def rss_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024 / GB


def child(step: str, work: Path, spec: dict, threads: int) -> dict:
    from rugpt_assets.core import evaluate, ggml
    from rugpt_assets.core.quantize import QuantType, quantize_ggml

    if step == "llm-rs":
        from llm_rs.convert.auto_converter import AutoConverter
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak from here, after imports
    runtime_gb = rss_gb("VmRSS")
    start = time.perf_counter()
    if step == "build":
        build(work, **spec)
    elif step == "ours":
        ggml.write_ggml_f16(work / "model", work / "ours" / "model-f16.bin")
    elif step == "llm-rs":
        AutoConverter.convert(str(work / "model"), str(work / "llm-rs"))
    else:
        quantize_ggml(work / "ours" / "model-f16.bin", QuantType[step], work / "ours" / f"model-{step.lower()}.bin")
    result = {"wall_s": time.perf_counter() - start, "peak_rss_gb": rss_gb("VmHWM"), "runtime_gb": runtime_gb}
    if step not in ("build", "llm-rs"):
        path = work / "ours" / ("model-f16.bin" if step == "ours" else f"model-{step.lower()}.bin")
        model, result["load_s"] = evaluate.load_llm_rs(path, threads)
        result["tokens_per_s"] = evaluate.generate(model, "Привет! " * 8, 16, stop_at_special=False).tokens_per_s
        result["gb"] = path.stat().st_size / GB
    return result


def run_child(step: str, work: Path, spec: dict, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--work-dir", str(work), "--threads", str(threads), "--child", step,
           "--spec", json.dumps(spec)]  # fmt: skip
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def same_f16_tensors(ours: Path, theirs: Path) -> str:
    from rugpt_assets.core import ggml

    a, b = ggml.read_ggml(ours), ggml.read_ggml(theirs)
    if list(a.tensors) != list(b.tensors):
        return "tensor names differ"
    for name, t in a.tensors.items():
        u = b.tensors[name]
        if (t.type, t.ne) != (u.type, u.ne) or (t.type == ggml.GGMLQuantizationType.F16 and not np.array_equal(t.data, u.data)):
            return f"{name} differs"
        if t.type == ggml.GGMLQuantizationType.F32 and not np.array_equal(t.to_numpy(), u.to_numpy()):  # an f16 source: exact in f32 too
            return f"{name} differs"
    return f"all {len(a.tensors)} tensors equal"


def main() -> None:
    from rugpt_assets.core.quantize import QuantType

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="cache for the model, and outputs")
    parser.add_argument("--n-embd", type=int, default=2048)
    parser.add_argument("--n-layer", type=int, default=24)
    parser.add_argument("--n-head", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--n-positions", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2, help="llm-rs threads for load/generation")
    parser.add_argument("--skip-llm-rs", action="store_true", help="skip llm-rs's converter")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work_dir
    if args.child:
        print(json.dumps(child(args.child, work, json.loads(args.spec), args.threads)))
        return

    spec = {k: getattr(args, k) for k in ("n_embd", "n_layer", "n_head", "vocab", "n_positions")}
    spec_file = work / "spec.json"
    if not spec_file.exists() or json.loads(spec_file.read_text()) != spec:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        built = run_child("build", work, spec, args.threads)
        spec_file.write_text(json.dumps(spec))
        print(f"built the model in {built['wall_s']:.0f} s")
    model_gb = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors")) / GB
    print(f"model: {spec}, float16 safetensors, {model_gb:.2f} GB")

    steps = ["ours"] + ([] if args.skip_llm_rs else ["llm-rs"]) + [q.name for q in QuantType]
    shutil.rmtree(work / "ours", ignore_errors=True)
    shutil.rmtree(work / "llm-rs", ignore_errors=True)
    results = {step: run_child(step, work, spec, args.threads) for step in steps}

    print("| step | wall s | peak RSS GB (runtime before) | file GB | llm-rs load s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for step, r in results.items():
        label = {"ours": "f16: write_ggml_f16", "llm-rs": "f16: llm-rs AutoConverter"}.get(step, f"quantize {step}")
        gb = r.get("gb", sum(p.stat().st_size for p in (work / "llm-rs").glob("*.bin")) / GB)
        extra = f"{r['load_s']:.2f} | {r['tokens_per_s']:.1f}" if "load_s" in r else "– | –"
        rss = f"{r['peak_rss_gb']:.2f} ({r['runtime_gb']:.2f})"
        print(f"| {label} | {r['wall_s']:.1f} | {rss} | {gb:.2f} | {extra} |")
    if not args.skip_llm_rs:
        theirs = next((work / "llm-rs").glob("*.bin"))
        print("f16 files:", same_f16_tensors(work / "ours" / "model-f16.bin", theirs))


if __name__ == "__main__":
    main()
