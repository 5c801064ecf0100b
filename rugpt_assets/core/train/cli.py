"""``python -m rugpt_assets.core.train --config job.json``: train from a job file, under
torchrun for DDP. Reports through Dagster Pipes when Pipes launched it (`pipes`), else logs to
stdout; ends itself when the process that started it is gone."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from rugpt_assets.core.train.job import TrainJob
from rugpt_assets.core.train.loop import train
from rugpt_assets.core.train.pipes import dagster_pipes_reporter
from rugpt_assets.core.train.runtime import running

log = logging.getLogger(__name__)


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """End this process once the one that started it (the Dagster run worker, torchrun's agent,
    a shell) is gone. A trainer left running alone holds the GPU and keeps writing checkpoints
    into the run directory that the next run of the same job resumes from."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        log.error("the process that started this trainer (pid %d) is gone: exiting", launcher)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LoRA-tune a GPT-2 base on chat jsonl files.")
    parser.add_argument("--config", type=Path, required=True, help="job JSON: TrainJob paths and 'train' settings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    exit_with_launcher()
    job = TrainJob.from_json(args.config)
    with running(job.config) as rt, dagster_pipes_reporter(rt) as reporter:
        train(job, rt, reporter)
