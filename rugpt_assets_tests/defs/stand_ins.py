"""Stand-ins for the project's assets with the same names and pools: for launcher tests that
only care where a run goes, not what it computes."""

import dagster as dg


@dg.asset(pool="cpu")
def chat_set() -> int:
    return 1


@dg.asset(pool="gpu")
def lora_adapter(chat_set: int) -> int:
    return chat_set + 1


STAND_IN_DEFS = dg.Definitions(assets=[chat_set, lora_adapter])
