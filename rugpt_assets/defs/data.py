"""`chat_set`: the rulm recipe over the seven source snapshots."""

from pathlib import Path

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.core import chat_recipe, sources
from rugpt_assets.core.artifacts import publish_dir
from rugpt_assets.core.configs import RecipeConfig
from rugpt_assets.defs.automation import retrain_condition
from rugpt_assets.defs.metadata import metadata_table, shorten
from rugpt_assets.defs.resources import StorageResource


class RecipeRunConfig(settings.launchpad_config(settings.profile().recipe)):
    """`RecipeConfig` in the launchpad, defaulting to the profile's values."""


def _chat_preview(records: list[dict], limit: int = 3, width: int = 300) -> str:
    """A few chats as markdown, each message shortened."""
    parts = []
    for i, record in enumerate(records[:limit], 1):
        lines = [f"**Chat {i}** · source `{record['source']}` · {len(record['messages'])} messages"]
        lines += [f"- **{m['role']}**: {shorten(m['content'], width)}" for m in record["messages"]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _counts_table(summary: dict) -> dg.MetadataValue:
    rows = [{"source": s, **counts} for s, counts in sorted(summary["by_source"].items())]
    return metadata_table(rows, ["source", "train", "val"])


@dg.asset(
    deps=[f"raw_{spec.name}" for spec in sources.SOURCES],
    group_name="data",
    kinds={"json"},
    owners=["team:data"],
    pool="cpu",
    code_version=chat_recipe.RECIPE_VERSION,
    automation_condition=retrain_condition(),
    description=(
        "The rulm/Saiga chat set: rulm's `create_chat_set` (commit 7991597) record for record. Seven sources cleaned, "
        "near-duplicates removed, short instructions merged and mixed into Saiga chats, "
        "shuffled with seed 42 and split 95/5. Files: `<storage>/chat_set/train.jsonl`, "
        "`val.jsonl`; rows `{messages: [{role, content}], source}`."
    ),
)
def chat_set(context: dg.AssetExecutionContext, config: RecipeRunConfig, storage: StorageResource) -> dg.MaterializeResult:
    recipe = settings.config_to_dataclass(config, RecipeConfig)
    layout = storage.layout
    rows = {spec.name: sources.read_snapshot(layout.raw_source(spec.name)) for spec in sources.SOURCES}
    bad = chat_recipe.load_bad_substrings(Path(recipe.bad_substrings_path) if recipe.bad_substrings_path else None)
    result = chat_recipe.build_chat_set(rows, recipe, bad)
    with publish_dir(layout.chat_set) as tmp:
        chat_recipe.write_chat_set(result, tmp)
    summary = chat_recipe.summarize(result)
    context.log.info(f"chat_set: {len(result.train)} train, {len(result.val)} validation chats")
    return dg.MaterializeResult(
        metadata={
            "train_chats": len(result.train),
            "val_chats": len(result.val),
            "counts_by_source": _counts_table(summary),
            "length_stats": dg.MetadataValue.json({"chars": summary["chars"], "messages": summary["messages"]}),
            "recipe_stats": dg.MetadataValue.json(result.stats),
            "recipe_parity": dg.MetadataValue.json(chat_recipe.recipe_parity(result)),
            "bad_substrings": len(bad),
            "preview": dg.MetadataValue.md(_chat_preview(result.train)),
            "path": dg.MetadataValue.path(str(layout.chat_set)),
        }
    )
