"""Scale rehearsal: the whole graph through Dagster, started the way a user starts it, on a
model of ruGPT-3.5's width and a source mirror of rulm's size.

It writes, under ``--work``:

- ``hub_model/``: a random-weight GPT-2 of ruGPT-3.5's width (n_embd 5120, 40 heads, vocab
  50272, 2048 positions) with ``--layers`` layers, as a hub snapshot holds it: float16
  safetensors shards of at most 5 GB with their index, ``config.json``, and the project's demo
  tokenizer (trained on the bundled samples; the embedding is padded past its vocabulary to
  50272 rows, as ruGPT-3.5's is).
- ``sources/``: a mirror of the seven rulm datasets in the offline hub layout at rulm's size
  (synthetic Russian-like text with rulm-like lengths, ``bench/chat_set_bench.py``'s generator;
  about 62k chats come out of the recipe).
- ``home/``: the Dagster instance (``DAGSTER_HOME``; the repository's ``dagster.yaml`` and
  ``workspace.yaml``, so everything lands under ``home/storage/``), with ``dagster-daemon``
  running and profile ``rugpt35`` pointed at the two folders above (``RUGPT_SOURCES_DIR``,
  ``RUGPT_BASE_MODEL_DIR``).

Then it materializes the jobs through the CLI (``dagster job launch``: queued, dequeued by the
daemon, started by the routing run launcher in a run worker process): ``observe_sources``;
``prepare`` (raw snapshots, ``chat_set``, ``base_model``); ``train`` (``lora_adapter``, the GPU
code location), killing its run worker and then the trainer (SIGKILL) once a checkpoint is on
disk, and launching ``train`` again, which resumes; ``export`` (``merged_model`` → ``ggml_f16``
with their checks); and the ``Q5_1`` partition of ``quantize``. The automation sensors and the
observation schedule are stopped first, so that every run is one of these. Training takes the
profile's fast path with ``--grad-accum`` micro-batches per step and ``--train-steps`` steps.

While the data runs, ``bench/train_throughput.py`` times the fast path on the same model shape
and GPU (``--chats-per-step`` as in the Dagster run), so that the trainer's tokens/s inside
Dagster can be held against it. Recorded per asset: wall time (the step's events), peak RSS of
the run worker and its children (sampled every 0.25 s), peak GPU memory (sampled; the
trainer's own torch peak too), and the size of what it wrote. ``rehearsal.json`` and a table go
to ``--out``.

    python bench/scale_rehearsal.py --work /data/rehearsal --out OUT --layers 12
    python bench/scale_rehearsal.py --work /tmp/reh --out /tmp/reh-out --cpu \\
        --n-embd 64 --n-head 4 --layers 2 --source-scale 0.01 --train-steps 6 --save-steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SHARD_BYTES = 5 * 10**9
CPU_LOCATION, GPU_LOCATION = "rugpt_assets", "rugpt_assets_gpu"


# --- inputs ------------------------------------------------------------------------------------


def write_model(out: Path, n_embd: int, n_head: int, n_layer: int, vocab: int, device: str) -> None:
    """Random float16 weights (layer norms 1, biases 0, the rest N(0, 0.02)) straight to
    safetensors shards in checkpoint order; config, demo tokenizer, generation config."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config

    from rugpt_assets.core.demo_model import BOS_ID, EOS_ID, PAD_ID, gpt2_weight_shapes, sample_texts, train_tokenizer
    from rugpt_assets.settings import BUNDLED_SAMPLES_DIR

    out.mkdir(parents=True)
    train_tokenizer(list(sample_texts(BUNDLED_SAMPLES_DIR)), 4096).save_pretrained(out)
    GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab, n_positions=2048,
               bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
               architectures=["GPT2LMHeadModel"], dtype="float16").save_pretrained(out)  # fmt: skip
    shards, size = [[]], 0
    for name, shape in gpt2_weight_shapes(n_embd, n_layer, vocab, 2048).items():
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator(device).manual_seed(0)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        tensors = {}
        for name, shape in shard:
            if re.search(r"ln_(1|2|f)\.weight$", name):
                tensors[name] = torch.ones(shape, dtype=torch.float16)
            elif name.endswith(".bias"):
                tensors[name] = torch.zeros(shape, dtype=torch.float16)
            else:
                w = torch.empty(shape, dtype=torch.float16, device=device).normal_(0, 0.02, generator=generator)
                tensors[name] = w.cpu()
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
    total = sum(2 * torch.Size(s).numel() for _, s in sum(shards, []))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_sources(out: Path, scale: float) -> None:
    sys.path.insert(0, str(BENCH))
    from chat_set_bench import generate

    generate(out, scale)


# --- measuring -----------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """RSS of the run workers with their children (every process under the daemon but the code
    servers), and GPU memory in use, every ``interval`` seconds."""

    def __init__(self, daemon_pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.interval, self.samples, self.stopped = psutil, interval, [], threading.Event()
        self.daemon_pid = daemon_pid
        try:
            import pynvml  # pyright: ignore[reportMissingImports]  # on GPU machines

            pynvml.nvmlInit()
            self.gpu = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVIDIA GPU or library: no GPU column
            self.gpu = None

    def rss(self) -> int:
        total = 0
        try:
            processes = self.psutil.Process(self.daemon_pid).children(recursive=True)
        except self.psutil.Error:
            return 0
        for p in processes:
            try:
                if "api grpc" not in " ".join(p.cmdline()):
                    total += p.memory_info().rss
            except self.psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            gpu = self.gpu[0].nvmlDeviceGetMemoryInfo(self.gpu[1]).used if self.gpu else 0
            self.samples.append((time.time(), self.rss(), gpu))

    def peaks(self, start: float, end: float) -> tuple[float, float]:
        inside = [(r, g) for t, r, g in self.samples if start <= t <= end]
        return (max((r for r, _ in inside), default=0) / 1e9, max((g for _, g in inside), default=0) / 1e9)


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# --- the instance --------------------------------------------------------------------------------


class Instance:
    """The repository's instance config in ``work/home``, with run monitoring polling every
    ``monitor_s`` seconds (dagster.yaml: 15) and a dead run's pool slots freed ``monitor_s``
    after it ends (dagster.yaml: 60): after the kill, the resumed run would otherwise wait over
    a minute with the GPU idle."""

    def __init__(self, work: Path, env: dict, log: Path, monitor_s: int):
        self.home, self.env, self.log = work / "home", env, log
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "workspace.yaml").write_text((REPO / "workspace.yaml").read_text())
        config = yaml.safe_load((REPO / "dagster.yaml").read_text())
        config["run_monitoring"] |= {"poll_interval_seconds": monitor_s, "free_slots_after_run_end_seconds": monitor_s}
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.daemon = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        with open(self.log, "a") as log:
            done = subprocess.run([sys.executable, "-m", "dagster", *args, "-w", "workspace.yaml"], cwd=self.home,
                                  env=self.env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        if check and done.returncode:
            raise RuntimeError(f"dagster {' '.join(args)} exited {done.returncode}; see {self.log}")
        return done

    def start_daemon(self) -> None:
        self.daemon = subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", "-w", "workspace.yaml"],
                                       cwd=self.home, env=self.env, stdout=open(self.log, "a"),
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def stop_daemon(self) -> None:
        if self.daemon and self.daemon.poll() is None:
            os.killpg(self.daemon.pid, signal.SIGINT)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.daemon.pid, signal.SIGKILL)

    def instance(self):
        import dagster as dg

        os.environ["DAGSTER_HOME"] = str(self.home)
        cwd = os.getcwd()
        os.chdir(self.home)  # dagster.yaml's paths are relative to it
        try:
            return dg.DagsterInstance.get()
        finally:
            os.chdir(cwd)

    def launch(self, location: str, job: str, config: dict | None = None, tags: dict | None = None) -> str:
        run_id = str(uuid.uuid4())
        args = ["job", "launch", "-l", location, "-j", job, "--run-id", run_id]
        args += ["--config-json", json.dumps(config)] if config else []
        args += ["--tags", json.dumps(tags)] if tags else []
        self.cli(*args)
        return run_id


def wait_run(instance, run_id: str, timeout: float, poll: float = 1.0, until=None) -> str:
    """The run's status once it is finished (or ``until()`` is true, or the timeout passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.is_finished:
            return run.status.value
        if until is not None and until():
            return "INTERRUPTED"
        time.sleep(poll)
    return "TIMEOUT"


def step_windows(instance, run_id: str) -> dict[str, dict]:
    """Per step: start, end, status; and the trainer's log lines with their times."""
    steps: dict[str, dict] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            if entry.step_key:
                steps.setdefault(entry.step_key, {}).setdefault("messages", []).append((entry.timestamp, entry.user_message))
            continue
        key = event.step_key
        if key is None:
            continue
        step = steps.setdefault(key, {})
        if event.event_type_value == "STEP_START":
            step["start"] = entry.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
            step["end"], step["status"] = entry.timestamp, event.event_type_value
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            step.setdefault("checks", {})[data.check_name] = data.passed
    return steps


STEP_LINE = re.compile(r"step (\d+)/(\d+) loss \S+ lr \S+ grad_norm \S+ tokens/s ([\d,]+)")


def trainer_steps(messages) -> list[tuple[float, int, float]]:
    """(time, step, tokens/s) of the trainer's progress lines."""
    out = []
    for t, text in messages or []:
        if m := STEP_LINE.search(text or ""):
            out.append((t, int(m.group(1)), float(m.group(3).replace(",", ""))))
    return out


def kill_training(psutil, daemon_pid: int, runs_dir: Path, delay: float, timeout: float) -> dict:
    """Once a checkpoint is on disk (and ``delay`` seconds more), SIGKILL the run worker (the
    trainer's parent, under this instance's daemon) and then the trainer, as a crash of the
    machine's processes would."""
    deadline = time.time() + timeout
    while time.time() < deadline and not list(runs_dir.glob("*/checkpoint")):
        time.sleep(0.5)
    checkpoints = sorted(runs_dir.glob("*/checkpoint"))
    if not checkpoints:
        return {"killed": False, "reason": "no checkpoint in time"}
    time.sleep(delay)
    trainers = [p for p in psutil.Process(daemon_pid).children(recursive=True)
                if "rugpt_assets.core.train" in " ".join(p.cmdline())]  # fmt: skip
    victims = [(p, " ".join(p.cmdline())[:120]) for p in [t.parent() for t in trainers] + trainers]
    for p, _ in victims:  # run worker first: the trainer must not see it exit normally
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return {"killed": bool(victims), "at": time.time(), "checkpoint_step": json.loads((checkpoints[-1] / "state.json").read_text())["step"],
            "processes": [cmd for _, cmd in victims]}  # fmt: skip


# --- the rehearsal -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=5120)
    parser.add_argument("--n-head", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--source-scale", type=float, default=1.0, help="1.0: rulm's size")
    parser.add_argument("--train-steps", type=int, default=120)
    parser.add_argument("--grad-accum", type=int, default=16, help="micro-batches of 4 chats' worth per step")
    parser.add_argument("--save-steps", type=int, default=40)
    parser.add_argument("--max-eval-chats", type=int, default=256)
    parser.add_argument("--export-eval-chats", type=int, default=0,
                        help="validation chats the GGML evaluations score (0: the profile's)")  # fmt: skip
    parser.add_argument("--kill-delay-s", type=float, default=8.0, help="train on this long past the checkpoint")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (fp32, sdpa, eager): a smoke run")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="launch nothing new past this, stop waiting")
    parser.add_argument("--monitor-s", type=int, default=5, help="run monitoring's poll interval (see `Instance`)")
    args = parser.parse_args()
    started = time.time()
    work, out = args.work.resolve(), args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "phases": {}, "assets": {}}

    def save() -> None:
        results["elapsed_s"] = time.time() - started
        (out / "rehearsal.json").write_text(json.dumps(results, indent=2, default=str))

    def phase(name: str, t0: float, **extra) -> None:
        results["phases"][name] = {"wall_s": round(time.time() - t0, 1), **extra}
        print(f"[{time.time() - started:6.0f} s] {name}: {results['phases'][name]}", flush=True)
        save()

    model_dir, sources_dir = work / "hub_model", work / "sources"
    env = {**os.environ, "RUGPT_PROFILE": "rugpt35", "RUGPT_SOURCES_DIR": str(sources_dir),
           "RUGPT_BASE_MODEL_DIR": str(model_dir), "DAGSTER_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    me = [sys.executable, str(Path(__file__).resolve())]
    t0 = time.time()
    makers = [
        subprocess.Popen([*me, "_sources", str(sources_dir), str(args.source_scale)], env=env),
        subprocess.Popen(
            [
                *me,
                "_model",
                str(model_dir),
                str(args.n_embd),
                str(args.n_head),
                str(args.layers),
                str(args.vocab),
                "cpu" if args.cpu else "cuda",
            ],
            env=env,
        ),  # fmt: skip
    ]
    inst = Instance(work, env, out / "dagster.log", args.monitor_s)
    for kind, name, location in (("sensor", "retrain_on_new_data", CPU_LOCATION),
                                 ("sensor", "train_on_new_data", GPU_LOCATION),
                                 ("schedule", "observe_sources_schedule", CPU_LOCATION)):  # fmt: skip
        inst.cli(kind, "stop", name, "-l", location)
    inst.start_daemon()
    if any(p.wait() for p in makers):
        raise RuntimeError("writing the inputs failed")
    phase("inputs", t0, model_gb=tree_bytes(model_dir) / 1e9, sources_gb=tree_bytes(sources_dir) / 1e9)

    bench = None
    chats_per_step = 4 * args.grad_accum
    if not args.cpu:
        bench = subprocess.Popen(
            [sys.executable, str(BENCH / "train_throughput.py"), "--layers", str(args.layers), "--no-check",
             "--variants", "packed_varlen_b4_compiled", "--chats-per-step", str(chats_per_step),
             "--micro-batches", "5", "--warmup", "5", "--steps", "10", "--repeats", "2", "--out", str(work / "bench")],
            env={**env, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, stdout=open(out / "bench.log", "w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    sampler = Sampler(inst.daemon.pid)
    sampler.start()
    instance = inst.instance()
    storage = work / "home" / "storage" / "artifacts"
    train_config = {"max_steps": args.train_steps, "gradient_accumulation_steps": args.grad_accum,
                    "save_steps": args.save_steps, "eval_steps": args.save_steps, "warmup_steps": 10,
                    "max_eval_chats": args.max_eval_chats}  # fmt: skip
    if args.cpu:
        train_config |= {"device": "cpu", "precision": "fp32", "attn_implementation": "sdpa", "compile_blocks": False}
    runs: list[tuple[str, str]] = []

    def left() -> float:
        return args.deadline_s - (time.time() - started)

    def run(label: str, location: str, job: str, config=None, tags=None, until=None) -> str:
        if left() < 0:
            raise TimeoutError(f"deadline passed before {label}")
        t = time.time()
        run_id = inst.launch(location, job, config, tags)
        runs.append((label, run_id))
        status = wait_run(instance, run_id, left(), until=until)
        phase(label, t, run_id=run_id, status=status)
        return status

    export_config = {"eval_chats": args.export_eval_chats} if args.export_eval_chats else {}
    train_run_config = {"ops": {"lora_adapter": {"config": train_config}}}
    try:
        run("observe_sources", CPU_LOCATION, "observe_sources")
        run("prepare", CPU_LOCATION, "prepare")
        if bench is not None:
            t = time.time()
            bench.wait()
            phase("bench_wait", t, exit=bench.returncode)
            bench_json = work / "bench" / "train_throughput.json"
            if bench_json.exists():
                results["bench"] = json.loads(bench_json.read_text())
        killer: dict = {}
        runs_dir = storage / "training_runs"
        thread = threading.Thread(
            target=lambda: killer.update(kill_training(sampler.psutil, inst.daemon.pid, runs_dir, args.kill_delay_s, left()))
        )
        thread.start()
        run("train_killed", GPU_LOCATION, "train", train_run_config, until=lambda: bool(killer))
        thread.join()
        results["kill"] = killer
        t = time.time()
        status = wait_run(instance, runs[-1][1], min(300, left()))  # run monitoring notices the dead run worker
        phase("killed_run_marked", t, status=status)
        run("train_resumed", GPU_LOCATION, "train", train_run_config)
        run("export", CPU_LOCATION, "export", {"ops": {"ggml_f16": {"config": export_config}}})
        run(
            "quantize_Q5_1",
            CPU_LOCATION,
            "quantize",
            {"ops": {"ggml_quantized": {"config": export_config}}},
            tags={"dagster/partition": "Q5_1"},
        )
    except Exception as e:  # noqa: BLE001 - record what broke and report what was measured
        results["error"] = f"{type(e).__name__}: {e}"
        print("error:", results["error"], flush=True)
    finally:
        sampler.stopped.set()
        try:
            collect(results, instance, runs, sampler, storage)
        except Exception as e:  # noqa: BLE001 - keep what was measured
            results["collect_error"] = f"{type(e).__name__}: {e}"
        inst.stop_daemon()
        save()
        print(table(results), flush=True)
        (out / "rehearsal.md").write_text(table(results) + "\n")


ARTIFACTS = {
    "raw_": lambda s, key: s / "raw" / key.removeprefix("raw_"),
    "chat_set": lambda s, key: s / "chat_set",
    "base_model": lambda s, key: s / "base_model",
    "lora_adapter": lambda s, key: s / "lora_adapter",
    "merged_model": lambda s, key: s / "merged_model",
    "ggml_f16": lambda s, key: s / "ggml" / "model-f16.bin",
    "ggml_quantized": lambda s, key: s / "ggml" / "model-q5_1.bin",
}


def collect(results: dict, instance, runs, sampler: Sampler, storage: Path) -> None:
    """Per asset (step): wall time, peak RSS of the run worker tree, peak GPU memory, bytes on disk,
    its materialization metadata and check results; the trainer's tokens/s."""
    import dagster as dg

    trainer_lines = []
    for label, run_id in runs:
        run_end = instance.get_run_record_by_id(run_id).end_time  # a killed step logs no end
        for key, step in step_windows(instance, run_id).items():
            if "start" not in step:
                continue
            end = step.get("end") or run_end or time.time()
            rss, gpu = sampler.peaks(step["start"], end)
            row = {"run": label, "wall_s": round(end - step["start"], 1), "status": step.get("status", "unfinished"),
                   "peak_rss_gb": round(rss, 2), "peak_gpu_gb": round(gpu, 1), "checks": step.get("checks", {})}  # fmt: skip
            artifact = next((f for prefix, f in ARTIFACTS.items() if key.startswith(prefix)), None)
            if artifact is not None:
                row["disk_gb"] = round(tree_bytes(artifact(storage, key)) / 1e9, 3)
            if key == "lora_adapter":
                lines = trainer_steps(step.get("messages"))
                trainer_lines.append({"run": label, "start": step["start"], "lines": lines})
                row["first_progress_after_s"] = round(lines[0][0] - step["start"], 1) if lines else None
                row["steps"] = [lines[0][1], lines[-1][1]] if lines else []
            results["assets"].setdefault(key, []).append(row)
    for key in list(results["assets"]):
        asset_key = dg.AssetKey(key)
        event = instance.get_latest_materialization_event(asset_key)
        if event is not None and event.asset_materialization is not None:
            meta = event.asset_materialization.metadata
            scalars = {k: v.value for k, v in meta.items() if isinstance(getattr(v, "value", None), (int, float, str))}
            scalars = {k: v for k, v in scalars.items() if k not in ("loss_curve", "preview", "sample_generation")}
            results["assets"][key].append({"metadata": scalars})
    # Steady state inside Dagster: per-step tokens/s, leaving out each process's first 5 steps.
    steady = [tps for run in trainer_lines for _, _, tps in run["lines"][5:]]
    if steady:
        results["dagster_tokens_per_s"] = {"median": statistics.median(steady), "min": min(steady),
                                           "max": max(steady), "steps": len(steady)}  # fmt: skip
    bench = results.get("bench", {}).get("variants", [])
    if bench and steady and "tokens_per_s" in bench[0]:
        results["dagster_vs_bench"] = results["dagster_tokens_per_s"]["median"] / bench[0]["tokens_per_s"]
    results["storage_gb"] = round(tree_bytes(storage.parent) / 1e9, 2)


def table(results: dict) -> str:
    lines = ["| asset | run | wall s | peak RSS GB | peak GPU GB | disk GB | status |", "|---|---|---|---|---|---|---|"]
    for key, rows in results["assets"].items():
        for r in rows:
            if "wall_s" in r:
                lines.append(f"| {key} | {r['run']} | {r['wall_s']} | {r['peak_rss_gb']} | {r['peak_gpu_gb']} "
                             f"| {r.get('disk_gb', '')} | {r['status']} |")  # fmt: skip
    if "dagster_tokens_per_s" in results:
        d = results["dagster_tokens_per_s"]
        lines.append(f"\ntrainer inside Dagster: median {d['median']:,.0f} tokens/s ({d['min']:,.0f}–{d['max']:,.0f}, "
                     f"{d['steps']} steps)")  # fmt: skip
    for v in results.get("bench", {}).get("variants", []):
        if "tokens_per_s" in v:
            lines.append(f"bench {v['name']}: median {v['tokens_per_s']:,.0f} tokens/s "
                         f"({v['tokens_per_s_min']:,.0f}–{v['tokens_per_s_max']:,.0f}), MFU {100 * v['mfu']:.1f} %")  # fmt: skip
    if "dagster_vs_bench" in results:
        lines.append(f"Dagster / bench: {results['dagster_vs_bench']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_sources"]:
        write_sources(Path(sys.argv[2]), float(sys.argv[3]))
    elif sys.argv[1:2] == ["_model"]:
        n_embd, n_head, layers, vocab = map(int, sys.argv[3:7])
        write_model(Path(sys.argv[2]), n_embd, n_head, layers, vocab, sys.argv[7])
    else:
        main()
