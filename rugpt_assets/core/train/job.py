"""The trainer's input, a `TrainJob` (paths and settings, also as the job JSON file the CLI
reads), and its output."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rugpt_assets.core.configs import TrainConfig, from_dict, to_dict

JOB_PATHS = ("base_model_dir", "train_path", "val_path", "output_dir", "runs_dir")


@dataclass(frozen=True)
class TrainJob:
    base_model_dir: Path
    train_path: Path  # jsonl rows {"messages": [{"role", "content"}, ...], "source": ...}
    val_path: Path
    output_dir: Path  # the adapter, published as one set (artifacts.publish_dir)
    runs_dir: Path  # checkpoints, one subdirectory per run key
    config: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name in JOB_PATHS:
            object.__setattr__(self, name, Path(getattr(self, name)))

    @classmethod
    def from_json(cls, path: Path) -> TrainJob:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = sorted(set(values) - {*JOB_PATHS, "train"})
        missing = [k for k in JOB_PATHS if k not in values]
        if unknown or missing:
            raise ValueError(f"{path}: unknown keys {unknown}, missing keys {missing}; expected {JOB_PATHS} and 'train'")
        return cls(**{k: values[k] for k in JOB_PATHS}, config=from_dict(TrainConfig, values.get("train", {})))

    def to_json(self) -> dict[str, Any]:
        return {**{k: str(getattr(self, k)) for k in JOB_PATHS}, "train": to_dict(self.config)}

    def write(self, path: Path) -> None:
        """The trainer's input, written before the trainer starts (not an artifact)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, Any]
