"""The pool of every step either code location can run, read from the definitions: what the
routing tests compare the runs' launcher tags and executed steps with."""

import dagster as dg

from rugpt_assets import definitions, gpu_definitions

GPU_POOL = "gpu"  # dagster.yaml's `gpu_pools`


def step_pools(defs: dg.Definitions) -> dict[str, str | None]:
    """Every op a run of this location can execute (assets, observations, checks), with its pool."""
    job = defs.resolve_implicit_global_asset_job_def()
    return {node.name: node.definition.pool for node in job.graph.nodes if isinstance(node.definition, dg.OpDefinition)}


STEP_POOLS = {**step_pools(definitions.defs), **step_pools(gpu_definitions.defs)}
