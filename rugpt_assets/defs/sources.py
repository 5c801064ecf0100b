"""The seven rulm datasets: an observable `hf/<name>` source and a `raw_<name>` snapshot each.

Both are built from the one spec list in `core.sources`; nothing here is written seven times.
"""

import dagster as dg

from rugpt_assets.core import sources
from rugpt_assets.core.artifacts import atomic_dir
from rugpt_assets.defs.automation import retrain_condition
from rugpt_assets.defs.metadata import preview_table
from rugpt_assets.defs.resources import SourcesResource, StorageResource

# Bump when normalization changes what a snapshot holds.
SNAPSHOT_VERSION = "2"


def source_key(spec: sources.SourceSpec) -> dg.AssetKey:
    return dg.AssetKey(["hf", spec.name])


def observed_source(spec: sources.SourceSpec) -> dg.SourceAsset:
    @dg.observable_source_asset(
        key=source_key(spec),
        group_name="sources",
        description=(
            f"`{spec.repo}` (split `{spec.split}`) as published. An observation records its data "
            "version: the hub revision, or a hash of the local mirror's file "
            f"`<sources dir>/{spec.local_dirname}/{spec.split}.jsonl`."
        ),
        metadata={"repo": spec.repo, "split": spec.split},
        # Observable sources take no `kinds=`; a kind is this tag.
        tags={"dagster/kind/huggingface": ""},
    )
    def _observe(sources_resource: SourcesResource) -> dg.ObserveResult:
        version = sources_resource.data_version(spec)
        return dg.ObserveResult(data_version=dg.DataVersion(version), metadata={"revision": version})

    return _observe


def raw_snapshot(spec: sources.SourceSpec) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"raw_{spec.name}",
        deps=[source_key(spec)],
        group_name="sources",
        kinds={"huggingface", "json"},
        owners=["team:data"],
        pool="cpu",
        code_version=SNAPSHOT_VERSION,
        automation_condition=retrain_condition(),
        description=(
            f"Normalized snapshot of `{spec.repo}` ({spec.split}): the columns the recipe uses, "
            "message lists as lists of objects; rows no path of the recipe can read are counted by "
            f"reason and left out. File: `<storage>/raw/{spec.name}/rows.jsonl`."
        ),
    )
    def _snapshot(
        context: dg.AssetExecutionContext, sources_resource: SourcesResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        raw_rows, revision = sources_resource.read(spec)
        snapshot = sources.normalize_rows(spec, raw_rows)
        target = storage.layout.raw_source(spec.name)
        with atomic_dir(target) as tmp:
            sources.write_snapshot(snapshot, tmp)
        rejected = sum(snapshot.rejected.values())
        context.log.info(
            f"{spec.repo}: {snapshot.rows_read} rows read, {len(snapshot.rows)} kept, {rejected} rejected"
            + (f" ({dict(snapshot.rejected)})" if rejected else "")
        )
        columns = list(snapshot.rows[0]) if snapshot.rows else []
        return dg.MaterializeResult(
            metadata={
                "revision": revision,
                "rows_read": snapshot.rows_read,
                "rows_kept": len(snapshot.rows),
                "rows_rejected": rejected,
                "rejected_by_reason": dg.MetadataValue.json(dict(sorted(snapshot.rejected.items()))),
                "path": dg.MetadataValue.path(str(target / "rows.jsonl")),
                "preview": preview_table(snapshot.rows, columns),
            },
        )

    return _snapshot


observed_sources = [observed_source(spec) for spec in sources.SOURCES]
raw_snapshots = [raw_snapshot(spec) for spec in sources.SOURCES]
