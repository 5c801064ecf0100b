"""Streamed evaluation of GGML files (`rugpt_assets.core.evaluate`) on a GPT-2 of ruGPT-3.5's
width: peak RSS and time for the f16 file (scored once, its top-k reference written) and one
quantization (scored against that reference), then the arithmetic to the 13B shape.

Builds once, in --work-dir, a random GPT-2 (default 3.41B parameters: n_embd 5120 and 40 heads
like ruGPT-3.5-13B, 10 layers instead of 40, vocab 50272, context 2048) through the project's
own path: float16 safetensors shards (`ggml_bench.build`, what `merged_model` writes),
`ggml.write_ggml_f16`, then `quantize_ggml` to --quant. Its tokenizer is a byte-level BPE
trained on the bundled samples (ids past it are padding, as in ruGPT-3.5).

The evaluation set is small on purpose (--chats, default 4 saiga chats from the bundled
samples, at most 256 tokens each): time grows with tokens, peak memory only through the hidden
states (tokens × n_embd floats), which the extrapolation adds back. Each step runs in a fresh
process; peak RSS is its VmHWM, reset after imports and tokenization (the runtime's RSS at
that point in brackets); time is the step's work. Step `greedy check` is the reference pass of
the f16 asset check (`evaluate.greedy_agreement`): the merged safetensors' next-token choices
after a 64-token prompt and 16 drafted tokens, in one streamed pass. With
--llm-rs, also llm-rs's load and a 16-token generation of each file (what `evaluate_ggml_file`
and the asset checks do besides scoring): llm-rs reads an unversioned GGML file whole into
memory (it memory-maps only GGJT files), so its RSS is the file's size (RssAnon).

With --kl-accuracy it measures instead how close KL over f16's top k + tail comes to the exact
KL, for every quantization of the demo profile's base model (`kl_accuracy`).

    python bench/eval_bench.py --work-dir /tmp/eval-bench --threads 2 --llm-rs
    python bench/eval_bench.py --work-dir /tmp/kl-accuracy --kl-accuracy --chats 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ggml_bench import build, rss_gb

GB = 1e9
RUGPT35 = {"n_embd": 5120, "n_layer": 40, "vocab": 50272}


def prepare(work: Path, spec: dict) -> None:
    from rugpt_assets import settings
    from rugpt_assets.core.demo_model import sample_texts, train_tokenizer

    build(work, **spec)
    train_tokenizer(list(sample_texts(settings.BUNDLED_SAMPLES_DIR)), 4096).save_pretrained(work / "model")


def eval_set(model_dir: Path, chats: int):
    from transformers import AutoTokenizer

    from rugpt_assets import settings
    from rugpt_assets.core import sources
    from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, ExportConfig
    from rugpt_assets.core.scoring import build_eval_set

    saiga = sources.load_local(sources.SOURCES_BY_NAME["ru_turbo_saiga"], settings.BUNDLED_SAMPLES_DIR).rows
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return build_eval_set(saiga, tokenizer, ExportConfig().eval_max_tokens, DEFAULT_SYSTEM_PROMPT, chats)


def child(step: str, work: Path, chats: int, threads: int, quant: str) -> dict:
    import torch

    from rugpt_assets.core import evaluate, ggml
    from rugpt_assets.core.configs import ExportConfig
    from rugpt_assets.core.quantize import QuantType, quantize_ggml
    from rugpt_assets.core.scoring import Reference, Scores

    torch.set_num_threads(threads)
    chat_tokens = eval_set(work / "model", chats)
    path = work / f"model-{step.removeprefix('llm-rs ').lower()}.bin"
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here: after imports and tokenization
    result = {"runtime_gb": rss_gb("VmRSS")}
    start = time.perf_counter()
    if step == "write f16":
        ggml.write_ggml_f16(work / "model", work / "model-f16.bin")
    elif step == f"quantize {quant}":
        quantize_ggml(work / "model-f16.bin", QuantType[quant], work / f"model-{quant.lower()}.bin")
    elif step == "greedy check":
        draft = list(chat_tokens.chats[0][0][:79])  # a 64-token prompt and 15 of 16 drafted tokens, as the check
        result["tokens"] = len(evaluate.next_token_argmax(evaluate.CheckpointWeights(work / "model"), draft, 63))
    elif step.startswith("llm-rs "):
        model, result["load_s"] = evaluate.load_llm_rs(path, threads)
        result["tokens_per_s"] = evaluate.generate(model, "Привет! " * 8, 16, stop_at_special=False).tokens_per_s
        status = Path("/proc/self/status").read_text()
        result |= {f: rss_gb(f) for f in ("RssAnon", "RssFile") if f in status}
    else:
        reference = None if step == "f16" else Reference.load(evaluate.reference_path(work / "model-f16.bin"))
        scores = Scores(reference, top_k=0 if reference else ExportConfig().kl_top_k)
        for logprobs, targets in evaluate.target_logprobs(evaluate.GGMLWeights(path), chat_tokens):
            scores.add(logprobs, targets)
        result |= {"perplexity": scores.perplexity, "tokens": scores.tokens}
        if reference is None:
            scores.as_reference(chat_tokens, {}).save(evaluate.reference_path(path))
        else:
            result |= {"kl": scores.kl, "tail_mass": scores.reference_tail_mass}
    result |= {"wall_s": time.perf_counter() - start, "peak_rss_gb": rss_gb("VmHWM")}
    return result


def run_child(step: str, work: Path, chats: int, threads: int, quant: str) -> dict:
    cmd = [sys.executable, __file__, "--work-dir", str(work), "--threads", str(threads), "--chats", str(chats),
           "--quant", quant, "--child", step]  # fmt: skip
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def extrapolate(spec: dict, measured_gb: float, tokens: int, targets: int) -> list[str]:
    """Peaks at the 13B shape from peaks measured at the same width and vocabulary: depth adds
    nothing to the streamed evaluation (one layer at a time); more evaluation tokens add their
    hidden states, and the top-k reference (kept while f16 is scored, loaded while a
    quantization is). Writing and quantizing peak with the largest tensor (the embedding),
    the same at 13B. llm-rs holds the whole file and its KV cache."""
    from rugpt_assets.core.configs import ExportConfig

    export = ExportConfig()
    e, layers, vocab, ctx = RUGPT35["n_embd"], RUGPT35["n_layer"], RUGPT35["vocab"], spec["n_positions"]
    full_tokens = export.eval_chats * export.eval_max_tokens  # the most the default evaluation scores
    full_targets = full_tokens - export.eval_chats  # a chat's first token is never a target
    hidden = (full_tokens - tokens) * e * 4 / GB
    reference = (full_targets - targets) * export.kl_top_k * 8 / GB
    f16_file = (2 * (12 * e * e * layers + 2 * vocab * e) + 4 * (13 * e * layers + 2 * e + ctx * e)) / GB
    kv_cache = 2 * layers * ctx * e * 2 / GB  # llm-rs keeps keys and values in f16
    params = 12 * e * e * layers + (vocab + ctx) * e
    bench_params = 12 * spec["n_embd"] ** 2 * spec["n_layer"] + (spec["vocab"] + ctx) * spec["n_embd"]
    return [
        f"one float32 layer at n_embd {e}: {12 * e * e * 4 / GB:.2f} GB; float32 lm_head: {vocab * e * 4 / GB:.2f} GB (the same at 13B)",
        f"hidden states for {full_tokens} tokens instead of {tokens}: +{hidden:.2f} GB; top-{export.kl_top_k} "
        f"reference for {full_targets} targets instead of {targets}: +{reference:.3f} GB",
        f"streamed evaluation at 13B ({layers} layers): {measured_gb:.2f} + {hidden:.2f} + {reference:.3f} = "
        f"{measured_gb + hidden + reference:.2f} GB peak",
        f"llm-rs at 13B: the f16 file {f16_file:.1f} GB + KV cache up to {kv_cache:.2f} GB + runtime",
        f"whole-model path at 13B: float32 weights {params * 4 / GB:.1f} GB + an untied float32 lm_head "
        f"{vocab * e * 4 / GB:.2f} GB, plus {vocab * 4 / 1e3:.0f} KB of log-probs per target token and file",
        f"whole-model path at this size ({bench_params / 1e9:.2f}B parameters): float32 weights "
        f"{bench_params * 4 / GB:.1f} GB + lm_head {spec['vocab'] * spec['n_embd'] * 4 / GB:.2f} GB",
    ]


def kl_accuracy(work: Path, chats: int) -> None:
    """KL over f16's top k + tail (`scoring`) against the exact full-vocabulary KL, for every
    quantization of the demo profile's base model (vocabulary 2048, pre-trained on the bundled
    samples), on `chats` saiga chats."""
    import torch

    from rugpt_assets import settings
    from rugpt_assets.core import evaluate, ggml
    from rugpt_assets.core.demo_model import build_demo_model, sample_texts
    from rugpt_assets.core.quantize import QuantType, quantize_ggml
    from rugpt_assets.core.scoring import Scores

    model_dir = work / "demo-model"
    if not (model_dir / "config.json").exists():
        build_demo_model(sample_texts(settings.BUNDLED_SAMPLES_DIR), model_dir)
    ggml.write_ggml_f16(model_dir, work / "demo-f16.bin")
    files = {q.name: quantize_ggml(work / "demo-f16.bin", q, work / f"demo-{q.name.lower()}.bin").path for q in QuantType}
    chat_tokens = eval_set(model_dir, chats)

    def logprobs(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = list(evaluate.target_logprobs(evaluate.GGMLWeights(path), chat_tokens))
        return torch.cat([c for c, _ in chunks]), torch.cat([t for _, t in chunks])

    p, targets = logprobs(work / "demo-f16.bin")
    ks = (16, 64, 256, 1024)
    print(f"{len(targets)} target tokens, vocabulary {p.shape[1]}; KL over top k + tail / exact KL (f16 tail mass)")
    print("| type | exact KL | " + " | ".join(f"k = {k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for name, path in files.items():
        q = logprobs(path)[0]
        exact = torch.nn.functional.kl_div(q.double(), p.double(), log_target=True, reduction="sum").item() / len(p)
        cells = []
        for k in ks:
            reference = Scores(top_k=k)
            reference.add(p, targets)
            scored = Scores(reference.as_reference(chat_tokens, {}))
            scored.add(q, targets)
            cells.append(f"{scored.kl / exact:.3f} ({scored.reference_tail_mass:.4f})")
        print(f"| {name} | {exact:.3g} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="cache for the model files, and outputs")
    parser.add_argument("--n-embd", type=int, default=5120)
    parser.add_argument("--n-layer", type=int, default=10)
    parser.add_argument("--n-head", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--n-positions", type=int, default=2048)
    parser.add_argument("--quant", default="Q5_1")
    parser.add_argument("--chats", type=int, default=4, help="evaluation chats (bundled saiga samples)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and llm-rs) threads")
    parser.add_argument("--llm-rs", action="store_true", help="also llm-rs load + 16-token generation")
    parser.add_argument("--kl-accuracy", action="store_true", help="only: top-k KL against exact KL on the demo model")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work_dir
    if args.kl_accuracy:
        work.mkdir(parents=True, exist_ok=True)
        kl_accuracy(work, args.chats)
        return
    if args.child:
        if args.child == "prepare":
            prepare(work, json.loads((work / "spec.json").read_text()))
            print(json.dumps({}))
        else:
            print(json.dumps(child(args.child, work, args.chats, args.threads, args.quant)))
        return

    spec = {k: getattr(args, k) for k in ("n_embd", "n_layer", "n_head", "vocab", "n_positions")}
    spec_file = work / "spec.json"
    if not spec_file.exists() or json.loads(spec_file.read_text()) != spec or not (work / "built").exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
        work.mkdir(parents=True)
        spec_file.write_text(json.dumps(spec))
        start = time.perf_counter()
        run_child("prepare", work, args.chats, args.threads, args.quant)
        (work / "built").touch()
        print(f"built the model in {time.perf_counter() - start:.0f} s")

    steps = ["write f16", f"quantize {args.quant}", "f16", args.quant, "greedy check"]
    steps += ["llm-rs f16", f"llm-rs {args.quant}"] if args.llm_rs else []
    load_before = os.getloadavg()[0]
    results = {step: run_child(step, work, args.chats, args.threads, args.quant) for step in steps}
    print(f"machine load average (1 min) {load_before:.1f} before the steps, {os.getloadavg()[0]:.1f} after")
    sizes = {p.name: p.stat().st_size / GB for p in sorted(work.glob("model-*.bin"))}
    print(f"model: {spec}; files: " + ", ".join(f"{n} {s:.2f} GB" for n, s in sizes.items()))
    print(f"evaluation set: {args.chats} chats, {results['f16']['tokens']} target tokens; threads {args.threads}")
    print("| step | wall s | peak RSS GB (runtime before) | notes |")
    print("|---|---|---|---|")
    for step, r in results.items():
        if step.startswith("llm-rs"):
            notes = (
                f"load {r['load_s']:.1f} s, {r['tokens_per_s']:.2f} tokens/s; "
                f"at the end RssAnon {r.get('RssAnon', 0):.2f} GB, RssFile {r.get('RssFile', 0):.2f} GB"
            )
        elif step == "greedy check":
            notes = f"the f16 check's reference: {r['tokens']} next-token choices of the merged safetensors in one pass"
        elif step in ("write f16", f"quantize {args.quant}"):
            notes = "the export step itself, for the node's size"
        elif step == "f16":
            notes = f"perplexity {r['perplexity']:.1f}; reference written"
        else:
            notes = f"perplexity {r['perplexity']:.1f}; KL to f16 {r['kl']:.4g} (f16 tail mass {r['tail_mass']:.3f})"
        print(f"| {step} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} ({r['runtime_gb']:.2f}) | {notes} |")
    if (spec["n_embd"], spec["vocab"]) != (RUGPT35["n_embd"], RUGPT35["vocab"]):
        print("- no extrapolation to 13B: it needs ruGPT-3.5's n_embd and vocab")
        return
    peak = max(results["f16"]["peak_rss_gb"], results[args.quant]["peak_rss_gb"])
    tokens = sum(len(ids) for ids, _ in eval_set(work / "model", args.chats).chats)
    for line in extrapolate(spec, peak, tokens, results["f16"]["tokens"]):
        print("-", line)


if __name__ == "__main__":
    main()
