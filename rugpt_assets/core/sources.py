"""The seven rulm source datasets: their specs, the two readers, and row normalization.

Rows come either from the offline hub layout (``<sources_dir>/<owner>__<name>/<split>.jsonl``,
one hub row per line) or from the hub through ``datasets``. Whatever form they arrive in,
`normalize_rows` turns them into one plain shape, which is the contract with the chat recipe:

- every column the recipe uses is present; a row that lacks one holds ``None`` there, as
  ``datasets`` gives it;
- message lists are lists of message objects, whether the row held a list of objects or the
  hub's flattened ``{"role": [...], "content": [...]}``; the objects are kept whole;
- roleplay ``dialogues`` are ``[{"chat": [message objects]}, ...]``.

Values are not judged here: rulm reads a field only on the path it takes (an alpaca ``output``
only when the alternative answer is bad, an example dialogue only on some draws), so the recipe
judges each value where it reads it. What is rejected here, counted by reason, is what no path
can read: ``malformed_json``, ``not_utf8``, ``line_too_long``, ``not_an_object``, and
``wrong_type:<col>`` for a message list or dialogue list that is not one. One bad row never
stops a snapshot.

Rows that are kept but do not fit the source's schema are counted too, by their first misfit
(``missing_column:<col>``: the row lacks the column, not a null in it; ``unknown_role:<role>``:
a message list the recipe always reads holds a role the source does not use). The recipe
rejects such rows; a hub schema change (a renamed column, a renamed role) shows as many of
them, which `source_health` judges before the recipe runs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rugpt_assets.core.artifacts import read_jsonl, sha256_file, write_jsonl

SNAPSHOT_FILE = "rows.jsonl"
MAX_REJECT_EXAMPLES = 10
# No hub row comes near this; a longer line is read in pieces and skipped, never held whole.
MAX_LINE_BYTES = 16 << 20


@dataclass(frozen=True)
class Column:
    name: str
    kind: Literal["value", "messages", "dialogues"] = "value"
    # False: the recipe reads this message list only on some paths, so a value that is not one
    # is kept as it is and judged there.
    always_read: bool = True
    # The roles this source's message lists (each dialogue's chat) hold; empty: not checked.
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SourceSpec:
    name: str  # asset keys are raw_<name>
    repo: str
    split: str
    columns: tuple[Column, ...]

    @property
    def local_dirname(self) -> str:
        return self.repo.replace("/", "__")

    def local_path(self, sources_dir: Path) -> Path:
        return Path(sources_dir) / self.local_dirname / f"{self.split}.jsonl"


CHAT_ROLES = frozenset({"user", "bot", "system"})
ROLEPLAY_ROLES = frozenset({"user", "char", "operator"})

_MESSAGES = (Column("messages", "messages", roles=CHAT_ROLES),)

# In the order the recipe consumes them.
SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec(
        "ru_instruct_gpt4",
        "lksy/ru_instruct_gpt4",
        "train",
        (Column("instruction"), Column("input"), Column("full_output")),
    ),
    SourceSpec(
        "ru_turbo_alpaca_evol_instruct",
        "IlyaGusev/ru_turbo_alpaca_evol_instruct",
        "train",
        (Column("instruction"), Column("output")),
    ),
    SourceSpec(
        "ru_turbo_alpaca",
        "IlyaGusev/ru_turbo_alpaca",
        "train",
        (Column("instruction"), Column("input"), Column("output"), Column("alternative_output")),
    ),
    SourceSpec("ru_turbo_saiga", "IlyaGusev/ru_turbo_saiga", "train", _MESSAGES),
    SourceSpec("ru_sharegpt_cleaned", "IlyaGusev/ru_sharegpt_cleaned", "train", _MESSAGES),
    SourceSpec("oasst1_ru_main_branch", "IlyaGusev/oasst1_ru_main_branch", "train", _MESSAGES),
    SourceSpec(
        "gpt_roleplay_realm",
        "IlyaGusev/gpt_roleplay_realm",
        "ru",
        (
            Column("name"),
            Column("context"),
            Column("greeting"),
            Column("example_dialogue", "messages", always_read=False),
            Column("dialogues", "dialogues", roles=ROLEPLAY_ROLES),
        ),
    ),
)
SOURCES_BY_NAME: dict[str, SourceSpec] = {spec.name: spec for spec in SOURCES}


class SourceNotFoundError(FileNotFoundError):
    pass


class SourceHubError(RuntimeError):
    pass


@dataclass(frozen=True)
class RawLineError:
    """A line of a local source file that cannot be read as a row: counted under ``reason``."""

    line: int
    error: str
    reason: str = "malformed_json"


@dataclass(frozen=True)
class Snapshot:
    rows: list[dict[str, Any]]
    rows_read: int  # kept + rejected
    rejected: dict[str, int]  # reason -> count
    # "line 7: malformed_json (...)" / "row 12: wrong_type:messages", the first few, to find them.
    reject_examples: list[str]
    # Kept rows that do not fit the schema, by first reason (module docstring), and the first few.
    misfits: dict[str, int] = field(default_factory=dict)
    misfit_examples: list[str] = field(default_factory=list)

    @property
    def rows_kept(self) -> int:
        return len(self.rows)


# --- normalization ---------------------------------------------------------------------------


class _RowError(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _unflattened(columns: dict[str, Any], column: Column) -> list[dict[str, Any]]:
    """The hub's flattened ``{key: [values]}`` back to one object per item, key by key as rulm
    does it: the first non-empty list sets the number of objects; a shorter list leaves its key
    out of the last objects; a longer one cannot be read."""
    items: list[dict[str, Any]] = []
    for key, values in columns.items():
        if not isinstance(values, list) or (items and len(values) > len(items)):
            raise _RowError(f"wrong_type:{column.name}")
        if not items:
            items = [{} for _ in values]
        for item, value in zip(items, values):
            item[key] = value
    return items


def _objects(value: Any, column: Column) -> list[dict[str, Any]]:
    """A list of objects from its list form or the hub's flattened form."""
    items = _unflattened(value, column) if isinstance(value, dict) else value
    if not (isinstance(items, list) and all(isinstance(item, dict) for item in items)):
        raise _RowError(f"wrong_type:{column.name}")
    return [dict(item) for item in items]


def _messages(value: Any, column: Column) -> Any:
    try:
        return _objects(value, column)
    except _RowError:
        if column.always_read:
            raise
        return value


def _dialogues(value: Any, column: Column) -> list[dict[str, list[dict[str, Any]]]]:
    dialogues = []
    for d in _objects(value, column):
        if "chat" not in d:
            raise _RowError(f"wrong_type:{column.name}")
        dialogues.append({"chat": _objects(d["chat"], column)})
    return dialogues


_READ_COLUMN = {"value": lambda value, column: value, "messages": _messages, "dialogues": _dialogues}


def _normalize_row(spec: SourceSpec, raw: Any) -> dict[str, Any]:
    """The used columns of one raw row, normalized; a misfit raises `_RowError` with its reason."""
    if not isinstance(raw, dict):
        raise _RowError("not_an_object")
    return {column.name: _READ_COLUMN[column.kind](raw.get(column.name), column) for column in spec.columns}


def _misfit(spec: SourceSpec, raw: dict[str, Any], row: dict[str, Any]) -> str | None:
    """The first way a kept row does not fit the source's schema (module docstring), or None."""
    for column in spec.columns:
        if column.name not in raw:
            return f"missing_column:{column.name}"
    for column in spec.columns:
        if not column.roles:
            continue
        chats = [d["chat"] for d in row[column.name]] if column.kind == "dialogues" else [row[column.name]]
        for role in (m.get("role") for chat in chats for m in chat):
            if not (isinstance(role, str) and role in column.roles):
                return f"unknown_role:{role}"
    return None


def normalize_rows(spec: SourceSpec, raw_rows: Iterable[dict | RawLineError]) -> Snapshot:
    rows: list[dict[str, Any]] = []
    rejected: Counter[str] = Counter()
    misfits: Counter[str] = Counter()
    examples: list[str] = []
    misfit_examples: list[str] = []
    n = 0
    for n, raw in enumerate(raw_rows, 1):
        if isinstance(raw, RawLineError):
            reason, where = raw.reason, f"line {raw.line}: {raw.reason} ({raw.error})"
        else:
            try:
                rows.append(_normalize_row(spec, raw))
            except _RowError as e:
                reason, where = e.reason, f"row {n}: {e.reason}"
            else:
                if misfit := _misfit(spec, raw, rows[-1]):
                    misfits[misfit] += 1
                    if len(misfit_examples) < MAX_REJECT_EXAMPLES:
                        misfit_examples.append(f"row {n}: {misfit}")
                continue
        rejected[reason] += 1
        if len(examples) < MAX_REJECT_EXAMPLES:
            examples.append(where)
    return Snapshot(rows, n, dict(rejected), examples, dict(misfits), misfit_examples)


# --- readers ---------------------------------------------------------------------------------


def _local_file(spec: SourceSpec, sources_dir: Path) -> Path:
    path = spec.local_path(sources_dir)
    if path.is_file():
        return path
    found = ""
    if path.parent.is_dir():
        found = f" (the folder holds: {', '.join(sorted(p.name for p in path.parent.iterdir())) or 'nothing'})"
    raise SourceNotFoundError(
        f"source {spec.name!r} ({spec.repo}, split {spec.split!r}): expected {path}, "
        f"which does not exist{found}. Fix: set RUGPT_SOURCES_DIR to a directory in the hub "
        f"layout, one folder per dataset holding <split>.jsonl (here "
        f"{spec.local_dirname}/{spec.split}.jsonl), or use the hub profile "
        f"(RUGPT_PROFILE=rugpt35 with RUGPT_SOURCES_DIR unset)."
    )


def _json_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[dict | RawLineError]:
    # Binary lines: a line with bad UTF-8 becomes a counted error instead of stopping the read.
    with open(path, "rb") as f:
        line_no = 0
        while line := f.readline(max_line_bytes + 1):
            line_no += 1
            if len(line) > max_line_bytes:
                while not line.endswith(b"\n") and (line := f.readline(max_line_bytes)):
                    pass  # the rest of the overlong line, piece by piece
                yield RawLineError(line_no, f"longer than {max_line_bytes} bytes", "line_too_long")
                continue
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawLineError(line_no, f"byte {line[e.start]:#04x} at offset {e.start}", "not_utf8")
                continue
            try:
                yield json.loads(text)
            except ValueError as e:
                yield RawLineError(line_no, str(e))


def read_local(spec: SourceSpec, sources_dir: Path) -> Iterator[dict | RawLineError]:
    """Rows of ``<sources_dir>/<owner>__<name>/<split>.jsonl``; raises at once if it is missing."""
    return _json_lines(_local_file(spec, sources_dir))


def content_hash(spec: SourceSpec, sources_dir: Path) -> str:
    """sha256 of the local source file: its data version when there is no hub revision."""
    return sha256_file(_local_file(spec, sources_dir))


def _hub_error(spec: SourceSpec, revision: str | None, e: Exception) -> SourceHubError:
    return SourceHubError(
        f"source {spec.name!r}: could not load {spec.repo} split {spec.split!r} at revision "
        f"{revision or 'the default branch'}: {type(e).__name__}: {e}. Fix: check network access "
        f"to huggingface.co, set HF_TOKEN if the dataset needs a login, check that the "
        f"revision exists; or mirror the data in the hub layout and set RUGPT_SOURCES_DIR."
    )


def hub_revision(spec: SourceSpec, revision: str | None = None, token: str | None = None) -> str:
    """The commit sha that ``revision`` (None: the default branch) points to right now."""
    import huggingface_hub  # heavy, and only the hub path needs it

    try:
        sha = huggingface_hub.HfApi().dataset_info(spec.repo, revision=revision, token=token).sha
    except Exception as e:
        raise _hub_error(spec, revision, e) from e
    if not sha:  # the hub always names the commit of a revision that exists
        raise RuntimeError(f"the hub named no commit for {spec.repo}@{revision or 'main'}")
    return sha


def read_hub(spec: SourceSpec, revision: str | None = None, token: str | None = None) -> tuple[Iterator[Any], str]:
    """Rows of the hub dataset and the commit sha they were read at.

    ``revision`` None means the default branch. The sha is resolved first and the data is
    loaded at that sha, so the reported revision is exactly the data read.
    """
    sha = hub_revision(spec, revision, token)
    import datasets  # heavy, and only the hub path needs it

    try:
        dataset = datasets.load_dataset(spec.repo, split=spec.split, revision=sha, token=token)
    except Exception as e:
        raise _hub_error(spec, revision, e) from e
    return iter(dataset), sha


def load_local(spec: SourceSpec, sources_dir: Path) -> Snapshot:
    return normalize_rows(spec, read_local(spec, sources_dir))


# --- snapshots -------------------------------------------------------------------------------


def write_snapshot(snapshot: Snapshot, out_dir: Path) -> Path:
    """Write the normalized rows as ``rows.jsonl`` into ``out_dir`` (the caller publishes the set)."""
    path = Path(out_dir) / SNAPSHOT_FILE
    write_jsonl(path, snapshot.rows)
    return path


def read_snapshot(snapshot_dir: Path) -> list[dict[str, Any]]:
    path = Path(snapshot_dir) / SNAPSHOT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot at {path}: materialize the raw source asset first")
    return list(read_jsonl(path))
