"""Every writing asset, faulted at each point of its publication: killed (four points), out of
disk, and facing a read-only target. After each, a reader sees the previously published set,
intact (same sha256) and loadable, or (killed after the switch) the new set, complete; nothing
partial is visible; the next run cleans up what was left and succeeds.

Full disk: a size-limited tmpfs holding the whole storage, filled up as the faulted write
starts, where mount(2) is allowed (root); else an RLIMIT_FSIZE limit on the writing child.
Read-only: a read-only bind mount of the set's directory (root); else its write bits off.
The fault name printed by pytest says which ran.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path

import pytest

from rugpt_assets.core import artifacts
from rugpt_assets_tests.faults import harness
from rugpt_assets_tests.faults.conftest import TARGETS

pytestmark = pytest.mark.faults

MOUNTS = harness.can_mount()
DISK_FULL = "full_disk_tmpfs" if MOUNTS else "full_disk_rlimit_fsize"
READ_ONLY = "read_only_bind_mount" if MOUNTS else "read_only_chmod"
FAULTS = [*harness.KILL_POINTS, DISK_FULL, READ_ONLY]


def set_size(final: Path) -> int:
    return sum(p.stat().st_size for p in harness.set_members(final).values())


def largest_member(final: Path) -> int:
    return max(p.stat().st_size for p in harness.set_members(final).values())


def reference_size(name: str, final: Path, published_storage: Path, measure) -> int:
    """The set's size from its published version (the checkpoint's from the setup's run)."""
    if name == "lora_checkpoint":
        (checkpoint,) = (published_storage / "artifacts" / "training_runs").glob("*/checkpoint")
        return measure(checkpoint)
    return measure(final)


def published_version(final: Path) -> Path:
    real = artifacts.published(final)
    return real if real.is_dir() else real.parent


def assert_whole(final: Path) -> None:
    """Every public member of the set comes from the one version the pointer names."""
    version = published_version(final)
    for name, path in harness.set_members(final).items():
        assert version in path.parents, f"{name} is read from {path}, not from the published {version}"


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", list(TARGETS))
def test_fault_loses_nothing(name, fault, storage, published_storage, tmp_path, monkeypatch):
    target = TARGETS[name]
    final = target.final()
    options: dict = {}
    with contextlib.ExitStack() as stack:
        if fault in ("mid_write", "full_disk_rlimit_fsize"):
            options["fsize"] = reference_size(name, final, published_storage, largest_member) // 2
        if fault == "full_disk_tmpfs":
            size = reference_size(name, final, published_storage, set_size)
            used = sum(p.stat().st_size for p in storage.rglob("*") if p.is_file() and not p.is_symlink())
            disk = stack.enter_context(harness.small_tmpfs(tmp_path / "disk", used + 4 * size + (16 << 20)))
            shutil.copytree(storage, disk / "artifacts", symlinks=True)
            monkeypatch.setenv("RUGPT_STORAGE_DIR", str(disk / "artifacts"))
            final = target.final()
            options["on_arm"] = lambda: harness.fill_leaving(disk, size // 2)
        if fault.startswith("read_only"):
            final.parent.mkdir(parents=True, exist_ok=True)
            options["on_arm"] = lambda: harness.make_read_only(final.parent, MOUNTS)
        point = fault if fault in harness.KILL_POINTS else None
        try:
            outcome = harness.run_child(target.write, final, tmp_path, point=point, nth=target.nth, **options)
        finally:
            if fault.startswith("read_only"):
                harness.make_writable(final.parent, MOUNTS)
        check_outcome(name, fault, final, outcome, options)

        if fault == "full_disk_tmpfs":
            (tmp_path / "disk" / "ballast").unlink()
        rerun = harness.run_child(target.write, final, tmp_path)
        assert rerun.exitcode == 0, rerun.error[-3000:]
        harness.assert_clean(final)
        assert_whole(final)
        target.load(final)
        if fault == "mid_write":  # proof that the kill cut the set short: the whole set differs
            whole = {p.relative_to(published_version(final)).as_posix(): p.stat().st_size for p in harness.set_members(final).values()}
            assert options["left"] != whole, "the killed writer had written the whole set"


def check_outcome(name: str, fault: str, final: Path, outcome: harness.Outcome, options: dict) -> None:
    assert name == "lora_checkpoint" or outcome.before is not None, "the set was published before the fault"
    if fault in harness.KILL_POINTS:
        assert outcome.signal == (signal.SIGXFSZ if fault == "mid_write" else signal.SIGKILL), outcome
        left = [v for v in artifacts.versions_dir(final).iterdir() if v != published_version(final)]
        assert left, "the killed writer's version is left (for the next run to collect)"
        if fault == "mid_write":  # no file of the unpublished version grew past the limit
            options["left"] = {p.relative_to(v).as_posix(): p.stat().st_size for v in left for p in v.rglob("*") if p.is_file()}
            assert max(options["left"].values(), default=0) <= options["fsize"], options["left"]
    else:
        assert outcome.exitcode == 1, outcome
        assert f"could not publish {final}: {EXPECTED_ERROR[fault]}" in outcome.error, outcome.error[:2000]
        assert [v.name for v in artifacts.versions_dir(final).iterdir()] == [published_version(final).name]

    if fault == "before_gc":  # switched: readers see the new set, whole
        assert harness.version_name(final) not in (None, outcome.version)
    else:
        assert harness.version_name(final) == outcome.version
        assert harness.digest(final) == outcome.before
    assert_whole(final)
    TARGETS[name].load(final)


EXPECTED_ERROR = {
    "full_disk_tmpfs": "the disk is full",
    "full_disk_rlimit_fsize": "a file size limit was reached",
    "read_only_bind_mount": "the target is read-only",
    "read_only_chmod": "the target is not writable",
}
