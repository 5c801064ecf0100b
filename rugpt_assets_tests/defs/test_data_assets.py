"""Sources and chat_set materialized through Dagster into a temporary instance."""

from __future__ import annotations

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.core import chat_recipe, sources
from rugpt_assets.core.artifacts import StorageLayout, read_jsonl
from rugpt_assets.definitions import defs


def _latest(instance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None, f"{key} was not materialized"
    return event.asset_materialization.metadata


def test_sources_and_chat_set_materialize(instance, tmp_path):
    selection = [f"raw_{s.name}" for s in sources.SOURCES] + ["chat_set"]
    result = defs.get_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(k) for k in selection})
    run = result.execute_in_process(instance=instance)
    assert run.success

    gpt4 = _latest(instance, "raw_ru_instruct_gpt4")
    assert gpt4["rows_read"].value == gpt4["rows_kept"].value + gpt4["rows_rejected"].value
    # Only a row no path can read; the others are judged by the recipe where it reads them.
    assert gpt4["rows_rejected"].value == 1
    assert gpt4["rejected_by_reason"].value == {"malformed_json": 1}
    assert gpt4["revision"].value.startswith("sha256:")
    assert len(gpt4["preview"].value.records) == 5

    chat = _latest(instance, "chat_set")
    layout = StorageLayout(settings.storage_root())
    train = list(read_jsonl(layout.chat_set / "train.jsonl"))
    val = list(read_jsonl(layout.chat_set / "val.jsonl"))
    assert chat["train_chats"].value == len(train) > 0
    assert chat["val_chats"].value == len(val) > 0
    counted = {r.data["source"]: r.data["train"] + r.data["val"] for r in chat["counts_by_source"].value.records}
    assert sum(counted.values()) == len(train) + len(val)
    assert "**Chat 1**" in chat["preview"].value
    parity = chat["recipe_parity"].value
    assert parity["reference"] == (
        "rulm self_instruct/src/data_processing/create_chat_set.py at commit "
        "7991597ef64329b5e288d95b10ef53a3536fa680, with datasketch 1.5.9"
    )
    assert "random.choice(string.ascii_lowercase) 11 times" in parity["datasketch_behaviour"]
    # The bundled gpt4 sample: 3 empty answers and 2 bad ones skipped as rulm skips them, and an
    # instruction that is a number, which rulm cannot process, rejected.
    assert parity["counts_per_source"]["ru_instruct_gpt4"] == {
        "step": "gpt4", "rows": 24, "dropped_empty_answer": 3, "dropped_bad_answer": 2,
        "rejected_instruction_not_text": 1, "kept": 18,
    }  # fmt: skip
    assert set(parity["counts_per_source"]) == {s.name for s in sources.SOURCES}
    # The data version of chat_set is tied to the recipe's code version.
    event = instance.get_latest_materialization_event(dg.AssetKey("chat_set"))
    assert event.asset_materialization.tags["dagster/code_version"] == chat_recipe.RECIPE_VERSION
