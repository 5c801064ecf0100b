"""GGML (llm-rs) against GGUF (llama.cpp) on one model: every file's size, bits per weight,
generation speed with the same threads in the same run, and perplexity and KL to its format's
f16 on the same chats; plus the time and peak RSS of writing and quantizing each file.

Model: by default ggml_bench's random GPT-2 of 1.31B parameters (n_embd 2048, 24 layers,
vocab 50272, context 2048, float16 safetensors), built once in --work-dir and shared with
bench/ggml_bench.py. Each step runs in its own fresh process; peak RSS is that process's
VmHWM, time is the work inside it (imports excluded).

  write    ggml.write_ggml_f16 / gguf.write_gguf_f16 (both stream tensor by tensor)
  quant    quantize.quantize_ggml (llm-rs) for every QuantType, gguf.quantize_gguf (llama.cpp) for every GGUFType
  eval     evaluate.evaluate_ggml_file / gguf_eval.evaluate_gguf_file: perplexity and KL to f16
           on the same evaluation set, --eval-chats chats of at most --eval-max-tokens tokens
           (GGML: dequantized weights in the streamed torch pass; GGUF: llama.cpp's own logits)
  speed    --new-tokens greedy tokens after a 16-token prompt, never stopping early, --threads
           threads, after one warm-up generation; the median of --repeats runs (part of eval;
           `--steps speed` measures only size and speed, without perplexity and KL)

A random model's perplexity is near its vocabulary size and means little; KL to f16 is what
ranks the types. --model-dir points at any GPT-2 safetensors checkpoint instead (for example
the demo's merged_model), with --chats a JSONL of `{"messages": [...]}` rows.

    python bench/gguf_bench.py --work-dir /tmp/ggml-bench
    python bench/gguf_bench.py --work-dir /tmp/ggml-bench --steps eval --formats GGML   # one part again
    python bench/gguf_bench.py --work-dir /tmp/demo-bench --model-dir storage/artifacts/merged_model \
        --chats storage/artifacts/chat_set/val.jsonl --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ggml_bench import build, rss_gb  # noqa: E402  (the shared random model)

SPEED_PROMPT = "Привет! " * 8
# Used when no --chats: short Russian chats in the project's row format.
BENCH_CHATS = [
    {"messages": [{"role": "user", "content": q}, {"role": "bot", "content": a}]}
    for q, a in [
        ("Привет! Как дела?", "Всё хорошо, спасибо. А у тебя?"),
        ("Что такое ёжик?", "Ёжик — маленький зверёк с иголками, «колючий» друг."),
        ("Назови столицу России.", "Москва — столица России."),
        ("Сколько будет 2+2?", "2 + 2 = 4."),
        ("Расскажи о себе.", "Я — русскоязычный автоматический ассистент. Я разговариваю с людьми и помогаю им."),
        ("Переведи: dog", "Собака.\tПёс."),
    ]
]


def files(work: Path) -> list[tuple[str, str, Path]]:
    from rugpt_assets.core.gguf import GGUFType
    from rugpt_assets.core.quantize import QuantType

    return (
        [("GGML", "F16", work / "ggml" / "model-f16.bin")]
        + [("GGML", q.name, work / "ggml" / f"model-{q.name.lower()}.bin") for q in QuantType]
        + [("GGUF", "F16", work / "gguf" / "model-f16.gguf")]
        + [("GGUF", t.name, work / "gguf" / f"model-{t.name.lower()}.gguf") for t in GGUFType]
    )


def speed(container: str, path: Path, threads: int, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding speed and load time of one file, after a warm-up generation."""
    from rugpt_assets.core import evaluate

    if container == "GGML":
        model, load_s = evaluate.load_llm_rs(path, threads)

        def run() -> float:
            return evaluate.generate(model, SPEED_PROMPT, new_tokens, stop_at_special=False).tokens_per_s
    else:
        from rugpt_assets.core import gguf_eval

        model, load_s = gguf_eval.load_llama(path, threads)

        def run() -> float:
            return gguf_eval.greedy_tokens(model, SPEED_PROMPT, new_tokens)[1]

    run()
    rates = [run() for _ in range(repeats)]
    return {"load_s": load_s, "tokens_per_s": statistics.median(rates), "tokens_per_s_runs": rates}


def child(step: str, args) -> dict:
    from transformers import AutoTokenizer

    from rugpt_assets.core import evaluate, ggml, gguf, gguf_eval
    from rugpt_assets.core.configs import ExportConfig
    from rugpt_assets.core.gguf import GGUFType
    from rugpt_assets.core.quantize import QuantType, quantize_ggml
    from rugpt_assets.core.scoring import build_eval_set

    work, model_dir = args.work_dir, args.model_dir or args.work_dir / "model"
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak from here, after imports
    start = time.perf_counter()
    kind, _, name = step.partition(":")
    if kind == "build":
        build(work, **json.loads(args.spec))
    elif kind == "write" and name == "GGML":
        ggml.write_ggml_f16(model_dir, work / "ggml" / "model-f16.bin")
    elif kind == "write":
        card = gguf.ModelCard("bench", "random GPT-2", "none", "mit")
        gguf.write_gguf_f16(model_dir, work / "gguf" / "model-f16.gguf", card)
    elif kind == "quant" and name.startswith("GGML/"):
        quant = QuantType[name.removeprefix("GGML/")]
        quantize_ggml(work / "ggml" / "model-f16.bin", quant, work / "ggml" / f"model-{quant.name.lower()}.bin")
    elif kind == "quant":
        gguf_type = GGUFType[name.removeprefix("GGUF/")]
        out = work / "gguf" / f"model-{gguf_type.name.lower()}.gguf"
        gguf.quantize_gguf(work / "gguf" / "model-f16.gguf", gguf_type, out, args.threads)
    elif kind == "speed":
        container, quant = name.split("/")
        path = {(c, q): p for c, q, p in files(work)}[(container, quant)]
        f16 = {(c, q): p for c, q, p in files(work)}[(container, "F16")]
        figures = (ggml if container == "GGML" else gguf).file_figures(path, f16)
        return {**figures, **speed(container, path, args.threads, args.new_tokens, args.repeats)}
    elif kind == "eval":
        container, quant = name.split("/")
        path = {(c, q): p for c, q, p in files(work)}[(container, quant)]
        f16 = {(c, q): p for c, q, p in files(work)}[(container, "F16")]
        chats = [json.loads(line) for line in args.chats.read_text().splitlines()] if args.chats else BENCH_CHATS
        config = ExportConfig(threads=args.threads, eval_chats=args.eval_chats, eval_max_tokens=args.eval_max_tokens)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        eval_set = build_eval_set(chats, tokenizer, config.eval_max_tokens, args.system_prompt, config.eval_chats)
        evaluate_file = evaluate.evaluate_ggml_file if container == "GGML" else gguf_eval.evaluate_gguf_file
        # The f16 file is evaluated first and becomes its format's KL reference, as in the assets.
        numbers, reference = evaluate_file(path, eval_set, config, None if quant == "F16" else f16)
        evaluate.write_evaluation(path, numbers, reference)
        return {**numbers, **speed(container, path, args.threads, args.new_tokens, args.repeats)}
    return {"wall_s": time.perf_counter() - start, "peak_rss_gb": rss_gb("VmHWM")}


def run_child(step: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", step, *args.passthrough]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, key: str, value: dict) -> None:
    """Results are kept per step as they come, so a run can be split (--steps) or resumed."""
    path.write_text(json.dumps({**load(path), key: value}, indent=2, ensure_ascii=False))


def main() -> None:
    from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT
    from rugpt_assets.core.gguf import GGUFType
    from rugpt_assets.core.quantize import QuantType

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="cache for the random model, and outputs")
    parser.add_argument("--model-dir", type=Path, help="a GPT-2 safetensors checkpoint instead of the random model")
    parser.add_argument("--chats", type=Path, help="JSONL chats to score (default: a few built-in ones)")
    parser.add_argument("--n-embd", type=int, default=2048)
    parser.add_argument("--n-layer", type=int, default=24)
    parser.add_argument("--n-head", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--n-positions", type=int, default=2048)
    parser.add_argument(
        "--peaked",
        action="store_true",
        help="random model with peaked next-token distributions (unit layer norms, wider embedding), for KL",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime, quantizer and speed run")
    parser.add_argument("--eval-chats", type=int, default=6)
    parser.add_argument("--eval-max-tokens", type=int, default=128)
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="of the scored chats")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", default="make,eval", help="make (write and quantize), eval (all numbers), speed (size and speed only)")
    parser.add_argument("--formats", default="GGML,GGUF", help="which files to make and evaluate")
    parser.add_argument("--types", help="make only these quantized types (and not the f16 files)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = {k: getattr(args, k) for k in ("n_embd", "n_layer", "n_head", "vocab", "n_positions", "peaked")}
    args.passthrough = [a for a in sys.argv[1:] if a != "--child"]
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    work, steps, formats = args.work_dir, args.steps.split(","), args.formats.split(",")
    if args.model_dir is None:
        spec_file = work / "spec.json"
        if not spec_file.exists() or json.loads(spec_file.read_text()) != spec:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            args.passthrough += ["--spec", json.dumps(spec)]
            print(f"built the model in {run_child('build', args)['wall_s']:.0f} s", flush=True)
            spec_file.write_text(json.dumps(spec))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or work / "model"
    model_gb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e9
    print(f"model: {model_dir} ({model_gb:.2f} GB of safetensors), {args.threads} threads", flush=True)

    if "make" in steps:
        types = {"GGML": [q.name for q in QuantType], "GGUF": [t.name for t in GGUFType]}
        for container in formats:
            if args.types:
                plan = [f"quant:{container}/{name}" for name in types[container] if name in args.types.split(",")]
            else:
                shutil.rmtree(work / container.lower(), ignore_errors=True)
                plan = [f"write:{container}"] + [f"quant:{container}/{name}" for name in types[container]]
            for step in plan:
                made = run_child(step, args)
                save(work / "made.json", step, made)
                print(f"{step}: {made['wall_s']:.1f} s, peak RSS {made['peak_rss_gb']:.2f} GB", flush=True)
    for step in ("eval", "speed"):
        if step in steps:
            for container, quant, _ in files(work):
                if container in formats:
                    save(work / f"{step}-{container}.json", quant, run_child(f"{step}:{container}/{quant}", args))
                    print(f"{step} {container} {quant}: done", flush=True)

    made = load(work / "made.json")
    evaluated = {(c, q): v for c in ("GGML", "GGUF") for q, v in load(work / f"eval-{c}.json").items()}
    speeds = {(c, q): v for c in ("GGML", "GGUF") for q, v in load(work / f"speed-{c}.json").items()}
    print()
    print("| format | type | made by | make s | peak RSS GB | file MB | bits/weight | load s | tokens/s | perplexity | KL to f16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for container, quant, _ in files(work):
        e = evaluated.get((container, quant)) or speeds.get((container, quant))
        if e is None:
            continue
        m = made.get(f"write:{container}" if quant == "F16" else f"quant:{container}/{quant}")
        maker = "ours" if quant == "F16" else {"GGML": "llm-rs", "GGUF": "llama.cpp"}[container]
        kl = f"{e['kl_to_f16']:.5f}" if "kl_to_f16" in e else "–"
        perplexity = f"{e['perplexity']:.2f}" if "perplexity" in e else "–"
        making = f"{m['wall_s']:.1f} | {m['peak_rss_gb']:.2f}" if m else "– | –"
        print(
            f"| {container} | {quant} | {maker} | {making} | {e['size_bytes'] / 2**20:.1f} | "
            f"{e['bits_per_weight']:.2f} | {e['load_s']:.2f} | {e['tokens_per_s']:.1f} | {perplexity} | {kl} |"
        )


if __name__ == "__main__":
    main()
