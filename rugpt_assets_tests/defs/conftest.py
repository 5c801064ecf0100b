"""Dagster-side fixtures: a temporary instance and storage root for each test."""

from __future__ import annotations

import dagster as dg
import pytest


@pytest.fixture
def instance(tmp_path, monkeypatch):
    monkeypatch.setenv("RUGPT_STORAGE_DIR", str(tmp_path / "artifacts"))
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        yield instance
