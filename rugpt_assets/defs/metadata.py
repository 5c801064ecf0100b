"""How assets present numbers and rows in the UI: tables whose column types follow the values,
previews of the first rows, text shortened to a width, floats to the digits that carry meaning
(`core.figures`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from rugpt_assets.core.figures import QUALITY_DIGITS, significant


def shorten(text: str, width: int) -> str:
    """One line of at most `width` characters, cut with an ellipsis."""
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def metadata_table(rows: Sequence[Mapping], columns: Sequence[str]) -> dg.MetadataValue:
    """A metadata table whose column types follow the values (int, float, else string)."""

    def column_type(name: str) -> str:
        values = [r[name] for r in rows if r.get(name) is not None]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return "int"
        return "float" if values and all(isinstance(v, (int, float)) for v in values) else "string"

    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: r.get(c) for c in columns}) for r in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(c, column_type(c)) for c in columns]),
    )


def preview_table(rows: Sequence[Mapping], columns: Sequence[str], limit: int = 5, width: int = 80) -> dg.MetadataValue:
    """A small table of the first rows, long text shortened, for the asset's metadata."""

    def cell(value) -> str:
        return shorten(value if isinstance(value, str) else repr(value), width)

    return metadata_table([{c: cell(r.get(c, "")) for c in columns} for r in rows[:limit]], columns)


def rounded_floats(values: Mapping[str, Any], digits: int = QUALITY_DIGITS) -> dict[str, Any]:
    """`values` with each float to `digits` significant digits (a build summary, say)."""
    return {k: significant(v, digits) if isinstance(v, float) else v for k, v in values.items()}
