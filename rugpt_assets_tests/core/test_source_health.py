"""Source health: the verdict behind the blocking check on each raw snapshot, and the reader's
handling of lines that are not rows."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from rugpt_assets.core import source_health, sources
from rugpt_assets.core.configs import SourceHealthConfig

SPEC = sources.SOURCES_BY_NAME["ru_turbo_saiga"]
GOOD = {"messages": [{"role": "user", "content": "Привет"}, {"role": "bot", "content": "Здравствуйте"}]}
RENAMED_ROLE = {"messages": [{"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Да"}]}


def snapshot(good: int, bad: int = 0) -> sources.Snapshot:
    return sources.normalize_rows(SPEC, [GOOD] * good + [RENAMED_ROLE] * bad)


def test_reject_rate_above_the_bound_fails_and_names_reasons():
    health = source_health.assess(snapshot(98, 2), None, SourceHealthConfig())
    assert not health.passed and health.reject_rate == 0.02
    (problem,) = health.problems
    assert "reject rate 2.0% (2 of 100 rows: unknown_role:assistant 2) is above the bound 1.0%" in problem
    assert "row 99: unknown_role:assistant" in problem
    assert source_health.assess(snapshot(99, 1), None, SourceHealthConfig()).passed  # 1 % is allowed


def test_row_drop_is_measured_against_the_last_healthy_snapshot():
    config = SourceHealthConfig()
    first = source_health.assess(snapshot(100), None, config)
    assert first.passed and first.baseline_rows is None
    shrunk = source_health.assess(snapshot(50), first, config)
    assert shrunk.problems == ["rows kept fell from 100 (last healthy snapshot) to 50 (-50.0%), more than the allowed 10.0%"]
    # Still broken next time: the baseline stays the last healthy snapshot, not the broken one.
    again = source_health.assess(snapshot(50), shrunk, config)
    assert not again.passed and again.baseline_rows == 100
    # Accepting the smaller source once (a looser bound) makes it the new baseline.
    accepted = source_health.assess(snapshot(50), again, replace(config, max_row_drop=1.0))
    assert accepted.passed and source_health.assess(snapshot(48), accepted, config).passed
    assert source_health.assess(snapshot(91), first, config).passed  # -9 % is allowed


def test_verdict_round_trips_through_the_snapshot_folder(tmp_path):
    health = source_health.assess(snapshot(98, 2), None, SourceHealthConfig())
    source_health.write_health(health, tmp_path)
    assert source_health.read_health(tmp_path) == health
    assert source_health.read_health(tmp_path / "missing") is None


def test_empty_source_is_an_error_naming_it():
    with pytest.raises(source_health.EmptySourceError, match="source 'ru_turbo_saiga' .* has no rows at somewhere"):
        source_health.require_rows(SPEC, snapshot(0), "somewhere")


def test_bounds_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"max_reject_rate=1.5 must be between 0.0 and 1.0; max_row_drop=-0.1"):
        SourceHealthConfig(max_reject_rate=1.5, max_row_drop=-0.1)


def test_non_utf8_and_overlong_lines_are_counted_with_their_line(tmp_path):
    path = SPEC.local_path(tmp_path)
    path.parent.mkdir(parents=True)
    good = json.dumps(GOOD, ensure_ascii=False).encode()
    with open(path, "wb") as f:
        f.write(good + b"\n")
        f.write(b'{"messages": "\xff\xfe"}\n')  # not UTF-8
        f.write(b'{"x": "' + b"a" * 300 + b'"}\n')  # past the (lowered) line limit
        f.write(good + b"\n")
    lines = list(sources._json_lines(path, max_line_bytes=200))
    result = sources.normalize_rows(SPEC, lines)
    assert result.rows_kept == 2 and result.rejected == {"not_utf8": 1, "line_too_long": 1}
    assert result.reject_examples == ["line 2: not_utf8 (byte 0xff at offset 14)", "line 3: line_too_long (longer than 200 bytes)"]


def test_schema_misfits_are_kept_for_the_recipe_and_counted_for_health():
    """A renamed role or column keeps its rows (rulm's recipe judges them where it reads them)
    but counts them as misfits, which the health check weighs like rejected rows; a null in a
    column that is there is no misfit (the hub has nulls)."""
    alpaca = sources.SOURCES_BY_NAME["ru_turbo_alpaca"]
    row = {"instruction": "Сложи.", "input": None, "output": "4", "alternative_output": None}
    renamed = {"instruction": "Сложи.", "input": None, "answer": "4", "alternative_output": None}
    snap = sources.normalize_rows(alpaca, [row] * 3 + [renamed])
    assert snap.rows_kept == 4 and snap.rejected == {}
    assert snap.misfits == {"missing_column:output": 1} and snap.misfit_examples == ["row 4: missing_column:output"]

    roleplay = sources.SOURCES_BY_NAME["gpt_roleplay_realm"]
    character = {"name": "Огнезар", "context": "Дракон.", "greeting": "Стой!", "example_dialogue": None}
    chats = [{"chat": [{"role": "user", "content": "Кто ты?"}, {"role": "char", "content": "Дракон."}]}]
    renamed_role = [{"chat": [{"role": "user", "content": "Кто ты?"}, {"role": "character", "content": "Дракон."}]}]
    snap = sources.normalize_rows(roleplay, [{**character, "dialogues": chats}, {**character, "dialogues": renamed_role}])
    assert snap.rows_kept == 2 and snap.misfits == {"unknown_role:character": 1}

    health = source_health.assess(snapshot(90, 10), None, SourceHealthConfig())
    assert health.rows_kept == 100 and health.rows_unfit == 10 and health.reject_rate == 0.1
    assert health.reasons == {"unknown_role:assistant": 10} and not health.passed
