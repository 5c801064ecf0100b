"""Only Q5_1: one `ggml_quantized` partition, from the CLI and as a backfill against a running
daemon, creates exactly that file and re-materializes nothing upstream."""

import contextlib
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from rugpt_assets.core import ggml
from rugpt_assets.core.artifacts import sha256_file
from rugpt_assets.core.quantize import QuantType
from rugpt_assets.definitions import defs
from rugpt_assets_tests.e2e.conftest import home_env
from rugpt_assets_tests.e2e.dagster_dev import dagster_dev

QUANT = QuantType.Q5_1

def artifact_files(home: Path) -> dict[str, int]:
    """Every file under the artifact root, with its modification time."""
    root = home / "storage" / "artifacts"
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def materializations(home: Path) -> dict[str, list]:
    """Per asset, the recorded materializations, newest first."""
    # dagster.yaml's storage paths are relative to the home, like the commands run there.
    with contextlib.chdir(home), dg.DagsterInstance.from_config(str(home)) as instance:
        return {
            key.to_user_string(): instance.fetch_materializations(key, limit=1000).records
            for key in defs.resolve_asset_graph().materializable_asset_keys
        }


def partitions(materialized: dict[str, list]) -> dict[str, list]:
    return {key: sorted((r.partition_key for r in records), key=str) for key, records in materialized.items()}


def assert_only_quant_added(home: Path, files_before: dict[str, int], materialized_before: dict[str, list]) -> None:
    files_after = artifact_files(home)
    stem = f"ggml/model-{QUANT.name.lower()}"
    added = set(files_after) - set(files_before)
    assert f"{stem}.bin" in added and all(name.startswith(f"{stem}.") for name in added), sorted(added)
    assert {name: files_after[name] for name in files_before} == files_before  # nothing else rewritten
    path = home / "storage" / "artifacts" / f"{stem}.bin"
    assert ggml.read_hparams(path).ftype == QUANT.ftype

    materialized = materializations(home)
    assert partitions(materialized) == {**partitions(materialized_before), "ggml_quantized": [QUANT.name]}
    (record,) = materialized["ggml_quantized"]
    assert record.asset_materialization.metadata["sha256"].value == sha256_file(path)


@pytest.mark.e2e
def test_cli_materializes_only_q5_1(fresh_home):
    files_before, materialized_before = artifact_files(fresh_home), materializations(fresh_home)
    assert partitions(materialized_before)["ggml_quantized"] == []

    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "rugpt_assets.definitions",
         "--select", "ggml_quantized", "--partition", QUANT.name],
        cwd=fresh_home, env=home_env(fresh_home), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_only_quant_added(fresh_home, files_before, materialized_before)


@pytest.mark.e2e
def test_backfill_of_q5_1_through_the_daemon(fresh_home):
    files_before, materialized_before = artifact_files(fresh_home), materializations(fresh_home)

    with dagster_dev(fresh_home, home_env(fresh_home)) as server:
        params = {"partitionNames": [QUANT.name], "assetSelection": [{"path": ["ggml_quantized"]}]}
        _, status = server.backfill(params, timeout_s=300)
        assert status == "COMPLETED_SUCCESS"

    assert_only_quant_added(fresh_home, files_before, materialized_before)
