"""Where every artifact lives, and how it gets there without ever being half-written.

Every path in storage comes from `StorageLayout`. Writers go through `atomic_dir` /
`atomic_file`: they write into a hidden temporary sibling, and only a complete, verified
result is renamed into place, so a crash never leaves something downstream could pick up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StorageLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def raw_source(self, source_name: str) -> Path:
        """Normalized snapshot of one source: a directory with ``rows.jsonl``."""
        return self.root / "raw" / source_name

    @property
    def chat_set(self) -> Path:
        """Directory with ``train.jsonl`` and ``val.jsonl``."""
        return self.root / "chat_set"

    @property
    def base_model(self) -> Path:
        return self.root / "base_model"

    @property
    def lora_adapter(self) -> Path:
        return self.root / "lora_adapter"

    @property
    def training_runs(self) -> Path:
        """Per-input checkpoint directories, kept so a killed run can resume."""
        return self.root / "training_runs"

    @property
    def merged_model(self) -> Path:
        return self.root / "merged_model"

    @property
    def ggml_dir(self) -> Path:
        return self.root / "ggml"

    @property
    def ggml_f16(self) -> Path:
        return self.ggml_dir / "model-f16.bin"

    def ggml_quantized(self, quant_name: str) -> Path:
        return self.ggml_dir / f"model-{quant_name.lower()}.bin"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    @property
    def gguf_f16(self) -> Path:
        return self.gguf_dir / "model-f16.gguf"

    def gguf_quantized(self, gguf_type_name: str) -> Path:
        return self.gguf_dir / f"model-{gguf_type_name.lower()}.gguf"


def _tmp_sibling(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _replace(src: Path, final: Path) -> None:
    """Rename ``src`` onto ``final``; an existing ``final`` is moved aside first, then removed."""
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(final, old)
        os.replace(src, final)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(src, final)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``final`` only if the block succeeds."""
    final = Path(final)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary file path that becomes ``final`` only if the block succeeds."""
    final = Path(final)
    tmp_dir = _tmp_sibling(final)
    tmp = tmp_dir / final.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_file: nothing was written to {tmp}")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as UTF-8 JSON lines (stable key order, no ASCII escaping); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha256s(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative POSIX path, in sorted order."""
    root = Path(root)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return {name: sha256_file(root / name) for name in names}


def sha256_of_files(file_hashes: Mapping[str, str]) -> str:
    """One content hash from per-file hashes: relative paths and file hashes, in sorted order."""
    h = hashlib.sha256()
    for name in sorted(file_hashes):
        h.update(name.encode())
        h.update(b"\0")
        h.update(file_hashes[name].encode())
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    """Content hash of a directory: relative paths and file bytes, in sorted order."""
    return sha256_of_files(file_sha256s(root))


class MissingUpstreamError(FileNotFoundError):
    """A step's input was never materialized (or was removed since)."""


def require_upstream(step: str, inputs: Mapping[str, Iterable[Path]]) -> None:
    """Fail before any work when an input artifact is missing, naming what to materialize first.

    ``inputs`` maps each upstream artifact's name to the files ``step`` reads from it.
    """
    missing = {name: [str(p) for p in paths if not Path(p).exists()] for name, paths in inputs.items()}
    missing = {name: paths for name, paths in missing.items() if paths}
    if missing:
        names = " and ".join(missing)
        files = "; ".join(", ".join(paths) for paths in missing.values())
        raise MissingUpstreamError(
            f"{step} reads {names}, which {'is' if len(missing) == 1 else 'are'} not materialized "
            f"(missing: {files}). Materialize {names} first, then {step}."
        )


def weights_file_figures(path: Path, f16_path: Path, elements: int) -> dict[str, Any]:
    """A model file's size, bits per stored weight (file bits over tensor elements: headers,
    vocabulary and f32 norms included), ratio to its f16 file, and sha256."""
    size = Path(path).stat().st_size
    return {
        "size_bytes": size,
        "parameters": elements,
        "bits_per_weight": 8 * size / elements,
        "ratio_to_f16": size / Path(f16_path).stat().st_size,
        "sha256": sha256_file(path),
    }
