"""A storage where every writing asset of the demo graph is published once per session (copied
for each test), and the writers the fault tests run in a child process: each materializes one
asset through Dagster (in process, ephemeral instance, in its own code location) as a run
would, or runs the trainer. The GGUF assets are targets where llama-cpp-python is installed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import dagster as dg
import pytest
import torch

from rugpt_assets import settings
from rugpt_assets.core import demo_model, evaluate, ggml, source_health, sources, train
from rugpt_assets.core.artifacts import StorageLayout, published, read_jsonl, sha256_file
from rugpt_assets.core.base_model import COMMIT
from rugpt_assets.core.gguf_eval import llama_available
from rugpt_assets.core.quantize import QuantType

SNAPSHOT = "ru_turbo_saiga"  # the source whose snapshot the tests fault
HUB_REPO = "acme/tiny-gpt2"  # served by the mocked hub below
# The fault suite's tokenizer is tiny (512 ids): chats are long in tokens, so the whole context is scored.
EXPORT = {"eval_chats": 8, "eval_max_tokens": 512, "check_new_tokens": 4, "threads": 1}
# Two optimizer steps, a checkpoint after each: the second checkpoint is the one faulted.
TRAIN = replace(
    settings.demo_profile(settings.environment()).train,
    max_steps=2, save_steps=1, eval_steps=2, max_eval_chats=4, per_device_batch_size=2, gradient_accumulation_steps=1,
)  # fmt: skip
FAULT_RUNS = "fault_training_runs"  # a fresh runs dir: the trainer writes two checkpoints there
GGUF = llama_available()
GGUF_QUANT = "Q8_0"  # the gguf_quantized partition faulted: one stands for all (same writer, same set)


def materialize(key: str, partition: str | None = None, run_config: dict | None = None) -> None:
    """One asset without its checks, the way a run of its code location executes it (raises on failure)."""
    from rugpt_assets import definitions, gpu_definitions

    defs = gpu_definitions.defs if key == "lora_adapter" else definitions.defs
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        # lora_adapter evaluates its check inside its own step: it cannot be left out
        asset_selection={dg.AssetKey(key)},
        asset_check_selection=None if key == "lora_adapter" else set(),
    )
    with dg.DagsterInstance.ephemeral() as instance:
        job.execute_in_process(instance=instance, run_config=run_config or {}, partition_key=partition)


def op_config(op: str, values: dict) -> dict:
    return {"ops": {op: {"config": values}}}


def layout() -> StorageLayout:
    return StorageLayout(settings.storage_root())


def hub_dir() -> Path:
    return Path(os.environ["RUGPT_FAULTS_HUB_DIR"])


def write_base_model(revision: str = "1" * 40) -> None:
    """base_model from the hub path, with the hub's two calls answered from a local folder. A
    snapshot of `revision` already published is reused (not written again)."""
    files = sorted(hub_dir().iterdir())

    def model_info(self, repo, revision=None, files_metadata=False):
        sha = revision if COMMIT.fullmatch(revision or "") else "1" * 40
        return SimpleNamespace(sha=sha, siblings=[SimpleNamespace(rfilename=p.name) for p in files])

    def snapshot_download(repo, revision, local_dir, allow_patterns, token):
        for p in files:
            shutil.copy(p, Path(local_dir) / p.name)

    with mock.patch("huggingface_hub.HfApi.model_info", model_info), \
            mock.patch("huggingface_hub.snapshot_download", snapshot_download):  # fmt: skip
        materialize("base_model", run_config=op_config("base_model", {"repo": HUB_REPO, "revision": revision}))


def write_new_base_model() -> None:
    """A revision not published yet: the snapshot is downloaded and published again."""
    write_base_model(secrets.token_hex(20))


def training_job(runs_dir: Path) -> train.TrainJob:
    lay = layout()
    chats = published(lay.chat_set)
    return train.TrainJob(
        base_model_dir=published(lay.base_model),
        train_path=chats / "train.jsonl",
        val_path=chats / "val.jsonl",
        output_dir=lay.lora_adapter,
        runs_dir=runs_dir,
        config=TRAIN,
    )


def fault_checkpoint() -> Path:
    job = training_job(layout().root / FAULT_RUNS)
    return job.runs_dir / train.run_key(job, 1)[:16] / "checkpoint"


# --- loaders: a reader using the set ---------------------------------------------------------


def load_jsonl_dir(path: Path, names: tuple[str, ...]) -> None:
    for name in names:
        assert list(read_jsonl(published(path) / name)), f"{path}/{name} is empty"


def load_snapshot(path: Path) -> None:
    root = published(path)
    assert sources.read_snapshot(root) and source_health.read_health(root).rows_kept > 0


def load_model(path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(published(path), dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(published(path))("Привет", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()


def load_adapter(path: Path) -> None:
    from safetensors.torch import load_file

    root = published(path)
    assert json.loads((root / "metrics.json").read_text())["steps"] == TRAIN.max_steps
    assert all(t.isfinite().all() for t in load_file(root / "adapter_model.safetensors").values())


def load_checkpoint(path: Path) -> None:
    from safetensors.torch import load_file

    root = published(path)
    assert json.loads((root / "state.json").read_text())["step"] in (1, 2)
    assert load_file(root / "lora.safetensors")
    assert torch.load(root / "optimizer.pt", weights_only=True)["optimizer"]["state"]


PROMPT = "<s>user\nПривет</s>\n<s>bot\n"


def check_evaluation(real: Path, f16: bool) -> None:
    """The evaluation in the set is of this very file; an f16 file's reference too."""
    assert evaluate.read_evaluation(real)["sha256"] == sha256_file(real)
    if f16:
        source = evaluate.Reference.load(evaluate.reference_path(real)).source
        assert source["sha256"] == sha256_file(real) and source["size_bytes"] == real.stat().st_size


def load_ggml(path: Path) -> None:
    model, _ = evaluate.load_llm_rs(path, 1)
    assert evaluate.generate(model, PROMPT, 2, stop_at_special=False).new_tokens == 2
    real = published(path)
    assert ggml.meta_path(real).is_file() and ggml.tokenizer_sidecar(real).is_file()
    check_evaluation(real, f16=path.name == "model-f16.bin")


def load_gguf(path: Path) -> None:
    from rugpt_assets.core import gguf, gguf_eval

    llama, _ = gguf_eval.load_llama(path, 1)
    tokens, _ = gguf_eval.greedy_tokens(llama, PROMPT, 2)
    assert len(tokens) == 2
    del llama
    real = published(path)
    assert gguf.modelfile_path(real).read_text(encoding="utf-8").startswith(f"FROM ./{real.name}\n")
    check_evaluation(real, f16=path.name == "model-f16.gguf")


@dataclass(frozen=True)
class Target:
    """One artifact set: where it is, how a run writes it, how a reader loads it."""

    final: Callable[[], Path]
    write: Callable[[], object]
    load: Callable[[Path], None]
    nth: int = 1  # which publication of the set by `write` is faulted


def _quant(q: QuantType) -> Target:
    return Target(
        lambda: layout().ggml_quantized(q.name),
        lambda: materialize("ggml_quantized", q.name, op_config("ggml_quantized", EXPORT)),
        load_ggml,
    )


TARGETS: dict[str, Target] = {
    "raw_snapshot": Target(
        lambda: layout().raw_source(SNAPSHOT),
        lambda: materialize(f"raw_{SNAPSHOT}"),
        lambda p: load_snapshot(p),
    ),
    "chat_set": Target(
        lambda: layout().chat_set, lambda: materialize("chat_set"), lambda p: load_jsonl_dir(p, ("train.jsonl", "val.jsonl"))
    ),
    "base_model": Target(lambda: layout().base_model, write_new_base_model, load_model),
    "lora_checkpoint": Target(fault_checkpoint, lambda: train.train_lora(training_job(layout().root / FAULT_RUNS)), load_checkpoint, nth=2),
    "lora_adapter": Target(lambda: layout().lora_adapter, lambda: train.train_lora(training_job(layout().root / FAULT_RUNS)), load_adapter),
    "merged_model": Target(lambda: layout().merged_model, lambda: materialize("merged_model"), load_model),
    "ggml_f16": Target(lambda: layout().ggml_f16, lambda: materialize("ggml_f16", run_config=op_config("ggml_f16", EXPORT)), load_ggml),
    **{f"ggml_{q.name}": _quant(q) for q in QuantType},
    **(
        {
            "gguf_f16": Target(
                lambda: layout().gguf_f16, lambda: materialize("gguf_f16", run_config=op_config("gguf_f16", EXPORT)), load_gguf
            ),
            f"gguf_{GGUF_QUANT}": Target(
                lambda: layout().gguf_quantized(GGUF_QUANT),
                lambda: materialize("gguf_quantized", GGUF_QUANT, op_config("gguf_quantized", EXPORT)),
                load_gguf,
            ),
        }
        if GGUF
        else {}
    ),
}


@pytest.fixture(scope="session")
def published_storage(tmp_path_factory) -> Path:
    """Everything the targets write, published once: the 'previous version' of every test."""
    base = tmp_path_factory.mktemp("faults")
    root, hub = base / "artifacts", base / "hub"
    with mock.patch.dict(os.environ, {"RUGPT_STORAGE_DIR": str(root), "RUGPT_FAULTS_HUB_DIR": str(hub)}):
        texts = demo_model.sample_texts(settings.BUNDLED_SAMPLES_DIR)
        demo_model.build_demo_model(texts, hub, demo_model.DemoModelSpec(vocab_size=512, pretrain_steps=30))
        for spec in sources.SOURCES:
            materialize(f"raw_{spec.name}")
        materialize("chat_set")
        write_base_model()
        train.train_lora(training_job(layout().training_runs))
        for name in ("merged_model", "ggml_f16", *(f"ggml_{q.name}" for q in QuantType), *(n for n in TARGETS if n.startswith("gguf_"))):
            TARGETS[name].write()
    return base


@pytest.fixture
def storage(published_storage, tmp_path, monkeypatch) -> Path:
    """A private copy of the published storage, active for this test (and its child processes)."""
    root = tmp_path / "storage" / "artifacts"
    shutil.copytree(published_storage / "artifacts", root, symlinks=True)
    monkeypatch.setenv("RUGPT_STORAGE_DIR", str(root))
    monkeypatch.setenv("RUGPT_FAULTS_HUB_DIR", str(published_storage / "hub"))
    return root
