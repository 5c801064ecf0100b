"""Two runs materializing the same asset at once (the UI clicked twice): their writes never
interleave; the second waits for the first and then publishes its own complete set."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from pathlib import Path

import pytest

from rugpt_assets.core import artifacts, chat_recipe
from rugpt_assets_tests.faults import harness
from rugpt_assets_tests.faults.conftest import layout, materialize

pytestmark = pytest.mark.faults


def _materialize_chat_set_slowly(log: str) -> None:
    """chat_set as a run writes it, with the write stretched so that two runs overlap."""
    write = chat_recipe.write_chat_set

    def slow_write(chat_set, out_dir: Path) -> None:
        start = time.monotonic()
        write(chat_set, out_dir)
        time.sleep(1.5)
        with open(log, "a") as f:
            f.write(json.dumps([start, time.monotonic(), str(out_dir)]) + "\n")

    chat_recipe.write_chat_set = slow_write
    logging.getLogger(artifacts.__name__).addHandler(logging.FileHandler(Path(log).with_name("artifacts.log")))
    materialize("chat_set")


def test_two_runs_of_one_asset_never_interleave(storage, tmp_path):
    final = layout().chat_set
    before = harness.digest(final)
    log = tmp_path / "writes.jsonl"
    context = multiprocessing.get_context("fork")
    runs = [context.Process(target=_materialize_chat_set_slowly, args=(str(log),)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(300)
    assert [run.exitcode for run in runs] == [0, 0]
    (s1, e1, v1), (s2, e2, v2) = sorted(json.loads(line) for line in log.read_text().splitlines())
    assert e1 <= s2, "the second run wrote while the first was still writing"
    assert v1 != v2  # each run wrote its own version ...
    assert harness.version_name(final) == Path(v2).name  # ... and the later one is published, whole
    assert harness.digest(final) == before  # the recipe is deterministic: same bytes
    harness.assert_clean(final)
    waits = (tmp_path / "artifacts.log").read_text()
    assert f"{final} is being written by pid " in waits and "waiting for it to finish" in waits
