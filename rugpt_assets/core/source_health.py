"""Is a source snapshot fit to train on? The verdict behind the blocking check on each `raw_<name>`.

A hub schema change (a renamed column, a renamed role) does not stop a snapshot: normalization
counts the rows that no longer fit, whether it leaves them out (no path of the recipe can read
them) or keeps them for the recipe to reject (`sources.normalize_rows`). Two signs tell such a
change from the odd bad row: the reject rate (both kinds, over the rows read), and the rows kept
falling against the last healthy snapshot. The
verdict is written into the snapshot's own set (``health.json``), so the check reads exactly
what was published and the next snapshot finds its baseline there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rugpt_assets.core.configs import SourceHealthConfig
from rugpt_assets.core.sources import Snapshot, SourceSpec

HEALTH_FILE = "health.json"


class EmptySourceError(ValueError):
    """A source with no rows at all: nothing to snapshot, and nothing is published."""


@dataclass(frozen=True)
class SourceHealth:
    rows_read: int
    rows_kept: int
    rejected: dict[str, int]  # reason -> rows left out
    reject_examples: list[str]
    # Rows kept by the last snapshot that passed; None for the first snapshot.
    baseline_rows: int | None
    max_reject_rate: float
    max_row_drop: float
    problems: list[str] = field(default_factory=list)
    misfits: dict[str, int] = field(default_factory=dict)  # reason -> rows kept that the recipe rejects

    @property
    def reasons(self) -> dict[str, int]:
        """Every reason a row was left out or does not fit, with its count."""
        return dict(sorted((self.rejected | self.misfits).items()))

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def rows_unfit(self) -> int:
        return self.rows_read - self.rows_kept + sum(self.misfits.values())

    @property
    def reject_rate(self) -> float:
        return self.rows_unfit / self.rows_read if self.rows_read else 0.0

    @property
    def row_drop(self) -> float:
        """Fraction of the baseline's rows that are gone (negative when the source grew)."""
        return 1 - self.rows_kept / self.baseline_rows if self.baseline_rows else 0.0


def require_rows(spec: SourceSpec, snapshot: Snapshot, where: str) -> None:
    if snapshot.rows_read == 0:
        raise EmptySourceError(
            f"source {spec.name!r} ({spec.repo}, split {spec.split!r}) has no rows at {where}. "
            "Nothing was published; the previous snapshot stays. Check the file or the hub revision."
        )


def assess(snapshot: Snapshot, previous: SourceHealth | None, config: SourceHealthConfig) -> SourceHealth:
    """The new snapshot's verdict against the bounds and the last healthy snapshot."""
    if previous is None:
        baseline = None
    else:
        baseline = previous.rows_kept if previous.passed else previous.baseline_rows
    health = SourceHealth(
        rows_read=snapshot.rows_read,
        rows_kept=snapshot.rows_kept,
        rejected=dict(sorted(snapshot.rejected.items())),
        reject_examples=[*snapshot.reject_examples, *snapshot.misfit_examples],
        baseline_rows=baseline,
        max_reject_rate=config.max_reject_rate,
        max_row_drop=config.max_row_drop,
        misfits=dict(sorted(snapshot.misfits.items())),
    )
    problems = []
    if health.reject_rate > config.max_reject_rate:
        reasons = ", ".join(f"{reason} {n}" for reason, n in health.reasons.items())
        problems.append(
            f"reject rate {health.reject_rate:.1%} ({health.rows_unfit} of {health.rows_read} rows: "
            f"{reasons}) is above the bound {config.max_reject_rate:.1%}; first ones: {'; '.join(health.reject_examples[:3])}"
        )
    if baseline and health.row_drop > config.max_row_drop:
        problems.append(
            f"rows kept fell from {baseline} (last healthy snapshot) to {health.rows_kept} "
            f"(-{health.row_drop:.1%}), more than the allowed {config.max_row_drop:.1%}"
        )
    return SourceHealth(**{**asdict(health), "problems": problems})


def write_health(health: SourceHealth, snapshot_dir: Path) -> None:
    (Path(snapshot_dir) / HEALTH_FILE).write_text(json.dumps(asdict(health), ensure_ascii=False, indent=2))


def read_health(snapshot_dir: Path) -> SourceHealth | None:
    """The verdict stored with a published snapshot; None when there is no snapshot yet."""
    path = Path(snapshot_dir) / HEALTH_FILE
    return SourceHealth(**json.loads(path.read_text())) if path.is_file() else None
