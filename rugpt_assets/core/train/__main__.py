"""``python -m rugpt_assets.core.train --config job.json`` (see `cli`)."""

from rugpt_assets.core.train.cli import main

main()
