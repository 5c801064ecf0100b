"""Start `dagster dev` (webserver + daemon) on a temporary DAGSTER_HOME for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

PROJECT_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
BACKFILL_STATUS = """
query ($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
}"""
UNFINISHED_BACKFILL = {"REQUESTED", "CANCELING", "FAILING"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt(process: subprocess.Popen) -> None:
    """Ctrl+C to a server started in a session of its own; its whole group killed if it has not
    ended within 30 s."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class DagsterDev:
    url: str
    home: Path
    log_path: Path
    pid: int  # of `dagster dev`, which leads its own process group

    def crash(self) -> None:
        """SIGKILL every process of this `dagster dev` (webserver, daemon, code server, run
        workers and what they started), as a power cut or the OOM killer would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def backfill(self, params: dict, timeout_s: float) -> tuple[str, str]:
        """Launch an asset backfill (`launchPartitionBackfill`, as the UI does) and wait for it to
        end; return its id and final status."""
        launched = self.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]

        def finished_status() -> str | None:
            status = self.graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]["status"]
            return None if status in UNFINISHED_BACKFILL else status

        return backfill_id, self.wait_until(finished_status, f"backfill {backfill_id} to finish", timeout_s)

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_until(self, check: Callable[[], T | None], what: str, timeout_s: float, poll_s: float = 3) -> T:
        """Poll `check` until it returns something truthy; fail naming `what`, with the server log."""
        deadline = time.monotonic() + timeout_s
        while not (result := check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.log_tail()}")
            time.sleep(poll_s)
        return result


def _start_new_session_with_default_signals() -> None:
    # A test runner may ignore SIGINT; dagster dev needs it to shut its children down cleanly.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setsid()


@contextlib.contextmanager
def dagster_dev(home: Path, env: dict[str, str] | None = None, timeout_s: float = 120) -> Iterator[DagsterDev]:
    """`dagster dev` with the project's dagster.yaml in `home` (also its cwd) and both code
    locations of workspace.yaml; stopped on exit."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    log_path = home / "dagster-dev.log"
    full_env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RUGPT_STORAGE_DIR": str(home / "storage" / "artifacts"),
        **(env or {}),
    }
    bin_dir = Path(sys.executable).parent
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(bin_dir / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(PROJECT_ROOT / "workspace.yaml")],
            cwd=home,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_start_new_session_with_default_signals,
        )
    server = DagsterDev(url=f"http://127.0.0.1:{port}", home=home, log_path=log_path, pid=process.pid)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/server_info", timeout=2):
                    break
            except OSError as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dagster dev did not come up:\n{server.log_tail()}") from exc
                time.sleep(1)
        yield server
    finally:
        interrupt(process)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers: code server, daemon
