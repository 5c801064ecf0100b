"""Where every artifact lives, and the one rule by which it gets there (docs/ARCHITECTURE.md,
"Publication rule").

Every path in storage comes from `StorageLayout`. Every artifact *set* — a model folder, a
checkpoint, a chat set, a GGML file with its sidecars — is published the same way:

1. under an exclusive per-set lock (`<parent>/.<name>.lock`, `fcntl.flock`), so two writers of
   one set never interleave: the second waits for the first;
2. written into a fresh version directory `<parent>/.<name>.versions/<version>/`, which no
   reader looks at;
3. verified by the writer (before its `with` block ends) and fsynced, files and directories;
4. published by one atomic `rename(2)` of a symlink: a directory set's public path is a
   symlink to its version (`base_model -> .base_model.versions/<v>`); a file set's members
   are symlinks through one pointer (`model-f16.bin -> .model-f16.bin.current/model-f16.bin`,
   `.model-f16.bin.current -> .model-f16.bin.versions/<v>`), so all its files switch at once;
5. then every other version, and anything a killed writer left, is deleted.

A reader therefore sees the old complete set or the new complete set, never a mix, and never
nothing once something was published. A reader that opens several files of a set resolves
the set once (`published`) and reads everything from that version. A version that is
replaced while a reader still uses it disappears from under it (open files stay readable,
POSIX): such a reader fails with FileNotFoundError rather than mixing versions.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import logging
import os
import resource
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


# --- publication -----------------------------------------------------------------------------


class ArtifactWriteError(OSError):
    """The target could not take a set (full disk, read-only, ...); what was published is untouched."""


def versions_dir(final: Path) -> Path:
    """Where the versions of the set published at ``final`` live."""
    return final.parent / f".{final.name}.versions"


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


def _file_pointer(final: Path) -> Path:
    """The one symlink a file set's member links point through."""
    return final.parent / f".{final.name}.current"


def _new_version_name() -> str:
    # Sortable by time; pid and random suffix keep two hosts on shared storage apart.
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """Hold the set's exclusive lock; a second writer waits here (and says whom it waits for)."""
    path = lock_path(final)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            log.warning("%s is being written by %s; waiting for it to finish", final, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Make a written version durable: every file, then every directory (entries), bottom up."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))
    _fsync_path(root.parent)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two names (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not hasattr(_LIBC, "renameat2"):
        return False
    if _LIBC.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _tmp_link(link: Path) -> Path:
    return link.with_name(f".{link.name.lstrip('.')}.tmp-{os.getpid()}")


def _swap_link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative) with one atomic rename of a fresh symlink."""
    tmp = _tmp_link(link)
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    if link.is_dir() and not link.is_symlink():
        # A directory written before this rule: swap it out in one step, then delete it.
        if _exchange(tmp, link):
            shutil.rmtree(tmp)
        else:  # no RENAME_EXCHANGE here: a moment with nothing at `link`, once per such directory
            legacy = link.with_name(f".{link.name}.tmp-legacy-{os.getpid()}")
            os.replace(link, legacy)
            os.replace(tmp, link)
            shutil.rmtree(legacy)
    else:
        os.replace(tmp, link)
    _fsync_path(link.parent)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _collect_garbage(final: Path, pointer: Path) -> None:
    """Delete every version but the published one, temporaries of killed writers, stale links."""
    current = Path(os.readlink(pointer)).name if pointer.is_symlink() else None
    versions = versions_dir(final)
    if versions.is_dir():
        for version in versions.iterdir():
            if version.name != current:
                _remove(version)
    leftovers = [f".{final.name}.tmp-*"]  # this module's temporaries (and older writers' ones)
    if pointer != final:
        leftovers += [f".{pointer.name.lstrip('.')}.tmp-*", f".{final.stem}.*.tmp-*"]
        for link in final.parent.glob(f"{final.stem}.*"):  # members the published version lacks
            if link.is_symlink() and os.readlink(link).startswith(f"{pointer.name}/") and not link.exists():
                link.unlink()
    for pattern in leftovers:
        for tmp in final.parent.glob(pattern):
            _remove(tmp)


# Errors that mean "this target cannot take the write"; anything else is the writer's own.
_TARGET_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file size limit was reached",
                  errno.EDQUOT: "the disk quota is exhausted", errno.EROFS: "the target is read-only"}  # fmt: skip
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}


_NEARLY_FULL = 1 << 20  # bytes free below which a failed write is put down to a full disk


def _target_problem(exc: BaseException, final: Path, version: Path | None = None) -> tuple[BaseException, str] | None:
    """What in ``exc`` says that the target cannot take the write, and what it says.

    An OSError with a telling errno anywhere in the chain (libraries wrap it: a download that
    hit a full disk is a full disk). Some writers report a short write without an errno (numpy,
    torch.save, Rust code); for those, asked while the unpublished ``version`` is still on
    disk, a nearly full file system or a file grown to the process's size limit says it.
    """
    chain, seen = exc, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError):
            where = Path(chain.filename) if isinstance(chain.filename, (str, Path)) else None
            if chain.errno in _TARGET_ERRNOS:
                return chain, _TARGET_ERRNOS[chain.errno]
            if chain.errno in _PERMISSION_ERRNOS and where is not None and final.parent in (where, *where.parents):
                return chain, "the target is not writable"
        chain = chain.__cause__ or chain.__context__
    if version is None or not version.is_dir():
        return None
    if shutil.disk_usage(version).free < _NEARLY_FULL:
        return exc, _TARGET_ERRNOS[errno.ENOSPC]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and any(p.stat().st_size >= limit for p in version.rglob("*") if p.is_file()):
        return exc, _TARGET_ERRNOS[errno.EFBIG]
    return None


def _write_error(final: Path, cause: BaseException, what: str) -> ArtifactWriteError:
    where = getattr(cause, "filename", None) or final
    detail = getattr(cause, "strerror", None) or cause
    return ArtifactWriteError(
        getattr(cause, "errno", None) or 0,
        f"could not publish {final}: {what} ({detail}; at {where}). Nothing was published; the previous version, if any, is untouched.",
    )


@contextlib.contextmanager
def _target_errors(final: Path) -> Iterator[None]:
    """Name a full disk or read-only target as such, with the set it was writing."""
    try:
        yield
    except ArtifactWriteError:
        raise
    except Exception as exc:
        if (found := _target_problem(exc, final)) is None:
            raise
        raise _write_error(final, *found) from exc


@contextlib.contextmanager
def _publish(final: Path, pointer: Path) -> Iterator[Path]:
    with _target_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        with _locked(final):
            _collect_garbage(final, pointer)  # what a killed writer left behind
            version = versions_dir(final) / _new_version_name()
            try:
                version.mkdir(parents=True)
                yield version
                _fsync_tree(version)
            except BaseException as exc:
                found = _target_problem(exc, final, version) if isinstance(exc, Exception) else None
                shutil.rmtree(version, ignore_errors=True)
                if found is not None:
                    raise _write_error(final, *found) from exc
                raise
            if pointer != final:  # member links first: each dangles (reads as missing) until the switch
                for member in sorted(version.iterdir()):
                    link, target = final.parent / member.name, f"{pointer.name}/{member.name}"
                    if not (link.is_symlink() and os.readlink(link) == target):
                        _swap_link(link, target)
            _swap_link(pointer, os.path.relpath(version, pointer.parent))
            log.info("published %s (version %s)", final, version.name)
            _collect_garbage(final, pointer)


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield an empty version directory; when the block succeeds, ``final`` (a symlink) points at it.

    The block writes and verifies; raising discards the version and leaves ``final`` as it was.
    """
    final = Path(final)
    with _publish(final, final) as version:
        yield version


@contextlib.contextmanager
def publish_file(final: Path) -> Iterator[Path]:
    """Yield the path to write ``final`` at, inside a fresh version directory. Sidecars written
    beside it, named ``<stem>.<suffix>`` (``model-f16.meta``, ``model-f16.eval.json``), belong
    to the same set and are published with it, all at once."""
    final = Path(final)
    with _publish(final, _file_pointer(final)) as version:
        staged = version / final.name
        yield staged
        if not staged.is_file():
            raise FileNotFoundError(f"publish_file: nothing was written to {staged}")
        strays = [p.name for p in version.iterdir() if not p.name.startswith(f"{final.stem}.")]
        if strays:
            raise ValueError(f"publish_file {final}: {strays} are not named {final.stem}.<suffix>")


def collect(final: Path) -> None:
    """Delete what killed writers of the set left behind (for a reader about to use a set that
    is not written again this run); waits for a writer of the set like `publish_*` does."""
    final = Path(final)
    pointer = _file_pointer(final) if _file_pointer(final).is_symlink() else final
    with _target_errors(final), _locked(final):
        _collect_garbage(final, pointer)


def published(path: Path) -> Path:
    """The real path of a published artifact (or a member of one), resolved once: read a set's
    files through this, so that all of them come from the same version."""
    path = Path(path)
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not published: materialize the asset that writes it first") from None


# --- formats ---------------------------------------------------------------------------------


class CorruptArtifactError(ValueError):
    """An input file is truncated or malformed; raised before any work starts on it."""


def check_safetensors(model_dir: Path) -> list[Path]:
    """Every safetensors file of a model folder opens (header complete, offsets inside the file,
    the file fully covered: a truncated or corrupt shard fails here, naming itself) and the
    index names only files that exist. Returns the files. Tensor bytes carry no checksum in
    this format; the set's sha256 in the asset's metadata is what identifies them."""
    from safetensors import safe_open  # heavy; readers that need it have it

    model_dir = published(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as exc:
            raise CorruptArtifactError(f"{index}: not a safetensors index ({exc})") from exc
        if missing := sorted(named - {f.name for f in files}):
            raise CorruptArtifactError(f"{index} names shards that are not in {model_dir}: {', '.join(missing)}")
    for path in files:
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own error type from Rust
            raise CorruptArtifactError(
                f"{path} ({path.stat().st_size} bytes) is not a complete safetensors file: {exc}. "
                "Materialize the asset that wrote it again."
            ) from exc
    return files


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
    """sha256 of every file under ``root``, keyed by relative POSIX path, in sorted order
    (a published set is resolved once, so every file comes from the same version)."""
    root = published(root)
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
