"""The publication rule (core/artifacts.py): versions behind one atomically switched symlink,
sidecars switched with their file, folders from before the rule taken over, temporaries of
killed writers collected, one writer at a time, target errors named."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from rugpt_assets.core import artifacts
from rugpt_assets.core.artifacts import ArtifactWriteError, publish_dir, publish_file, published, versions_dir


def test_directory_set_switches_whole_and_keeps_one_version(tmp_path):
    final = tmp_path / "model"
    with publish_dir(final) as version:
        (version / "a.txt").write_text("1")
        (version / "b.txt").write_text("1")
    first = published(final)
    with publish_dir(final) as version:
        (version / "a.txt").write_text("2")
        assert (final / "a.txt").read_text() == "1"  # readers see the old set while the new one is written
    assert final.is_symlink() and sorted(p.name for p in final.iterdir()) == ["a.txt"]  # b.txt went with its set
    assert (final / "a.txt").read_text() == "2"
    assert [v.name for v in versions_dir(final).iterdir()] == [published(final).name] != [first.name]


def test_failed_block_publishes_nothing_and_leaves_no_version(tmp_path):
    final = tmp_path / "model"
    with publish_dir(final) as version:
        (version / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="verification failed"), publish_dir(final) as version:
        (version / "a.txt").write_text("new")
        raise RuntimeError("verification failed")
    assert (final / "a.txt").read_text() == "old"
    assert len(list(versions_dir(final).iterdir())) == 1


def test_file_set_members_switch_together(tmp_path):
    final = tmp_path / "model-f16.bin"
    with publish_file(final) as staged:
        staged.write_bytes(b"v1")
        staged.with_suffix(".meta").write_text("v1")
        staged.with_suffix(".eval.json").write_text("v1")
    with publish_file(final) as staged:
        staged.write_bytes(b"v2")
        staged.with_suffix(".meta").write_text("v2")
        # a reader of the public names still sees v1 everywhere
        assert [final.read_bytes(), final.with_suffix(".meta").read_bytes()] == [b"v1", b"v1"]
    assert final.read_bytes() == b"v2" and final.with_suffix(".meta").read_text() == "v2"
    assert not final.with_suffix(".eval.json").exists() and not final.with_suffix(".eval.json").is_symlink()
    real = published(final)
    assert real.with_suffix(".meta").read_text() == "v2"  # resolving once reaches the whole version
    with pytest.raises(ValueError, match="not named model-f16.<suffix>"), publish_file(final) as staged:
        staged.write_bytes(b"v3")
        (staged.parent / "other.txt").write_text("x")
    assert final.read_bytes() == b"v2"


def test_folder_and_files_from_before_the_rule_are_taken_over(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.txt").write_text("old")
    (tmp_path / "model-f16.bin").write_bytes(b"old")
    with publish_dir(tmp_path / "model") as version:
        (version / "new.txt").write_text("new")
    with publish_file(tmp_path / "model-f16.bin") as staged:
        staged.write_bytes(b"new")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new.txt"]
    assert (tmp_path / "model-f16.bin").read_bytes() == b"new"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_leftovers_of_a_killed_writer_are_collected_by_the_next(tmp_path):
    final = tmp_path / "model"
    with publish_dir(final) as version:
        (version / "a.txt").write_text("1")
    (versions_dir(final) / "20260101T000000-1-dead00").mkdir()  # a killed writer's version
    os.symlink("nowhere", tmp_path / ".model.tmp-4242")  # and its half-made link
    with publish_dir(final) as version:
        (version / "a.txt").write_text("2")
    assert len(list(versions_dir(final).iterdir())) == 1
    assert not (tmp_path / ".model.tmp-4242").is_symlink()


def test_unpublished_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not published: materialize"):
        published(tmp_path / "chat_set")


def _slow_writer(final: str, tag: str, log: str) -> None:
    with publish_dir(Path(final)) as version:
        start = time.monotonic()
        for i in range(5):
            (version / f"part{i}.txt").write_text(tag)
            time.sleep(0.1)
        end = time.monotonic()
    with open(log, "a") as f:
        f.write(json.dumps([tag, start, end]) + "\n")


def test_two_writers_of_one_set_never_interleave(tmp_path):
    final, log = tmp_path / "chat_set", tmp_path / "log.jsonl"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_slow_writer, args=(str(final), tag, str(log))) for tag in "AB"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(30)
    assert [w.exitcode for w in writers] == [0, 0]
    (_, s1, e1), (_, s2, e2) = sorted(json.loads(line) for line in log.read_text().splitlines())
    assert e1 <= s2 or e2 <= s1, "the two writers' blocks overlapped"
    tags = {p.read_text() for p in final.iterdir()}
    assert len(tags) == 1 and len(list(final.iterdir())) == 5  # one writer's whole set, not a mix
    assert len(list(versions_dir(final).iterdir())) == 1


def _hold_lock(final: str, seconds: float) -> None:
    with artifacts._locked(Path(final)):
        time.sleep(seconds)


def _logged_writer(final: str, log: str) -> None:
    logging.getLogger(artifacts.__name__).addHandler(logging.FileHandler(log))
    _slow_writer(final, "A", log + ".times")


def test_waiting_writer_says_whom_it_waits_for(tmp_path):
    final, log = tmp_path / "model", tmp_path / "artifacts.log"
    context = multiprocessing.get_context("fork")
    holder = context.Process(target=_hold_lock, args=(str(final), 1.5))
    holder.start()
    time.sleep(0.3)
    writer = context.Process(target=_logged_writer, args=(str(final), str(log)))
    writer.start()
    time.sleep(0.5)
    assert writer.is_alive() and not final.exists()  # waiting for the lock
    holder.join(30)
    writer.join(30)
    assert writer.exitcode == 0 and len(list(final.iterdir())) == 5
    assert f"{final} is being written by pid {holder.pid} since" in log.read_text()


def test_target_errors_are_named(tmp_path):
    final = tmp_path / "model"
    with publish_dir(final) as version:
        (version / "a.txt").write_text("old")

    def disk_full(version: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(version / "a.txt"))

    with pytest.raises(ArtifactWriteError, match=f"could not publish {final}: the disk is full"), publish_dir(final) as v:
        disk_full(v)
    wrapped = RuntimeError("download failed")  # a library's wrapper around the OS error
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system", str(final))
    with pytest.raises(ArtifactWriteError, match="the target is read-only"), publish_dir(final):
        raise wrapped
    with pytest.raises(KeyError), publish_dir(final):  # the writer's own errors pass unchanged
        raise KeyError("x")
    assert (final / "a.txt").read_text() == "old" and len(list(versions_dir(final).iterdir())) == 1


def test_check_safetensors_names_the_truncated_shard(tmp_path):
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model"
    model.mkdir()
    save_file({"a": torch.zeros(64, 64)}, model / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(64, 64)}, model / "model-00002-of-00002.safetensors")
    assert len(artifacts.check_safetensors(model)) == 2
    shard = model / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(artifacts.CorruptArtifactError, match=f"{shard} .* is not a complete safetensors file"):
        artifacts.check_safetensors(model)
    shard.unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"b": shard.name}}))
    with pytest.raises(artifacts.CorruptArtifactError, match="names shards that are not in"):
        artifacts.check_safetensors(model)
