"""The seven rulm datasets: an observable `hf/<name>` source, a `raw_<name>` snapshot and its
blocking health check each.

All are built from the one spec list in `core.sources`; nothing here is written seven times.
"""

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.core import source_health, sources
from rugpt_assets.core.artifacts import publish_dir
from rugpt_assets.core.configs import SourceHealthConfig
from rugpt_assets.core.figures import percent
from rugpt_assets.defs.automation import retrain_condition
from rugpt_assets.defs.metadata import preview_table
from rugpt_assets.defs.resources import SourcesResource, StorageResource


class SourceHealthRunConfig(settings.launchpad_config(settings.profile().source_health)):
    """`SourceHealthConfig` in the launchpad, defaulting to the profile's values."""


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
            "reason and left out, rows that do not fit the source's schema counted by reason; the "
            "health verdict (reject rate, rows against the last healthy snapshot) beside them. "
            f"Files: `<storage>/raw/{spec.name}/rows.jsonl`, `health.json`."
        ),
    )
    def _snapshot(
        context: dg.AssetExecutionContext,
        config: SourceHealthRunConfig,
        sources_resource: SourcesResource,
        storage: StorageResource,
    ) -> dg.MaterializeResult:
        bounds = settings.config_to_dataclass(config, SourceHealthConfig)
        raw_rows, revision = sources_resource.read(spec)
        snapshot = sources.normalize_rows(spec, raw_rows)
        source_health.require_rows(spec, snapshot, revision)
        target = storage.layout.raw_source(spec.name)
        health = source_health.assess(snapshot, source_health.read_health(target), bounds)
        with publish_dir(target) as tmp:
            sources.write_snapshot(snapshot, tmp)
            source_health.write_health(health, tmp)
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
                "reject_examples": dg.MetadataValue.json(snapshot.reject_examples),
                "misfits_by_reason": dg.MetadataValue.json(dict(sorted(snapshot.misfits.items()))),
                "path": dg.MetadataValue.path(str(target / "rows.jsonl")),
                "preview": preview_table(snapshot.rows, columns),
            },
        )

    return _snapshot


def health_check(spec: sources.SourceSpec) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=f"raw_{spec.name}",
        name="source_healthy",
        blocking=True,
        description=(
            "Blocking: the reject rate is within its bound and the rows kept did not fall by more "
            "than the allowed fraction against the last healthy snapshot (bounds in the snapshot's "
            "launchpad config). While it fails, the automation does not build chat_set from it."
        ),
    )
    def _check(storage: StorageResource) -> dg.AssetCheckResult:
        health = source_health.read_health(storage.layout.raw_source(spec.name))
        if health is None:
            raise FileNotFoundError(f"raw_{spec.name} has no health.json: materialize it again")
        return dg.AssetCheckResult(
            passed=health.passed,
            metadata={
                "reasons": dg.MetadataValue.md("\n".join(f"- {p}" for p in health.problems) or "none"),
                "reject_rate_pct": percent(health.reject_rate),
                "max_reject_rate_pct": percent(health.max_reject_rate),
                "rows_kept": health.rows_kept,
                "baseline_rows": health.baseline_rows if health.baseline_rows is not None else "none (first snapshot)",
                "row_drop_pct": percent(health.row_drop),
                "max_row_drop_pct": percent(health.max_row_drop),
                "rejected_by_reason": dg.MetadataValue.json(health.reasons),
                "reject_examples": dg.MetadataValue.json(health.reject_examples),
            },
        )

    return _check


observed_sources = [observed_source(spec) for spec in sources.SOURCES]
raw_snapshots = [raw_snapshot(spec) for spec in sources.SOURCES]
health_checks = [health_check(spec) for spec in sources.SOURCES]
