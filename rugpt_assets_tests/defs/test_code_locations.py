"""The two code locations: GPU steps in one, every other step in the other, lineage across them."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

from rugpt_assets import definitions, gpu_definitions
from rugpt_assets.core.quantize import QuantType
from rugpt_assets.defs import jobs
from rugpt_assets_tests.pools import GPU_POOL, step_pools

ROOT = Path(__file__).resolve().parents[2]


def materializable(defs: dg.Definitions) -> set[str]:
    return {k.to_user_string() for k in defs.resolve_asset_graph().materializable_asset_keys}


def test_workspace_loads_both_locations():
    entries = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"]
    modules = {e["python_module"]["location_name"]: e["python_module"]["module_name"] for e in entries}
    assert modules == {"rugpt_assets": "rugpt_assets.definitions", "rugpt_assets_gpu": "rugpt_assets.gpu_definitions"}


def test_gpu_location_holds_gpu_steps_only_and_the_cpu_location_none():
    gpu_steps, cpu_steps = step_pools(gpu_definitions.defs), step_pools(definitions.defs)
    # The eval-loss check runs inside the training step: there is no second step.
    assert gpu_steps == {"lora_adapter": "gpu"}
    assert gpu_definitions.defs.resolve_asset_graph().asset_check_keys == {
        dg.AssetCheckKey(dg.AssetKey("lora_adapter"), "eval_loss_below_base")
    }
    assert GPU_POOL not in set(cpu_steps.values())
    assert {name for name, pool in cpu_steps.items() if pool == "cpu"} == materializable(definitions.defs)


def test_lineage_crosses_the_locations_by_key():
    gpu_graph, cpu_graph = gpu_definitions.defs.resolve_asset_graph(), definitions.defs.resolve_asset_graph()
    lora = dg.AssetKey("lora_adapter")
    assert gpu_graph.get(lora).parent_keys == {dg.AssetKey("base_model"), dg.AssetKey("chat_set")}
    assert cpu_graph.get(dg.AssetKey("merged_model")).parent_keys == {dg.AssetKey("base_model"), lora}
    # What one location only references, the other defines: nothing dangles, nothing is defined twice.
    gpu_refs = {k.to_user_string() for k in gpu_graph.get_all_asset_keys()} - materializable(gpu_definitions.defs)
    cpu_refs = {
        k.to_user_string()
        for k in cpu_graph.get_all_asset_keys()
        if not cpu_graph.get(k).is_materializable and not cpu_graph.get(k).is_observable
    }
    assert gpu_refs <= materializable(definitions.defs) and cpu_refs == {"lora_adapter"}
    assert not materializable(definitions.defs) & materializable(gpu_definitions.defs)


def test_jobs_cover_every_asset_once_in_dependency_order():
    """prepare → train → export → quantize (and quantize_gguf): each materializable asset in exactly one job."""
    planned = [
        (definitions.defs, "prepare"),
        (gpu_definitions.defs, "train"),
        (definitions.defs, "export"),
        (definitions.defs, "quantize"),
        *[(definitions.defs, job.name) for job in jobs.quantize_gguf_jobs],
    ]
    covered = []
    for defs, name in planned:
        job = defs.resolve_job_def(name)
        covered += [k.to_user_string() for k in job.asset_layer.selected_asset_keys]
    assert sorted(covered) == sorted(materializable(definitions.defs) | materializable(gpu_definitions.defs))
    assert definitions.defs.resolve_job_def("quantize").partitions_def.get_partition_keys() == [q.name for q in QuantType]


def test_workspace_validates(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
        cwd=tmp_path,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Validation successful for code location rugpt_assets." in output
    assert "Validation successful for code location rugpt_assets_gpu." in output
