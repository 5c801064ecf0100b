#!/usr/bin/env python3
"""Fresh-machine entry points; needs only Python ≥ 3.11 with pip.

    python3 tasks.py demo    # set up .venv, materialize the whole graph, serve the UI on 127.0.0.1:3000
    python3 tasks.py test    # set up .venv, lint (ruff), type-check (basedpyright), run the test suite

    python3 tasks.py demo --gguf-quantizations   # also every GGUF quantization (needs the gguf extra)

Environment: RUGPT_PROFILE (demo | rugpt35), RUGPT_HOST / RUGPT_PORT for the UI, RUGPT_TORCH
(the torch requirement installed first; default torch==2.13.0), RUGPT_EXTRAS (extra pip extras;
`gguf` adds llama.cpp, which `test` always installs).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"


def log(message: str) -> None:
    print(f"[tasks] {message}", flush=True)


def run(*args: str | Path, env: dict | None = None) -> None:
    subprocess.run([str(a) for a in args], cwd=ROOT, env=env, check=True)


def ensure_env(required_extras: tuple[str, ...] = ()) -> None:
    """Create `.venv` and install the project into it, again only when pyproject.toml changed."""
    torch_req = os.environ.get("RUGPT_TORCH", "torch==2.13.0")
    wanted_extras = ["test", *required_extras, *filter(None, os.environ.get("RUGPT_EXTRAS", "").split(","))]
    extras = ",".join(dict.fromkeys(wanted_extras))
    stamp = VENV / ".rugpt-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + torch_req.encode() + extras.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not PYTHON.exists():
        log(f"creating {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    log(f"installing {torch_req} and the project [{extras}] (first time: a few minutes)")
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    # torch first, pinned: a loose range would pull a multi-GB build that the CPU demo doesn't need.
    run(PYTHON, "-m", "pip", "install", "--quiet", torch_req)
    if "gguf" in extras.split(","):
        log("the gguf extra compiles llama.cpp from source (llama-cpp-python): about 11 minutes on 2 cores")
    # --no-binary: llama-cpp-python is always built here, never fetched as a prebuilt library.
    run(PYTHON, "-m", "pip", "install", "--quiet", "--no-binary", "llama-cpp-python", "-e", f".[{extras}]")
    stamp.write_text(wanted)


def venv_env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def demo() -> int:
    ensure_env()
    env = venv_env()
    env.setdefault("DAGSTER_HOME", str(ROOT))
    (ROOT / "storage").mkdir(exist_ok=True)
    log(f"profile {env.get('RUGPT_PROFILE', 'demo')}: materializing every asset (DAGSTER_HOME={env['DAGSTER_HOME']})")
    run(PYTHON, "-m", "rugpt_assets.materialize", *sys.argv[2:], env=env)
    host, port = env.get("RUGPT_HOST", "127.0.0.1"), env.get("RUGPT_PORT", "3000")
    log(f"serving the Dagster UI (and the daemon) at http://{host}:{port} — Ctrl+C stops it")
    server = subprocess.Popen(
        # Both code locations, CPU and GPU (workspace.yaml).
        [str(BIN / "dagster"), "dev", "-h", host, "-p", port, "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT,
        env=env,
        # A shell may start background jobs with SIGINT ignored; the server must still stop on it.
        preexec_fn=restore_default_signals if os.name == "posix" else None,
    )
    try:
        return server.wait()
    except KeyboardInterrupt:
        # Ctrl+C in a terminal reaches the server too: give it time to shut down cleanly.
        try:
            return server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.terminate()
            return server.wait()


def restore_default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test() -> int:
    ensure_env(required_extras=("gguf",))
    env = venv_env()
    # Lint and import order, formatting, then types (pyproject.toml configures them), then the tests.
    checks = (
        [BIN / "ruff", "check", "."],
        [BIN / "ruff", "format", "--check", "."],
        [BIN / "basedpyright", "--pythonpath", PYTHON],
    )
    for check in checks:
        log(f"{check[0].name} …")
        if status := subprocess.call([str(a) for a in check], cwd=ROOT, env=env):
            return status
    return subprocess.call([str(PYTHON), "-m", "pytest", *sys.argv[2:]], cwd=ROOT, env=env)


if __name__ == "__main__":
    tasks = {"demo": demo, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in tasks:
        sys.exit(__doc__)
    sys.exit(tasks[sys.argv[1]]())
