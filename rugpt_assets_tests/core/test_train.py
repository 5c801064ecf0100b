"""The LoRA trainer on the tiny demo model: it learns, its adapter loads, a killed run resumes
onto the same trajectory, DDP on two CPU processes equals one process, bad settings fail clearly."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rugpt_assets.core.artifacts import write_jsonl
from rugpt_assets.core.base_model import ensure_snapshot
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, TRAIN_CONFIG_FILE, TrainConfig, to_dict
from rugpt_assets.core.demo_model import DemoModelSpec, build_demo_model
from rugpt_assets.core.train import (
    PipesReporter,
    Runtime,
    TrainJob,
    evaluate,
    load_chats,
    rank_batches,
    run_key,
    train_lora,
)

CONFIG = replace(
    TrainConfig(),
    max_tokens_count=96,
    pack_tokens=128,
    learning_rate=3e-3,
    warmup_steps=2,
    per_device_batch_size=2,
    gradient_accumulation_steps=2,
    max_steps=12,
    eval_steps=6,
    save_steps=4,
    precision="fp32",
    load_in_8bit=False,
    gradient_checkpointing=False,
    device="cpu",
)
# One thread: fast on a small shared machine, and the same reductions in every process.
SINGLE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def synthetic_chats(n: int, seed: int) -> list[dict]:
    """Arithmetic chats: a pattern a tiny model can learn in a few steps."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        messages = [
            {"role": "user", "content": f"Сколько будет {a} плюс {b}?"},
            {"role": "bot", "content": f"{a} плюс {b} будет {a + b}."},
        ]
        if rng.random() < 0.5:
            messages += [
                {"role": "user", "content": f"А {a} минус {b}?"},
                {"role": "bot", "content": f"{a} минус {b} будет {a - b}."},
            ]
        chats.append({"messages": messages, "source": "synthetic"})
    return chats


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_inputs")
    train, val = synthetic_chats(200, seed=1), synthetic_chats(24, seed=2)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "val.jsonl", val)
    texts = [DEFAULT_SYSTEM_PROMPT] + [m["content"] for chat in train for m in chat["messages"]]
    build_demo_model(texts, root / "base", DemoModelSpec(vocab_size=512, n_positions=128, pretrain_steps=20, pretrain_lr=3e-3))
    return root


def make_job(inputs: Path, out: Path, config: TrainConfig = CONFIG, base: Path | None = None) -> TrainJob:
    return TrainJob(base or inputs / "base", inputs / "train.jsonl", inputs / "val.jsonl", out / "adapter", out / "runs", config)


def run_cli(job: TrainJob, out: Path, *launcher: str) -> subprocess.Popen:
    config = out / "job.json"
    job.write(config)
    command = [*launcher] if launcher else [sys.executable]
    return subprocess.Popen(
        [*command, "-m", "rugpt_assets.core.train", "--config", str(config)],
        env=SINGLE_THREAD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_training_beats_the_base_model_and_the_adapter_loads(inputs, tmp_path):
    job = make_job(inputs, tmp_path)
    result = train_lora(job)
    m = result.metrics
    assert m["steps"] == 12 and len(m["loss_history"]) == 12 and m["resumed_from_step"] == 0
    assert [s for s, _ in m["eval_history"]] == [6, 12]
    assert m["eval_loss"] < m["base_eval_loss"] - 0.1
    assert sum(m["loss_history"][-3:]) < sum(m["loss_history"][:3])
    assert m["tokens_seen"] > 0 and m["tokens_per_second"] > 0 and m["peak_memory_gb"] > 0
    assert m["train_chats"] == 200 and m["val_chats"] == 24

    adapter = result.adapter_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (adapter / name).is_file(), name
    assert (adapter / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((adapter / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    # What it was trained with, for the export's evaluation (the system prompt) and for people.
    assert json.loads((adapter / TRAIN_CONFIG_FILE).read_text(encoding="utf-8")) == to_dict(job.config)

    # The written adapter, loaded the standard way, reproduces both reported eval losses.
    base = AutoModelForCausalLM.from_pretrained(inputs / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    cpu = Runtime(torch.device("cpu"), torch.float32)
    val_batches = rank_batches(load_chats(inputs / "val.jsonl", tokenizer, CONFIG)[0], CONFIG, cpu)
    assert evaluate(model, val_batches, tokenizer.eos_token_id, cpu) == pytest.approx(m["eval_loss"], rel=1e-5)
    with model.disable_adapter():
        assert evaluate(model, val_batches, tokenizer.eos_token_id, cpu) == pytest.approx(m["base_eval_loss"], rel=1e-5)


def test_killed_run_resumes_onto_the_uninterrupted_trajectory(inputs, tmp_path):
    config = replace(CONFIG, max_steps=40)
    reference = train_lora(make_job(inputs, tmp_path / "reference", config)).metrics

    job = make_job(inputs, tmp_path / "killed", config)
    process = run_cli(job, tmp_path / "killed")
    deadline = time.monotonic() + 120
    while not list(job.runs_dir.glob("*/checkpoint")):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not job.output_dir.exists()  # killed mid-run, before the end
    saved = sorted(job.runs_dir.glob("*/checkpoint"))[-1]
    saved_step = json.loads((saved / "state.json").read_text())["step"]
    assert 4 <= saved_step < 40

    rerun = run_cli(job, tmp_path / "killed")
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    assert f"step {saved_step + 1}/40 " in log and f"step {saved_step}/40 " not in log  # continues, no repeats
    resumed = json.loads((job.output_dir / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == saved_step
    assert resumed["loss_history"] == pytest.approx(reference["loss_history"], rel=1e-5)
    assert [s for s, _ in resumed["eval_history"]] == [s for s, _ in reference["eval_history"]]
    assert resumed["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    ours = load_file(job.output_dir / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)

    # Same inputs again: the final checkpoint is the latest, so nothing is retrained.
    again = train_lora(job).metrics
    assert again["resumed_from_step"] == 40 and again["loss_history"] == resumed["loss_history"]


def test_trainer_exits_when_its_launcher_is_killed(inputs, tmp_path):
    """A run worker killed mid-training takes its trainer with it: an orphan would keep the GPU
    and write checkpoints under the run that the next launch resumes."""
    job = make_job(inputs, tmp_path, replace(CONFIG, max_steps=400, save_steps=1))
    config = tmp_path / "job.json"
    job.write(config)
    launcher = subprocess.Popen(  # stands in for the run worker: starts the trainer, waits on it
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
         sys.executable, "-m", "rugpt_assets.core.train", "--config", str(config)],
        env=SINGLE_THREAD_ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(job.runs_dir.glob("*/checkpoint")):
        assert launcher.poll() is None and time.monotonic() < deadline, "the trainer made no checkpoint"
        time.sleep(0.01)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    (checkpoint,) = job.runs_dir.glob("*/checkpoint")
    time.sleep(5)  # the trainer notices within a second, then exits
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    time.sleep(3)
    assert json.loads((checkpoint / "state.json").read_text())["step"] == step  # no one trains on
    assert not job.output_dir.exists() and 0 < step < 400


def test_run_key_follows_content_not_timestamps(inputs, tmp_path):
    """The base model rewritten with the same bytes (new timestamps) keeps the run key, so a
    killed training still finds its checkpoints; a snapshot's manifest gives the same identity
    without re-hashing; other bytes give another key."""
    key = run_key(make_job(inputs, tmp_path), world_size=1)
    rewritten = tmp_path / "rewritten"
    shutil.copytree(inputs / "base", rewritten, copy_function=shutil.copyfile)
    for path in rewritten.rglob("*"):
        os.utime(path, ns=(1, 1))
    assert run_key(make_job(inputs, tmp_path, base=rewritten), world_size=1) == key

    def copy_base(out_dir: Path) -> dict:
        shutil.copytree(inputs / "base", out_dir, dirs_exist_ok=True)
        return {}

    ensure_snapshot(tmp_path / "snapshot", {"builder": "copy"}, copy_base)
    assert run_key(make_job(inputs, tmp_path, base=tmp_path / "snapshot"), world_size=1) == key

    config = json.loads((rewritten / "config.json").read_text())
    (rewritten / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-6}))
    assert run_key(make_job(inputs, tmp_path, base=rewritten), world_size=1) != key
    assert run_key(make_job(inputs, tmp_path), world_size=2) != key


def test_ddp_on_two_cpu_processes_equals_one_process(inputs, tmp_path):
    # No dropout anywhere: the two runs draw different masks (one stream per rank).
    base = tmp_path / "base"
    base.mkdir()
    for f in (inputs / "base").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    model_config = json.loads((base / "config.json").read_text())
    model_config |= {"attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    (base / "config.json").write_text(json.dumps(model_config))
    config = replace(CONFIG, lora_dropout=0.0, max_steps=6, per_device_batch_size=2)

    ddp_job = make_job(inputs, tmp_path / "ddp", replace(config, gradient_accumulation_steps=1), base)
    process = run_cli(ddp_job, tmp_path / "ddp", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log
    ddp = json.loads((ddp_job.output_dir / "metrics.json").read_text())
    assert ddp["world_size"] == 2
    assert ddp["ddp_rank_max_abs_diff"] == 0.0  # both ranks hold the same LoRA weights

    single = train_lora(make_job(inputs, tmp_path / "single", replace(config, gradient_accumulation_steps=2), base)).metrics
    assert ddp["tokens_seen"] == single["tokens_seen"]  # the same global batches
    assert ddp["loss_history"] == pytest.approx(single["loss_history"], rel=1e-5)
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    ours = load_file(ddp_job.output_dir / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"load_in_8bit": True}, "load_in_8bit=true needs a CUDA GPU .* set load_in_8bit to false, or run on a GPU"),
        ({"load_in_4bit": True}, "load_in_4bit=true needs a CUDA GPU"),
        ({"precision": "fp16"}, "precision='fp16' needs a CUDA GPU"),
        ({"precision": "half"}, "TrainConfig.precision='half' is not one of: auto, bf16, fp16, fp32"),
        ({"attn_implementation": "packed_varlen"}, "'packed_varlen' needs a CUDA GPU and precision bf16 or fp16"),
        ({"attn_implementation": "flash"}, "TrainConfig.attn_implementation='flash' is not one of: sdpa, eager, packed_varlen"),
        ({"gradient_accumulation_steps": 1000}, "train.jsonl has 200 usable chats, fewer than one optimizer step's 2000"),
        ({"max_tokens_count": 4}, "no chat has a bot message within max_tokens_count=4"),
    ],
)
def test_bad_settings_fail_with_the_fix(inputs, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        train_lora(make_job(inputs, tmp_path, replace(CONFIG, **changes)))
    assert not (tmp_path / "adapter").exists()


def test_job_file_errors_name_the_problem(inputs, tmp_path):
    values = make_job(inputs, tmp_path).to_json()
    path = tmp_path / "job.json"
    path.write_text(json.dumps(values | {"train": {"lora_rank": 8}}))
    with pytest.raises(ValueError, match="unknown TrainConfig settings: lora_rank"):
        TrainJob.from_json(path)
    path.write_text(json.dumps({k: v for k, v in values.items() if k != "val_path"}))
    with pytest.raises(ValueError, match=r"missing keys \['val_path'\]"):
        TrainJob.from_json(path)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": "hi"}])
    tokenizer = AutoTokenizer.from_pretrained(inputs / "base")
    with pytest.raises(ValueError, match="bad.jsonl, row 2: expected"):
        load_chats(bad, tokenizer, CONFIG)


def test_pipes_metadata_has_dagster_types_and_readable_figures():
    pipes = pytest.importorskip("dagster_pipes")
    calls = []

    class Context:
        def report_asset_materialization(self, metadata):
            calls.append(metadata)

    metrics = {
        "eval_loss": 5.554074475364963, "base_eval_loss": 2.5, "train_loss": 1.8, "tokens_per_second": 1234.56,
        "wall_time_s": 0.018033780999985538, "peak_memory_gb": 0.5, "steps": 4, "tokens_seen": 400,
        "resumed_from_step": 0, "lora_config": {"lora_r": 16},
    }  # fmt: skip
    PipesReporter(Context()).report(metrics, b"\x89PNG fake", Path("/storage/lora_adapter"))
    (metadata,) = calls
    assert pipes._normalize_param_metadata(metadata, "report_asset_materialization", "metadata") == metadata
    assert metadata["eval_loss"] == {"raw_value": 5.554, "type": "float"}
    assert metadata["wall_time_s"] == {"raw_value": 0.018, "type": "float"}
    assert metadata["tokens_per_second"] == {"raw_value": 1235, "type": "int"}
    assert metadata["steps"] == {"raw_value": 4, "type": "int"}
    assert metadata["lora_config"] == {"raw_value": {"lora_r": 16}, "type": "json"}
    assert metadata["path"] == {"raw_value": "/storage/lora_adapter", "type": "path"}
    assert metadata["loss_curve"] == {"raw_value": "![loss](data:image/png;base64,iVBORyBmYWtl)", "type": "md"}
