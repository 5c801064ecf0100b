"""Streamed LoRA merge: base shards in, merged shards out, one tensor in memory at a time.

The seed merged with PEFT's `merge_and_unload` on the whole model loaded in float32 (~60 GB
for ruGPT-3.5-13B). Here the base safetensors shards are walked tensor by tensor: a weight
the adapter targets gets its LoRA delta added in float32, every floating tensor is cast to
the output dtype, and each tensor is appended to an output shard whose header was written
up front. Peak memory is the largest tensor (the embedding) read and cast, plus the Python
runtime, whatever the model size: 1 GB for a 1.1B model, where PEFT's way took 5 GB.

Tensors are read with plain file reads rather than `safe_open`'s memory map: a map keeps
every page it touched resident until the file is closed, so RSS would grow to the whole
shard. `safe_open` still validates each file's header before we trust its offsets.
"""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rugpt_assets.core.artifacts import check_safetensors, publish_dir
from rugpt_assets.core.configs import MergeConfig

log = logging.getLogger(__name__)

# Dagster's code_version of merged_model: bump when the same inputs would give other bytes.
MERGE_VERSION = "1"

OUTPUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# safetensors dtype names (the format's spec)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}

# Weights in any other format would be stale, unmerged copies; pickles are never read.
_OTHER_WEIGHTS = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

# GPT-2's projections are `Conv1D`, which stores weights as (in, out). PEFT decides the
# transpose per module class and overrides `fan_in_fan_out` when it disagrees (with a
# warning), so the module kind, not the flag, says how the delta was trained.
_CONV1D_MODULES = {"c_attn", "c_proj", "c_fc", "q_attn"}

_ADAPTER_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")

# adapter_config.json fields whose non-default value means the adapter is not a plain
# `W + scale * B @ A` on this base; merging it as one would be silently wrong.
_UNSUPPORTED = {
    "use_dora": "DoRA adds a magnitude vector",
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "fully trained copies of whole modules",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "replicated layers",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "alora_invocation_tokens": "activated LoRA, which cannot be merged",
    "use_qalora": "QA-LoRA pooling",
    "use_bdlora": "a LoRA variant",
    "velora_config": "a LoRA variant",
    "monteclora_config": "a LoRA variant",
    "arrow_config": "a LoRA variant",
    "kasa_config": "a LoRA variant",
}
# Other inits (pissa, olora, corda, loftq, lora_ga, mica) rewrite the base weights or the
# update rule, so the saved factors are not a delta on the original base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclass(frozen=True)
class MergeReport:
    tensors_merged: int
    shards: int
    output_bytes: int
    dtype: str
    wall_time_s: float
    peak_rss_gb: float  # 10^9 bytes; of this process since it started (getrusage), not just the merge


@dataclass(frozen=True)
class _Delta:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    conv1d: bool

    def weight_shape(self) -> tuple[int, int]:
        out_features, in_features = self.b.shape[0], self.a.shape[1]
        return (in_features, out_features) if self.conv1d else (out_features, in_features)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        # Same operations, in the same order, as PEFT's get_delta_weight + merge.
        delta = self.b.float() @ self.a.float()
        return weight.float() + (delta.T if self.conv1d else delta) * self.scale


def _canonical(name: str) -> str:
    """Checkpoints name GPT-2 weights with or without the `transformer.` prefix."""
    return name.removeprefix("transformer.")


def _load_adapter(adapter_dir: Path) -> dict[str, _Delta]:
    """LoRA factors by canonical module name (`h.0.attn.c_attn`), after checking the config."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: expected a PEFT LoRA adapter saved by save_pretrained")
    config = json.loads(config_path.read_text())

    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (only LORA)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (trained biases)")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        problems.append(f"init_lora_weights={config['init_lora_weights']!r} (changes the base weights)")
    problems += [f"{key}={config[key]!r} ({why})" for key, why in _UNSUPPORTED.items() if config.get(key)]
    if problems:
        raise ValueError(
            f"{config_path}: not supported by the streamed merge: {'; '.join(problems)}. "
            "Merge this adapter with PEFT's merge_and_unload instead."
        )

    r, alpha, targets = config["r"], config["lora_alpha"], config.get("target_modules")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        match = _ADAPTER_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{weights_path}: unexpected key {key!r}; only lora_A/lora_B weights can be merged")
        module = match["module"]
        if not _targeted(module, targets):
            raise ValueError(f"{weights_path}: {key!r} is not among target_modules={targets!r} of {config_path}")
        factors.setdefault(module, {})[match["ab"]] = tensor

    deltas = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or ab["B"].dim() != 2:
            raise ValueError(f"{weights_path}: {module} needs a 2-D lora_A and lora_B, found {sorted(ab)}")
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise ValueError(f"{weights_path}: {module} has rank {ab['A'].shape[0]}, config says r={r}")
        conv1d = module.rsplit(".", 1)[-1] in _CONV1D_MODULES
        deltas[_canonical(module)] = _Delta(ab["A"], ab["B"], scale, conv1d)
    return deltas


def _targeted(module: str, targets: list[str] | str | None) -> bool:
    """PEFT's own rule: a regex string must match the full name; a list entry, a name suffix."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets or ())


def _read_header(path: Path) -> tuple[int, dict, dict]:
    """(offset of the data block, {name: {dtype, shape, data_offsets}}, metadata)."""
    with safe_open(path, framework="pt"):
        pass  # raises on a malformed file (bad header, overlapping or out-of-range offsets)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    metadata = header.pop("__metadata__", None) or {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which the merge does not handle")
    return 8 + size, header, metadata


def _base_shards(base_dir: Path) -> tuple[list[str], dict | None]:
    """Shard file names, and the index when the checkpoint is sharded."""
    if (base_dir / INDEX_FILE).is_file():
        index = json.loads((base_dir / INDEX_FILE).read_text())
        return sorted(set(index["weight_map"].values())), index
    if (base_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    pickles = sorted(p.name for p in base_dir.glob("*.bin"))
    if pickles:
        raise ValueError(
            f"{base_dir} has weights only as PyTorch pickles ({', '.join(pickles)}); the merge reads safetensors "
            "only. Convert once with transformers (from_pretrained, then save_pretrained) on a trusted machine."
        )
    raise FileNotFoundError(f"{base_dir} has no {SINGLE_FILE} or {INDEX_FILE}: not a Hugging Face model directory")


def _out_dtype(dtype: torch.dtype, output: torch.dtype) -> torch.dtype:
    return output if dtype.is_floating_point else dtype


def _write_shard(src: Path, dst: Path, deltas: dict[str, _Delta], output: torch.dtype) -> int:
    """Merge one shard tensor by tensor; returns the bytes of tensor data written."""
    data_start, header, metadata = _read_header(src)
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    out_header, offset = {}, 0
    for name in names:
        dtype = _out_dtype(_ST_DTYPES[header[name]["dtype"]], output)
        shape = header[name]["shape"]
        nbytes = math.prod(shape) * dtype.itemsize
        out_header[name] = {"dtype": _ST_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    out_header["__metadata__"] = {**metadata, "format": "pt"}
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment

    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            info = header[name]
            tensor = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            fin.seek(data_start + info["data_offsets"][0])
            if fin.readinto(tensor.view(-1).view(torch.uint8).numpy().data) != tensor.nbytes:
                raise ValueError(f"{src}: tensor {name} is truncated")
            delta = deltas.get(_canonical(name))
            if delta is not None:
                tensor = delta.apply(tensor)
            dtype = _out_dtype(tensor.dtype, output)
            if dtype.is_floating_point and tensor.numel():
                # Checked before the cast; NaN fails it too. aminmax is ~20x faster than isfinite here.
                low, high = (v.item() for v in torch.aminmax(tensor))
                if not -torch.finfo(dtype).max <= low <= high <= torch.finfo(dtype).max:
                    raise ValueError(
                        f"{src}: {name} has values outside the {dtype} range ({low:g}..{high:g}); merge to bfloat16 or float32 instead"
                    )
            tensor = tensor.to(dtype)
            fout.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
    return offset


def _copy_non_weights(base_dir: Path, out_dir: Path, dtype: str) -> None:
    """Tokenizer, generation config, README...: every top-level file except weights.

    Subfolders are skipped: on the hub they hold other weight formats.
    """
    for path in sorted(base_dir.iterdir()):
        if not path.is_file() or path.name.endswith(_OTHER_WEIGHTS):
            continue
        if path.name == "config.json":
            config = json.loads(path.read_text())
            config["dtype"] = dtype
            if "torch_dtype" in config:  # written by transformers < 5
                config["torch_dtype"] = dtype
            (out_dir / path.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(path, out_dir / path.name)


def merge_lora(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str = MergeConfig.dtype) -> MergeReport:
    """Write `base + LoRA` to `out_dir` in `dtype`, keeping the base's shard layout."""
    start = time.perf_counter()
    # Resolved once: every file of each input set comes from one published version.
    base_dir, adapter_dir, out_dir = Path(base_dir).resolve(), Path(adapter_dir).resolve(), Path(out_dir)
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"merge dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the base directory; the merge writes a new one")
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir}/config.json is missing: not a Hugging Face model directory")
    shards, index = _base_shards(base_dir)
    check_safetensors(base_dir)
    check_safetensors(adapter_dir)
    deltas = _load_adapter(adapter_dir)

    # Match every adapter module to a base weight before writing anything.
    base_weights = {}  # canonical name -> (name, shard, shape)
    for shard in shards:
        for name, info in _read_header(base_dir / shard)[1].items():
            if _canonical(name) in base_weights:
                raise ValueError(f"{base_dir}: weight {name} appears twice (with and without 'transformer.'?)")
            base_weights[_canonical(name)] = (name, shard, tuple(info["shape"]))
    if index is not None and set(index["weight_map"]) != {name for name, _, _ in base_weights.values()}:
        raise ValueError(f"{base_dir / INDEX_FILE} does not list exactly the tensors in its shards")
    unmatched = sorted(m for m in deltas if f"{m}.weight" not in base_weights)
    if unmatched:
        raise ValueError(
            f"adapter {adapter_dir} has LoRA weights for modules with no weight in {base_dir}: "
            f"{', '.join(unmatched)}. Was it trained on this base? (A tied lm_head has no weight of its own.)"
        )
    for module, delta in deltas.items():
        name, shard, shape = base_weights[f"{module}.weight"]
        if shape != delta.weight_shape():
            raise ValueError(f"{base_dir / shard}: {name} has shape {shape}, the LoRA delta {delta.weight_shape()}")
    weight_deltas = {f"{module}.weight": delta for module, delta in deltas.items()}

    with publish_dir(out_dir) as tmp:
        total_size = 0
        for i, shard in enumerate(shards, 1):
            log.info("merging shard %d/%d: %s", i, len(shards), shard)
            total_size += _write_shard(base_dir / shard, tmp / shard, weight_deltas, OUTPUT_DTYPES[dtype])
        if index is not None:
            out_index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total_size}}
            (tmp / INDEX_FILE).write_text(json.dumps(out_index, indent=2, sort_keys=True) + "\n")
        _copy_non_weights(base_dir, tmp, dtype)
        output_bytes = sum(p.stat().st_size for p in tmp.iterdir())

    return MergeReport(
        tensors_merged=len(deltas),
        shards=len(shards),
        output_bytes=output_bytes,
        dtype=dtype,
        wall_time_s=time.perf_counter() - start,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    )
