"""Fault injection around the publication rule: a writer runs in a forked child process, which
is killed (or runs out of disk, or meets a read-only target) at a chosen point of one set's
publication; the parent then checks what a reader sees.

Kill points (all while the set's lock is held, all on the child's n-th publication of the set):
- ``mid_write``: the kernel ends the writer inside a write(2) once a file reaches N bytes
  (RLIMIT_FSIZE with SIGXFSZ at its default action: the process dies in the syscall, no
  handler, ``finally`` or ``atexit`` runs, as with SIGKILL; the cut file is checked to exist);
- ``before_fsync``: SIGKILL once the block wrote and verified everything;
- ``before_switch``: SIGKILL just before the symlink that publishes the version is renamed in;
- ``before_gc``: SIGKILL right after the switch, before old versions are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rugpt_assets.core import artifacts

KILL_POINTS = ("mid_write", "before_fsync", "before_switch", "before_gc")


@dataclass(frozen=True)
class Outcome:
    exitcode: int  # negative: killed by that signal
    error: str  # the child's exception, if it raised
    before: str | None  # digest of the published set when the faulted publication started
    version: str | None  # and the name of its version

    @property
    def signal(self) -> int | None:
        return -self.exitcode if self.exitcode < 0 else None


def is_file_set(final: Path) -> bool:
    return (final.parent / f".{final.name}.current").is_symlink()


def set_members(final: Path) -> dict[str, Path]:
    """Public name -> real file, for everything a reader of the set sees."""
    final = Path(final)
    if is_file_set(final):
        pointer = f".{final.name}.current/"
        return {
            link.name: link.resolve()
            for link in sorted(final.parent.glob(f"{final.stem}.*"))
            if link.is_symlink() and os.readlink(link).startswith(pointer) and link.exists()
        }
    root = artifacts.published(final)
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def digest(final: Path) -> str | None:
    """sha256 over the set's member names and bytes as a reader sees them; None if unpublished."""
    if not (Path(final).exists() or is_file_set(final)):
        return None
    return json.dumps({name: artifacts.sha256_file(path) for name, path in set_members(final).items()}, sort_keys=True)


def version_name(final: Path) -> str | None:
    """The version directory a reader of the set resolves to now."""
    if digest(final) is None:
        return None
    real = artifacts.published(final)
    return (real if real.is_dir() and not is_file_set(final) else real.parent).name


def assert_clean(final: Path) -> None:
    """After a successful run: one version, the pointer on it, no temporaries, no dangling links."""
    final = Path(final)
    versions = list(artifacts.versions_dir(final).iterdir())
    assert len(versions) == 1, f"{final}: versions left behind: {[v.name for v in versions]}"
    real = artifacts.published(final)
    assert versions[0] in (real, real.parent), (versions, real)
    leftovers = [p.name for p in final.parent.iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"temporaries left in {final.parent}: {leftovers}"
    dangling = [p.name for p in final.parent.iterdir() if p.is_symlink() and not p.exists()]
    assert not dangling, f"dangling links in {final.parent}: {dangling}"


def _arm(target: Path, point: str | None, nth: int, fsize: int | None, on_arm: Callable[[], None] | None, record: Path) -> None:
    """In the child: wrap the publication steps of `target` to fail at `point`."""
    state = {"entries": 0, "armed": False, "switched": False}
    publish, fsync_tree, swap_link, collect = (artifacts._publish, artifacts._fsync_tree, artifacts._swap_link, artifacts._collect_garbage)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def faulty_publish(final: Path, pointer: Path) -> Iterator[Path]:
        if Path(final) == target:
            state["entries"] += 1
            if state["entries"] == nth:
                record.write_text(json.dumps({"before": digest(target), "version": version_name(target)}))
                state["armed"] = True
                if on_arm is not None:  # the disk fills up / the target turns read-only now
                    on_arm()
                if point == "mid_write" or fsize is not None:
                    assert fsize is not None, "a mid-write fault needs the size to cut the write at"
                    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
                    signal.signal(signal.SIGXFSZ, signal.SIG_DFL if point == "mid_write" else signal.SIG_IGN)
        with publish(final, pointer) as version:
            yield version

    def faulty_fsync(root: Path) -> None:
        if state["armed"] and point == "before_fsync":
            die()
        fsync_tree(root)

    def faulty_swap(link: Path, link_target: str) -> None:
        publishes = Path(link_target).parts[0].endswith(".versions")  # the switch, not a member link
        if state["armed"] and publishes and point == "before_switch":
            die()
        swap_link(link, link_target)
        state["switched"] = state["switched"] or (state["armed"] and publishes)

    def faulty_collect(final: Path, pointer: Path) -> None:
        if state["switched"] and point == "before_gc":
            die()
        collect(final, pointer)

    artifacts._publish = faulty_publish
    artifacts._fsync_tree = faulty_fsync
    artifacts._swap_link = faulty_swap
    artifacts._collect_garbage = faulty_collect


def run_child(
    write: Callable[[], object],
    target: Path,
    workdir: Path,
    point: str | None = None,
    nth: int = 1,
    fsize: int | None = None,
    on_arm: Callable[[], None] | None = None,
    timeout_s: float = 600,
) -> Outcome:
    """Run `write` in a forked child with the fault armed on its `nth` publication of `target`:
    a kill `point`, a file size limit `fsize` (SIGXFSZ ignored: writes fail with EFBIG), or
    `on_arm`, run in the child as that publication starts."""
    record, error = workdir / "fault-record.json", workdir / "fault-error.txt"
    for path in (record, error):
        path.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            # OpenMP's thread pool does not survive fork(): a parallel region would hang the child.
            torch.set_num_threads(1)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a kernel kill dumps no core
            _arm(Path(target), point, nth, fsize, on_arm, record)
            write()
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
            error.write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            code = 1
        os._exit(code)
    deadline_signal = signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
    signal.alarm(int(timeout_s))
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, deadline_signal)
    exitcode = os.waitstatus_to_exitcode(status)
    recorded = json.loads(record.read_text()) if record.exists() else {}
    return Outcome(exitcode, error.read_text() if error.exists() else "", recorded.get("before"), recorded.get("version"))


# --- targets that cannot take a write ---------------------------------------------------------


def can_mount() -> bool:
    """Root with mount(2) allowed: a real tmpfs / read-only bind mount, else the fallbacks."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"rugpt-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size_bytes: int) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill_leaving(mountpoint: Path, free_bytes: int) -> Path:
    """A ballast file that leaves about `free_bytes` free on the file system."""
    ballast = mountpoint / "ballast"
    stat = os.statvfs(mountpoint)
    size = max(0, stat.f_bavail * stat.f_frsize - free_bytes)
    with open(ballast, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            size -= f.write(chunk[: min(len(chunk), size)])
    return ballast


def make_read_only(directory: Path, mounts: bool) -> None:
    """`directory` read-only: a read-only bind mount (EROFS) as root, else its write bits off."""
    if mounts:
        subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True)
    else:
        for p in [directory, *directory.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(p.stat().st_mode & ~0o222)


def make_writable(directory: Path, mounts: bool) -> None:
    if mounts:
        while subprocess.run(["mountpoint", "-q", str(directory)]).returncode == 0:
            subprocess.run(["umount", str(directory)], check=True)
    else:
        for p in [directory, *directory.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o200)
