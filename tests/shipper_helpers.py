"""Helpers for tests that run the real CLI against the GitLab simulator and the receiver over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import jsonschema
import pytest
from click.testing import CliRunner, Result

from gitlab_log_shipper.cli import main
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs" / "payload.schema.json").read_text("utf-8"))
jsonschema.Draft202012Validator.check_schema(SCHEMA)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
API_TOKEN = "receiver-token-7f3a9c"


@dataclass
class Env:
    """A shipper configuration pointing at the simulator and the receiver, with its folders in tmp."""

    tmp: Path
    values: dict[str, str]

    @property
    def output(self) -> Path:
        return Path(self.values["LOG_OUTPUT_DIR"])

    @property
    def requests_log(self) -> Path:
        return Path(self.values["LOG_DIR"]) / "api-requests.log"

    def request_lines(self) -> list[str]:
        return self.requests_log.read_text("utf-8").splitlines() if self.requests_log.exists() else []

    def invoke(self, *args: str, **overrides: str) -> Result:
        """Run ``gitlab-log-shipper ARGS`` in-process (exceptions propagate: a traceback fails the test)."""
        env_file = self.tmp / "empty.env"
        env_file.touch()
        runner = CliRunner()
        return runner.invoke(main, ["--env-file", str(env_file), *args], env={**self.values, **overrides},
                             catch_exceptions=False)


def start_daemon(env: Env, **extra_env: str) -> "subprocess.Popen[str]":
    """``gitlab-log-shipper run`` as a real process (signals, locks and kill -9 need one)."""
    (env.tmp / "empty.env").touch()
    return subprocess.Popen(
        [sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(env.tmp / "empty.env"), "run"],
        env={**os.environ, **env.values, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def stop_daemon(proc: "subprocess.Popen[str]", timeout: float = 15) -> tuple[int, str]:
    """SIGTERM (unless it already ended), then its exit code and everything it printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise
    return proc.returncode, output


def make_env(tmp: Path, sim: GitLabSimulator, receiver: Receiver | None, **overrides: str) -> Env:
    tmp.mkdir(parents=True, exist_ok=True)
    values = {
        "GITLAB_URL": sim.url,
        "GITLAB_TOKEN": sim.world.token,
        "STATE_DIR": str(tmp / "state"),
        "LOG_DIR": str(tmp / "logs"),
        "LOG_OUTPUT_DIR": str(tmp / "logs" / "pipeline-logs"),
        "RETRY_DELAY": "0",
        "POLL_INTERVAL": "1",
        "INITIAL_LOOKBACK": "1d",
        "GITLAB_TIMEOUT": "10",
        "API_POST_TIMEOUT": "10",
        # The suite's request counts and listing tests are REST's; GraphQL detection has tests of its own (and the
        # whole suite can be run with it: TEST_GITLAB_API=graphql or auto).
        "GITLAB_API": os.environ.get("TEST_GITLAB_API", "rest"),
    }
    if receiver is not None:
        values.update({"API_POST_ENABLED": "true", "API_POST_URL": receiver.url, "API_POST_AUTH_TOKEN": API_TOKEN})
    values.update(overrides)
    return Env(tmp, values)


def documents(receiver: Receiver) -> list[dict[str, Any]]:
    """Every accepted document, each validated against the shipped JSON Schema."""
    docs = []
    for request in receiver.accepted():
        doc = request.json()
        VALIDATOR.validate(doc)
        docs.append(doc)
    return docs


def by_pipeline(docs: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {doc["pipeline_id"]: doc for doc in docs}


class ManualClock:
    """A clock tests move by hand (``advance(90)`` or ``advance(minutes=2)``); safe to read from worker threads."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float = 0.0, **delta: float) -> datetime:
        with self._lock:
            self.now += timedelta(seconds=seconds, **delta)
            return self.now


def within(seconds: float, fn: Callable[[], Any], what: str = "") -> Any:
    """``fn()``'s result, or the exception it raised, returned; fails the test instead of hanging it when ``fn``
    takes longer than ``seconds``."""
    import pytest

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s{': ' + what if what else ''}")
    return outcome.get("error", outcome.get("value"))


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 20 ms; fail the test with ``what`` when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
