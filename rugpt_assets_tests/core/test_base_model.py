"""Base model snapshots: asked for again, an intact snapshot is verified and reused untouched;
a new revision or any damage gets a fresh copy; the hub is asked only for what a pin leaves open."""

import json
import os
import re
from pathlib import Path

import pytest

from rugpt_assets.core import base_model
from rugpt_assets.core.artifacts import published, sha256_tree, versions_dir
from rugpt_assets.core.base_model import (
    SNAPSHOT_MANIFEST,
    content_sha256,
    ensure_snapshot,
    materialize_base_model,
    snapshot_problem,
)
from rugpt_assets.core.demo_model import DemoModelSpec, recipe_identity

IDENTITY = {"builder": "test", "revision": "r1"}


class CountingBuilder:
    """Writes a small model-shaped folder whose bytes depend on `payload`; counts its calls."""

    def __init__(self, payload: bytes = b"weights-v1"):
        self.payload = payload
        self.calls = 0

    def __call__(self, out_dir: Path) -> dict:
        self.calls += 1
        (out_dir / "config.json").write_text(json.dumps({"n_layer": 2}))
        (out_dir / "model.safetensors").write_bytes(self.payload * 1000)
        (out_dir / "tokenizer").mkdir()
        (out_dir / "tokenizer" / "vocab.json").write_text("{}")
        return {"parameters": 42}


def stat_of_every_file(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_same_identity_is_verified_and_reused_untouched(tmp_path):
    build = CountingBuilder()
    first = ensure_snapshot(tmp_path / "base", IDENTITY, build)
    assert not first.reused and first.rebuilt_because.startswith("no snapshot")
    files_before = stat_of_every_file(tmp_path / "base")

    version_before = published(tmp_path / "base")

    again = ensure_snapshot(tmp_path / "base", IDENTITY, build)
    assert again.reused and build.calls == 1
    assert again.content_sha256 == first.content_sha256 and again.summary == {"parameters": 42}
    assert stat_of_every_file(tmp_path / "base") == files_before  # not one file rewritten
    # Nor published again: the same version, and no other one started beside it.
    assert published(tmp_path / "base") == version_before
    assert list(versions_dir(tmp_path / "base").iterdir()) == [version_before]


def test_content_hash_covers_the_model_files_not_the_manifest(tmp_path):
    snapshot = ensure_snapshot(tmp_path / "base", IDENTITY, CountingBuilder())
    (tmp_path / "plain").mkdir()
    CountingBuilder()(tmp_path / "plain")
    # The same files without a manifest hash the same: the identity is the bytes.
    assert snapshot.content_sha256 == content_sha256(tmp_path / "base") == sha256_tree(tmp_path / "plain")
    assert sorted(snapshot.files) == ["config.json", "model.safetensors", "tokenizer/vocab.json"]


def truncate(root: Path) -> None:
    with open(root / "model.safetensors", "r+b") as f:
        f.truncate(10)


def flip_a_byte(root: Path) -> None:
    data = bytearray((root / "model.safetensors").read_bytes())
    data[5000] ^= 1
    (root / "model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (truncate, r"model\.safetensors has 10 bytes, the manifest says 10000"),
        (flip_a_byte, r"model\.safetensors differs from the manifest"),
        (lambda root: (root / "tokenizer" / "vocab.json").unlink(), r"files missing: tokenizer/vocab\.json"),
        (lambda root: (root / "stray.safetensors").write_bytes(b"x"), r"files not in the manifest: stray\.safetensors"),
        (lambda root: (root / SNAPSHOT_MANIFEST).unlink(), r"no readable \.snapshot/manifest\.json"),
        (lambda root: (root / SNAPSHOT_MANIFEST).write_text("{"), r"no readable \.snapshot/manifest\.json"),
        (lambda root: (root / SNAPSHOT_MANIFEST).write_text("{}"), r"no readable \.snapshot/manifest\.json"),
    ],
    ids=["truncated", "byte-flipped", "file-missing", "extra-file", "manifest-missing", "manifest-corrupt", "manifest-empty"],
)
def test_damaged_snapshot_gets_a_fresh_copy(tmp_path, damage, reason):
    build = CountingBuilder()
    intact = ensure_snapshot(tmp_path / "base", IDENTITY, build)
    damage(tmp_path / "base")

    repaired = ensure_snapshot(tmp_path / "base", IDENTITY, build)
    assert not repaired.reused and build.calls == 2
    assert re.search(reason, repaired.rebuilt_because), repaired.rebuilt_because
    assert snapshot_problem(tmp_path / "base", IDENTITY) is None
    assert repaired.content_sha256 == intact.content_sha256
    assert not (tmp_path / "base" / "stray.safetensors").exists()


def test_new_identity_gets_a_fresh_copy(tmp_path):
    ensure_snapshot(tmp_path / "base", IDENTITY, CountingBuilder(b"weights-v1"))
    newer = {**IDENTITY, "revision": "r2"}
    build = CountingBuilder(b"weights-v2")
    snapshot = ensure_snapshot(tmp_path / "base", newer, build)
    assert not snapshot.reused and build.calls == 1
    assert "revision r1" in snapshot.rebuilt_because and "revision r2" in snapshot.rebuilt_because
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == b"weights-v2" * 1000
    assert ensure_snapshot(tmp_path / "base", newer, build).reused


def test_failed_build_leaves_the_previous_snapshot(tmp_path):
    before = ensure_snapshot(tmp_path / "base", IDENTITY, CountingBuilder())

    def broken(out_dir: Path) -> dict:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ensure_snapshot(tmp_path / "base", {**IDENTITY, "revision": "r2"}, broken)
    assert snapshot_problem(tmp_path / "base", IDENTITY) is None
    assert content_sha256(tmp_path / "base") == before.content_sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == [".base.lock", ".base.versions", "base"]
    assert list(versions_dir(tmp_path / "base").iterdir()) == [published(tmp_path / "base")]  # no temporary left


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def fake_hub(monkeypatch):
    """The hub as this module sees it: `main` points at COMMIT_A; downloads are recorded."""
    downloads: list[str] = []
    resolved: list[str] = []

    def download(repo, revision, out_dir, token):
        downloads.append(revision)
        (Path(out_dir) / "config.json").write_text(json.dumps({"n_layer": 40}))
        (Path(out_dir) / "model.safetensors").write_bytes(revision.encode() * 100)
        return revision

    class FakeApi:
        def __init__(self, token=None):
            pass

        def model_info(self, repo, revision, files_metadata=False):
            resolved.append(revision)
            return type("Info", (), {"sha": {"main": COMMIT_A}[revision]})()

    monkeypatch.setattr(base_model, "download_base_model", download)
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    return downloads, resolved


def test_pinned_revision_is_downloaded_once_and_a_new_one_again(tmp_path, fake_hub):
    downloads, resolved = fake_hub
    first = materialize_base_model(tmp_path / "base", "org/model", COMMIT_A, None, tmp_path)
    again = materialize_base_model(tmp_path / "base", "org/model", COMMIT_A, None, tmp_path)
    assert (first.reused, again.reused) == (False, True)
    assert downloads == [COMMIT_A] and resolved == []  # a pinned commit needs no hub call at all
    assert again.content_sha256 == first.content_sha256 and again.summary["revision"] == COMMIT_A
    # The seed's fixes are part of the snapshot (and of its hash).
    assert json.loads((tmp_path / "base" / "config.json").read_text())["eos_token_id"] == 3

    # A branch is resolved (one metadata call), and still reuses the snapshot of its commit.
    assert materialize_base_model(tmp_path / "base", "org/model", "main", None, tmp_path).reused
    assert resolved == ["main"] and downloads == [COMMIT_A]

    newer = materialize_base_model(tmp_path / "base", "org/model", COMMIT_B, None, tmp_path)
    assert not newer.reused and downloads == [COMMIT_A, COMMIT_B]
    assert newer.content_sha256 != first.content_sha256


def test_demo_recipe_identity_follows_texts_and_spec():
    texts = ["Привет", "мир"]
    assert recipe_identity(texts) == recipe_identity(list(texts))
    assert recipe_identity(texts) != recipe_identity(["Привет", "мир!"])
    assert recipe_identity(texts) != recipe_identity(["Приветмир"])  # boundaries count
    assert recipe_identity(texts) != recipe_identity(texts, DemoModelSpec(pretrain_steps=10))
    # It survives a round trip through the manifest's JSON unchanged (so it compares equal).
    assert json.loads(json.dumps(recipe_identity(texts))) == recipe_identity(texts)


def test_untouched_tree_keeps_its_content_hash_after_new_timestamps(tmp_path):
    snapshot = ensure_snapshot(tmp_path / "base", IDENTITY, CountingBuilder())
    for p in (tmp_path / "base").rglob("*"):
        os.utime(p, ns=(1, 1))
    assert snapshot_problem(tmp_path / "base", IDENTITY) is None
    assert content_sha256(tmp_path / "base") == snapshot.content_sha256


def test_local_snapshot_is_copied_with_the_fixes_and_reused_until_it_changes(tmp_path):
    """RUGPT_BASE_MODEL_DIR: a snapshot on disk in the hub layout is taken like a download
    (weights, config, tokenizer files; nothing else), reused while its files stay the same."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "config.json").write_text(json.dumps({"n_layer": 10, "eos_token_id": 50256}))
    (mirror / "model-00001-of-00001.safetensors").write_bytes(b"w" * 1000)
    (mirror / "tokenizer.json").write_text("{}")
    (mirror / "README.md").write_text("not part of a model")
    first = materialize_base_model(tmp_path / "base", "org/model", "main", None, tmp_path, local_dir=mirror)
    copied = {p.name for p in (tmp_path / "base").iterdir() if p.is_file()}
    assert not first.reused and "README.md" not in copied
    assert {"config.json", "model-00001-of-00001.safetensors", "tokenizer.json", "generation_config.json"} <= copied
    assert json.loads((tmp_path / "base" / "config.json").read_text())["eos_token_id"] == 3  # the seed's fixes
    assert first.summary["revision"] == str(mirror.resolve())
    assert materialize_base_model(tmp_path / "base", None, "main", None, tmp_path, local_dir=mirror).reused

    (mirror / "model-00001-of-00001.safetensors").write_bytes(b"v" * 1001)
    changed = materialize_base_model(tmp_path / "base", None, "main", None, tmp_path, local_dir=mirror)
    assert not changed.reused and changed.content_sha256 != first.content_sha256
    with pytest.raises(FileNotFoundError, match="holds no model snapshot"):
        materialize_base_model(tmp_path / "other", None, "main", None, tmp_path, local_dir=tmp_path / "missing")
