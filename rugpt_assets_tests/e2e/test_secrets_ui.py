"""A planted HF_TOKEN in `dagster dev`'s environment: a base_model run against a stand-in hub
(HF_ENDPOINT on 127.0.0.1, refusing with 401 as the hub does for a bad token) sends the token
to the hub and fails; the UI's GraphQL event log of that run, and every file of the instance,
hold no trace of it."""

from __future__ import annotations

import contextlib
import http.server
import json
import secrets
import threading
from collections.abc import Iterator

import pytest

from rugpt_assets_tests.e2e.dagster_dev import dagster_dev
from rugpt_assets_tests.e2e.test_resume import STARTUP_S, asset_job_selector, launch

RUN_STATUS = "query ($runId: ID!) { runOrError(runId: $runId) { ... on Run { status } } }"
EVENT_LOG = """
query ($runId: ID!) {
  logsForRun(runId: $runId) {
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message level }
        ... on ExecutionStepFailureEvent { error { message stack causes { message stack } } }
        ... on RunFailureEvent { error { message } }
      }
    }
  }
}
"""


@contextlib.contextmanager
def refusing_hub() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that answers every request with the hub's 401, recording Authorization."""
    authorizations: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            authorizations.append(self.headers.get("Authorization", ""))
            body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = _refuse

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", authorizations
    finally:
        server.shutdown()


@pytest.mark.e2e
def test_token_never_reaches_the_ui_event_log_or_the_instance(tmp_path):
    token = "hf_" + secrets.token_hex(16)
    home = tmp_path / "home"
    with refusing_hub() as (endpoint, authorizations):
        env = {"HF_TOKEN": token, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
        with dagster_dev(home, env, timeout_s=STARTUP_S) as server:
            run_id = launch(
                server,
                {**asset_job_selector(server, "base_model"), "assetCheckSelection": []},
                {"ops": {"base_model": {"config": {"repo": "acme/gated-model", "revision": "main"}}}},
            )

            def finished():
                status = server.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]["status"]
                return status in ("SUCCESS", "FAILURE", "CANCELED") and status

            assert server.wait_until(finished, "the base_model run to finish", timeout_s=300) == "FAILURE"
            log = json.dumps(server.graphql(EVENT_LOG, {"runId": run_id}), ensure_ascii=False)
    assert f"Bearer {token}" in authorizations, "the token was sent to the hub"
    assert "could not download model acme/gated-model@main" in log  # the failure is in the event log ...
    assert token not in log  # ... without the token
    leaks = [str(p) for p in home.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaks, f"files holding the token: {leaks}"
