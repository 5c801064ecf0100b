"""Only one partition: GGML Q5_1 of `ggml_quantized` or GGUF Q5_K_M of `gguf_quantized`, from
the CLI and as a backfill against a running daemon, creates exactly that file (and its
sidecars) and re-materializes nothing upstream."""

import contextlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from rugpt_assets.core import ggml, gguf
from rugpt_assets.core.artifacts import sha256_file
from rugpt_assets.core.gguf import GGUFType
from rugpt_assets.core.quantize import QuantType
from rugpt_assets.definitions import defs
from rugpt_assets_tests.e2e.conftest import home_env
from rugpt_assets_tests.e2e.dagster_dev import dagster_dev
from rugpt_assets_tests.gguf_support import require_llama_cpp


@dataclass(frozen=True)
class Partition:
    asset: str
    key: str
    stem: str  # the file's path under the artifact root, without suffix
    suffix: str
    file_type: int  # what the written file's header says

    def read_file_type(self, path: Path) -> int:
        return ggml.read_hparams(path).ftype if self.suffix == ".bin" else gguf.read_gguf(path).file_type


GGML_Q5_1 = Partition("ggml_quantized", QuantType.Q5_1.name, "ggml/model-q5_1", ".bin", QuantType.Q5_1.ftype)
GGUF_Q5_K_M = Partition("gguf_quantized", GGUFType.Q5_K_M.name, "gguf/model-q5_k_m", ".gguf", int(GGUFType.Q5_K_M.file_type))
PARTITIONS = pytest.mark.parametrize("partition", [GGML_Q5_1, GGUF_Q5_K_M], ids=lambda p: p.asset)


def needs(partition: Partition) -> None:
    if partition.asset == "gguf_quantized":
        require_llama_cpp()


def artifact_files(home: Path) -> dict[str, int]:
    """Every file under the artifact root, with its modification time."""
    root = home / "storage" / "artifacts"
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def materializations(home: Path) -> dict[str, list]:
    """Per asset, the recorded materializations, newest first."""
    # dagster.yaml's storage paths are relative to the home, like the commands run there.
    with contextlib.chdir(home), dg.DagsterInstance.from_config(str(home)) as instance:
        return {
            key.to_user_string(): list(instance.fetch_materializations(key, limit=1000).records)
            for key in defs.resolve_asset_graph().materializable_asset_keys
        }


def partitions(materialized: dict[str, list]) -> dict[str, list]:
    return {key: sorted((r.partition_key for r in records), key=str) for key, records in materialized.items()}


def assert_only_partition_added(
    home: Path, partition: Partition, files_before: dict[str, int], materialized_before: dict[str, list]
) -> None:
    files_after = artifact_files(home)
    added = set(files_after) - set(files_before)
    assert f"{partition.stem}{partition.suffix}" in added, sorted(added)
    # The partition's files, and its set's lock and versions (the publication rule keeps them
    # beside the file as `.<file>.lock`, `.<file>.versions/…`): nothing of another set.
    folder, file_stem = partition.stem.split("/")
    own = (f"{partition.stem}.", f"{folder}/.{file_stem}{partition.suffix}.")
    assert all(name.startswith(own) for name in added), sorted(added)
    assert {name: files_after[name] for name in files_before} == files_before  # nothing else rewritten
    path = home / "storage" / "artifacts" / f"{partition.stem}{partition.suffix}"
    assert partition.read_file_type(path) == partition.file_type

    materialized = materializations(home)
    assert partitions(materialized) == {**partitions(materialized_before), partition.asset: [partition.key]}
    (record,) = materialized[partition.asset]
    assert record.asset_materialization.metadata["sha256"].value == sha256_file(path)


@pytest.mark.e2e
@PARTITIONS
def test_cli_materializes_only_one_partition(fresh_home, partition):
    needs(partition)
    files_before, materialized_before = artifact_files(fresh_home), materializations(fresh_home)
    assert partitions(materialized_before)[partition.asset] == []

    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "asset",
            "materialize",
            "-m",
            "rugpt_assets.definitions",
            "--select",
            partition.asset,
            "--partition",
            partition.key,
        ],
        cwd=fresh_home,
        env=home_env(fresh_home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_only_partition_added(fresh_home, partition, files_before, materialized_before)


@pytest.mark.e2e
@PARTITIONS
def test_backfill_of_one_partition_through_the_daemon(fresh_home, partition):
    needs(partition)
    files_before, materialized_before = artifact_files(fresh_home), materializations(fresh_home)

    with dagster_dev(fresh_home, home_env(fresh_home)) as server:
        params = {"partitionNames": [partition.key], "assetSelection": [{"path": [partition.asset]}]}
        _, status = server.backfill(params, timeout_s=300)
        assert status == "COMPLETED_SUCCESS"

    assert_only_partition_added(fresh_home, partition, files_before, materialized_before)
