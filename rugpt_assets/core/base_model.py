"""The base model on disk: a pinned hub snapshot of ruGPT-3.5 with the seed's fixes applied,
or the tiny demo GPT-2, written once and reused while it is what was asked for.

Only safetensors leave this module. If the hub revision holds only PyTorch `.bin` shards,
they are converted one shard at a time with `torch.load(weights_only=True)`, which cannot
execute code from the file.

Snapshots. A model directory written here holds a manifest (`SNAPSHOT_MANIFEST`): the
snapshot's identity (hub repo and resolved commit, or the demo recipe's hash), every file's
size and sha256, and the build summary. Asked for the same identity again, `ensure_snapshot`
re-hashes the files against the manifest and reuses the directory untouched; a different
identity, or any missing, extra or changed file, gets a fresh copy, published by the
publication rule (`artifacts.publish_dir`: readers see the old snapshot or the new one). The
content hash of the recorded files is the snapshot's identity downstream (data version,
training run key): equal bytes, equal hash, however often the snapshot was re-verified.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rugpt_assets.core import demo_model
from rugpt_assets.core.artifacts import file_sha256s, publish_dir, published, sha256_file, sha256_of_files, sha256_tree
from rugpt_assets.core.demo_model import BOS_ID, EOS_ID, PAD_ID, write_generation_config

# In a subfolder: `from_pretrained` and the merge (which copies top-level files only) ignore it.
SNAPSHOT_MANIFEST = ".snapshot/manifest.json"
# Bump by hand when the conversion or the fixes change what a hub snapshot holds.
HUB_SNAPSHOT_VERSION = "1"
COMMIT = re.compile(r"[0-9a-f]{40}")

WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
OTHER_PATTERNS = ["*.json", "*.txt", "*.model"]


class HubDownloadError(RuntimeError):
    pass


def check_base_model_settings(repo: str | None, revision: str, token_env_var: str, local_dir: str | None = None) -> None:
    """The base model settings, checked before anything is downloaded, copied or built."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problems = []
    if local_dir and not Path(local_dir).is_dir():
        problems.append(f"local_dir={local_dir!r}: not a directory (a model snapshot in the hub layout)")
    if repo is not None:
        try:
            validate_repo_id(repo)
        except HFValidationError as exc:
            problems.append(f"repo={repo!r}: not a hub repo id ({exc})")
    if not revision.strip():
        problems.append("revision='': name a branch, tag or commit")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token_env_var):
        problems.append(f"token_env_var={token_env_var!r}: not an environment variable name")
    if problems:
        raise ValueError("invalid base_model settings: " + "; ".join(problems))


def _hub_error(repo: str, revision: str, exc: Exception) -> HubDownloadError:
    return HubDownloadError(
        f"could not download model {repo}@{revision}: {exc}. Check network access to the hub, "
        "the revision (RUGPT_BASE_MODEL_REVISION), and HF_TOKEN if the repo is gated."
    )


def resolve_revision(repo: str, revision: str, token: str | None) -> str:
    """The commit `revision` names: a full commit hash as it is (no network), a branch or tag
    as the hub resolves it now."""
    if COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi

    try:
        info = HfApi(token=token).model_info(repo, revision=revision, files_metadata=False)
    except Exception as exc:
        raise _hub_error(repo, revision, exc) from exc
    return _commit(info, repo, revision)


def _commit(info: Any, repo: str, revision: str) -> str:
    """The commit a hub answer names (the hub always sends one for an existing revision)."""
    if not info.sha:
        raise RuntimeError(f"the hub named no commit for {repo}@{revision}")
    return info.sha


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
        raise _hub_error(repo, revision, exc) from exc
    # The hub client's download bookkeeping (timestamps): not part of the model, and it would
    # make two downloads of one commit hash differently.
    shutil.rmtree(Path(out_dir) / ".cache", ignore_errors=True)
    if not has_safetensors:
        convert_bin_to_safetensors(Path(out_dir))
    return _commit(info, repo, revision)


def local_snapshot_files(src_dir: Path) -> list[Path]:
    """The files of a hub snapshot already on disk (a mirror, or a model written locally) that a
    download would take: safetensors when there are any, else the `.bin` shards."""
    import fnmatch

    src_dir = Path(src_dir).resolve()
    names = sorted(p.name for p in src_dir.iterdir() if p.is_file()) if src_dir.is_dir() else []
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    patterns = OTHER_PATTERNS + (WEIGHT_PATTERNS if has_safetensors else BIN_PATTERNS)
    chosen = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in patterns)]
    if not any(n.endswith((".safetensors", ".bin")) for n in chosen) or "config.json" not in chosen:
        raise FileNotFoundError(f"{src_dir} holds no model snapshot (config.json and *.safetensors or *.bin shards)")
    return [src_dir / n for n in chosen]


def copy_local_snapshot(src_dir: Path, out_dir: Path) -> None:
    """Copy `local_snapshot_files` into `out_dir`, `.bin` shards converted."""
    files = local_snapshot_files(src_dir)
    for path in files:
        shutil.copyfile(path, Path(out_dir) / path.name)
    if not any(path.suffix == ".safetensors" for path in files):
        convert_bin_to_safetensors(Path(out_dir))


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
        index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items() if k != "lm_head.weight"}
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


# --- snapshots -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    path: Path
    identity: dict[str, Any]  # what was asked for: hub repo + commit, or the demo recipe's hash
    files: dict[str, str]  # relative path -> sha256, the manifest excluded
    summary: dict[str, Any]  # what the build reported (parameters, pre-training loss, revision...)
    reused: bool
    rebuilt_because: str = ""  # why the snapshot on disk (if any) was not reused

    @property
    def content_sha256(self) -> str:
        return sha256_of_files(self.files)


def describe(identity: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in identity.items())


MANIFEST_KEYS = {"identity", "content_sha256", "files", "summary"}


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The snapshot's manifest, or None when there is none or it is not one written here."""
    path = Path(model_dir) / SNAPSHOT_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and MANIFEST_KEYS <= manifest.keys() else None


def snapshot_problem(model_dir: Path, identity: dict[str, Any]) -> str | None:
    """None when `model_dir` holds an intact snapshot of `identity` (every file re-hashed);
    otherwise what is wrong with it, in words."""
    if not Path(model_dir).is_dir():
        return f"no snapshot at {model_dir}"
    model_dir = published(model_dir)  # one version for the manifest and every file checked
    manifest = read_manifest(model_dir)
    if manifest is None:
        return f"{model_dir} has no readable {SNAPSHOT_MANIFEST}"
    if manifest["identity"] != identity:
        return f"it holds {describe(manifest['identity'])}; asked for {describe(identity)}"
    recorded: dict[str, dict[str, Any]] = manifest["files"]
    present = {p.relative_to(model_dir).as_posix(): p for p in model_dir.rglob("*") if p.is_file()}
    present.pop(SNAPSHOT_MANIFEST)
    if missing := sorted(recorded.keys() - present.keys()):
        return f"files missing: {', '.join(missing)}"
    if extra := sorted(present.keys() - recorded.keys()):
        return f"files not in the manifest: {', '.join(extra)}"
    # Sizes first: a truncated shard is found without reading gigabytes.
    for name, entry in recorded.items():
        if (size := present[name].stat().st_size) != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']}"
    for name, entry in recorded.items():
        if (sha256 := sha256_file(present[name])) != entry["sha256"]:
            return f"{name} differs from the manifest (sha256 {sha256[:12]}…, recorded {entry['sha256'][:12]}…)"
    return None


def ensure_snapshot(model_dir: Path, identity: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> Snapshot:
    """Reuse the intact snapshot of `identity` in `model_dir` (nothing is written), else
    `build(tmp)` a fresh one into a new version, record its manifest, and publish it."""
    model_dir = Path(model_dir)
    current = published(model_dir) if model_dir.is_dir() else model_dir  # one version throughout
    problem = snapshot_problem(current, identity)
    manifest = read_manifest(current)
    if problem is None and manifest is not None:  # no problem: the manifest is there and intact
        files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
        return Snapshot(model_dir, identity, files, manifest["summary"], reused=True)
    with publish_dir(model_dir) as tmp:
        summary = build(tmp)
        files = file_sha256s(tmp)
        manifest = {
            "identity": identity,
            "content_sha256": sha256_of_files(files),
            "files": {name: {"sha256": h, "bytes": (tmp / name).stat().st_size} for name, h in files.items()},
            "summary": summary,
        }
        (tmp / SNAPSHOT_MANIFEST).parent.mkdir()
        (tmp / SNAPSHOT_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return Snapshot(model_dir, identity, files, summary, reused=False, rebuilt_because=problem or "no manifest")


def content_sha256(model_dir: Path) -> str:
    """A model directory's content hash: the one its manifest recorded when it was written (and
    `ensure_snapshot` verifies whenever the snapshot is asked for), else hashed from the files."""
    manifest = read_manifest(model_dir)
    return manifest["content_sha256"] if manifest else sha256_tree(model_dir)


def _build_hub_snapshot(repo: str, commit: str, token: str | None, out_dir: Path) -> dict[str, Any]:
    download_base_model(repo, commit, out_dir, token)
    apply_rugpt_fixes(out_dir)
    return {"repo": repo, "revision": commit}


def _build_local_snapshot(src_dir: Path, out_dir: Path) -> dict[str, Any]:
    copy_local_snapshot(src_dir, out_dir)
    apply_rugpt_fixes(out_dir)
    return {"repo": "local", "revision": str(Path(src_dir).resolve())}


def _build_demo_snapshot(texts: list[str], out_dir: Path) -> dict[str, Any]:
    return {**demo_model.build_demo_model(texts, out_dir), "repo": "demo (built locally)"}


def materialize_base_model(
    model_dir: Path, repo: str | None, revision: str, token: str | None, samples_dir: Path, local_dir: Path | None = None
) -> Snapshot:
    """The snapshot in `local_dir` (copied), else `repo@revision`, each with the seed's fixes, or
    (neither) the demo model built from the texts in `samples_dir`; reused from `model_dir` when
    an intact snapshot of the same thing is there. A local snapshot is the same thing while its
    files keep their names, sizes and modification times (not re-hashed: it may be 26 GB)."""
    if local_dir:
        files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in local_snapshot_files(local_dir)]  # JSON-shaped
        identity = {"builder": "local", "path": str(Path(local_dir).resolve()), "files": files,
                    "version": HUB_SNAPSHOT_VERSION}  # fmt: skip
        build = functools.partial(_build_local_snapshot, Path(local_dir))
    elif repo:
        commit = resolve_revision(repo, revision, token)
        identity = {"builder": "hub", "repo": repo, "revision": commit, "version": HUB_SNAPSHOT_VERSION}
        build = functools.partial(_build_hub_snapshot, repo, commit, token)
    else:
        texts = list(demo_model.sample_texts(samples_dir))
        identity = demo_model.recipe_identity(texts)
        build = functools.partial(_build_demo_snapshot, texts)
    return ensure_snapshot(model_dir, identity, build)
