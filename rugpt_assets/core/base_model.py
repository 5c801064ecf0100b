"""The base model on disk: a pinned hub snapshot of ruGPT-3.5 with the seed's fixes applied.

Only safetensors leave this module. If the hub revision holds only PyTorch `.bin` shards,
they are converted one shard at a time with `torch.load(weights_only=True)`, which cannot
execute code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from rugpt_assets.core.demo_model import BOS_ID, EOS_ID, PAD_ID, write_generation_config

WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
OTHER_PATTERNS = ["*.json", "*.txt", "*.model"]


class HubDownloadError(RuntimeError):
    pass


def download_base_model(repo: str, revision: str, out_dir: Path, token: str | None) -> str:
    """Download `repo@revision` into `out_dir` (safetensors only); returns the resolved commit."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi(token=token).model_info(repo, revision=revision, files_metadata=False)
        names = [s.rfilename for s in info.siblings or []]
        has_safetensors = any(n.endswith(".safetensors") for n in names)
        patterns = OTHER_PATTERNS + (WEIGHT_PATTERNS if has_safetensors else BIN_PATTERNS)
        snapshot_download(repo, revision=info.sha, local_dir=out_dir, allow_patterns=patterns, token=token)
    except Exception as exc:
        raise HubDownloadError(
            f"could not download model {repo}@{revision}: {exc}. Check network access to the hub, "
            "the revision (RUGPT_BASE_MODEL_REVISION), and HF_TOKEN if the repo is gated."
        ) from exc
    if not has_safetensors:
        convert_bin_to_safetensors(Path(out_dir))
    return info.sha


def copy_local_snapshot(src_dir: Path, out_dir: Path) -> str:
    """Copy a hub snapshot already on disk (a mirror, or a model written locally) into `out_dir`:
    the files a download would take, `.bin` shards converted. Returns the source path, which
    stands for the revision."""
    import fnmatch
    import shutil

    src_dir = Path(src_dir).resolve()
    names = sorted(p.name for p in src_dir.iterdir() if p.is_file()) if src_dir.is_dir() else []
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    patterns = OTHER_PATTERNS + (WEIGHT_PATTERNS if has_safetensors else BIN_PATTERNS)
    chosen = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in patterns)]
    if not any(n.endswith((".safetensors", ".bin")) for n in chosen) or "config.json" not in chosen:
        raise FileNotFoundError(f"{src_dir} holds no model snapshot (config.json and *.safetensors or *.bin shards)")
    for name in chosen:
        shutil.copyfile(src_dir / name, Path(out_dir) / name)
    if not has_safetensors:
        convert_bin_to_safetensors(Path(out_dir))
    return str(src_dir)


def convert_bin_to_safetensors(model_dir: Path) -> None:
    """Rewrite `pytorch_model*.bin` shards as `model*.safetensors`, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    index_path = model_dir / "pytorch_model.bin.index.json"
    shards = sorted(model_dir.glob("pytorch_model*.bin"))
    renamed = {s.name: s.name.replace("pytorch_model", "model").replace(".bin", ".safetensors") for s in shards}
    for shard in shards:
        state = torch.load(shard, map_location="cpu", weights_only=True)
        # GPT-2 ties lm_head to wte: safetensors refuses shared storage, and HF re-ties on load.
        state = {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}
        save_file(state, model_dir / renamed[shard.name], metadata={"format": "pt"})
        shard.unlink()
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {
            k: renamed[v] for k, v in index["weight_map"].items() if k != "lm_head.weight"
        }
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        index_path.unlink()


def apply_rugpt_fixes(model_dir: Path) -> None:
    """The seed's fixes: special tokens <pad>=0 <|endoftext|>=1 <s>=2 </s>=3, generation defaults."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<|endoftext|>")
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))
    model_config_path = model_dir / "config.json"
    model_config = json.loads(model_config_path.read_text())
    model_config.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model_config_path.write_text(json.dumps(model_config, indent=2))
    write_generation_config(model_dir)
