"""End-to-end fixtures: a DAGSTER_HOME where everything up to `ggml_f16` is materialized."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rugpt_assets_tests.e2e.dagster_dev import PROJECT_ROOT

TRAIN_AND_EXPORT = "import sys; from rugpt_assets import materialize; sys.exit(materialize.run(materialize.TRAIN_AND_EXPORT))"


def home_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RUGPT_STORAGE_DIR": str(home / "storage" / "artifacts"),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory) -> Path:
    """Built once per session: sources → … → ggml_f16 materialized, no quantization yet.

    Tests copy it (`fresh_home`) so each starts from the same state.
    """
    home = tmp_path_factory.mktemp("trained_home")
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_EXPORT],
        cwd=home,
        env=home_env(home),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return home


@pytest.fixture
def fresh_home(trained_home, tmp_path) -> Path:
    """A private copy of `trained_home` (paths inside the storage are re-pointed by env)."""
    home = tmp_path / "home"
    shutil.copytree(trained_home, home, symlinks=True)
    return home


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test (`item.report_call`), so a fixture can tell it failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
