"""A planted HF_TOKEN reaches the hub calls that need it and nothing else: no log line,
metadata entry, Dagster event or file holds it (the UI's GraphQL event log is checked in
e2e/test_secrets_ui.py)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import dagster as dg
import pytest
from dagster._serdes import serialize_value

from rugpt_assets.core import sources
from rugpt_assets.defs.model import base_model
from rugpt_assets.defs.resources import SourcesResource, StorageResource
from rugpt_assets.defs.sources import raw_snapshots
from rugpt_assets_tests.faults.conftest import HUB_REPO, op_config

pytestmark = pytest.mark.faults

SPEC = sources.SOURCES_BY_NAME["ru_turbo_alpaca_evol_instruct"]
ROW = {"instruction": "Назови столицу России.", "output": "Москва."}


def files_holding(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]


def test_token_reaches_the_hub_calls_and_nothing_else(published_storage, tmp_path, monkeypatch, caplog, capfd):
    token = "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", token)
    storage = tmp_path / "artifacts"
    monkeypatch.setenv("RUGPT_STORAGE_DIR", str(storage))
    hub_files = sorted((published_storage / "hub").iterdir())
    seen: list[str | None] = []

    def model_info(self, repo, revision=None, files_metadata=False):
        seen.append(self.token)
        return SimpleNamespace(sha="1" * 40, siblings=[SimpleNamespace(rfilename=p.name) for p in hub_files])

    def snapshot_download(repo, revision, local_dir, allow_patterns, token):
        seen.append(token)
        for p in hub_files:
            shutil.copy(p, Path(local_dir) / p.name)

    def dataset_info(self, repo, revision=None, token=None):
        seen.append(token)
        if revision == "missing":  # the error path: the hub refuses, our error wraps its message
            raise RuntimeError(f"404 Client Error: Revision Not Found for url: https://huggingface.co/api/datasets/{repo}")
        return SimpleNamespace(sha="2" * 40)

    def load_dataset(repo, split, revision, token):
        seen.append(token)
        return [ROW] * 20

    raw = next(a for a in raw_snapshots if a.key == dg.AssetKey(f"raw_{SPEC.name}"))
    caplog.set_level("DEBUG")
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance, \
            mock.patch("huggingface_hub.HfApi.model_info", model_info), \
            mock.patch("huggingface_hub.snapshot_download", snapshot_download), \
            mock.patch("huggingface_hub.HfApi.dataset_info", dataset_info), \
            mock.patch("datasets.load_dataset", load_dataset):  # fmt: skip
        resources = {"storage": StorageResource(), "sources_resource": SourcesResource(mode="hub")}
        result = dg.materialize(
            [base_model, raw],
            instance=instance,
            resources=resources,
            run_config=op_config("base_model", {"repo": HUB_REPO, "revision": "main"}),
        )
        assert result.success
        failing = dg.materialize(
            [raw],
            instance=instance,
            raise_on_error=False,
            resources={**resources, "sources_resource": SourcesResource(mode="hub", revisions={SPEC.name: "missing"})},
        )
        assert not failing.success
        events = [serialize_value(record) for run in instance.get_runs() for record in instance.all_logs(run.run_id)]
        assert any("Revision Not Found" in e for e in events)  # the failure is in the event log, token-free
    assert seen and all(t == token for t in seen), "every hub call got the token"
    assert all(token not in e for e in events), "a Dagster event (log, metadata, error) holds the token"
    assert token not in caplog.text
    out, err = capfd.readouterr()
    assert token not in out + err
    assert not files_holding(tmp_path, token.encode()), "a file holds the token"
    assert os.environ["HF_TOKEN"] == token
