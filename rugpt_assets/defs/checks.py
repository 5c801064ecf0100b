"""Asset checks on the exported GGML files."""

export_checks: list = []
