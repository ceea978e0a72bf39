"""systemd integration: the sd_notify messages of a real daemon against a fake notify socket, the
watchdog policy for a wedged cycle, and `systemd-analyze verify` on the shipped unit."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.service.notify import Notifier
from gitlab_log_shipper.service.supervision import Supervision
from gitlab_log_shipper.shipper import CycleReport, Shipper
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from repo_paths import REPO_ROOT
from shipper_helpers import documents, make_env

UNIT = REPO_ROOT / "packaging" / "systemd" / "gitlab-log-shipper.service"


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; records every message."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode("utf-8"))
            except (socket.timeout, OSError):
                continue

    def assignments(self) -> list[str]:
        return [line for message in list(self.messages) for line in message.split("\n")]

    def wait_for(self, predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.assignments()):
                return
            time.sleep(0.05)
        raise AssertionError(f"not seen in time; messages: {self.messages}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    listener = NotifySocket(f"@gls-test-{uuid.uuid4().hex}")  # abstract: no path length or cleanup worries
    yield listener
    listener.close()


def test_notifier_reads_systemds_environment(tmp_path: Path) -> None:
    assert not Notifier.from_environ({}).enabled
    assert Notifier.from_environ({}).send("READY=1") is False
    path = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "30000000"}, pid=42)
    assert path.enabled and path.watchdog_interval == 15.0
    assert Notifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"},
                                 pid=42).watchdog_interval is None  # the keep-alives are someone else's job
    assert Notifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"},
                                 pid=42).watchdog_interval == 15.0
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1"}).enabled
    listener = NotifySocket(str(tmp_path / "notify.sock"))  # a path socket, as systemd uses
    try:
        notifier = Notifier(listener.address)
        assert notifier.ready("line one\nline two")
        assert Notifier(str(tmp_path / "missing.sock")).watchdog() is False  # never raises
        listener.wait_for(lambda a: "STATUS=line one line two" in a)
        assert listener.messages == ["READY=1\nSTATUS=line one line two"]
    finally:
        listener.close()


def test_daemon_notifies_ready_status_watchdog_and_stopping(
    tmp_path: Path, world: World, gitlab_sim: GitLabSimulator, receiver: Receiver, notify_socket: NotifySocket
) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    metrics = tmp_path / "textfile" / "gitlab_log_shipper.prom"
    metrics.parent.mkdir()
    env = make_env(tmp_path, gitlab_sim, receiver, POLL_INTERVAL="1", METRICS_TEXTFILE=str(metrics))
    (tmp_path / "empty.env").touch()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gitlab_log_shipper", "--env-file", str(tmp_path / "empty.env"), "run"],
        env={**os.environ, **env.values, "NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "2000000"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        notify_socket.wait_for(lambda a: any(re.match(r"STATUS=last cycle .* shipped=1", x) for x in a))
        notify_socket.wait_for(lambda a: a.count("WATCHDOG=1") >= 2)  # every second
        receiver.wait_for(1)
        assert metrics.is_file()
        # while it runs, `status` names the daemon's pid (from /proc/locks; the lock is not touched)
        status = env.invoke("status")
        assert f"daemon:        running (pid {proc.pid})" in status.output
        proc.send_signal(15)
        notify_socket.wait_for(lambda a: "STOPPING=1" in a)
        output, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assignments = notify_socket.assignments()
    assert notify_socket.messages[0] == "READY=1\nSTATUS=started; first poll cycle running"
    assert assignments.index("READY=1") < assignments.index("WATCHDOG=1")
    assert any(x.startswith("STATUS=poll cycle running since") for x in assignments)
    assert "STOPPING=1" in assignments
    assert len(documents(receiver)) == 1


class _FakeSource:
    rate_limit_remaining = None

    def __init__(self) -> None:
        import requests

        self.gl = type("GL", (), {"session": requests.Session()})()

    def close(self) -> None:
        pass


def test_watchdog_stops_only_when_a_cycle_makes_no_progress(tmp_path: Path) -> None:
    config = load_config(None, {"GITLAB_URL": "https://g.example.com", "GITLAB_TOKEN": "glpat-0123456789",
                                "STATE_DIR": str(tmp_path / "state"), "LOG_DIR": str(tmp_path / "logs")})
    shipper = Shipper(config, source=_FakeSource())  # type: ignore[arg-type]
    sent: list[str] = []

    class Recorder(Notifier):
        def send(self, *assignments: str) -> bool:
            sent.extend(assignments)
            return True

    now = [1000.0]
    ops = Supervision(config, shipper, Recorder("@x", 10_000_000), monotonic=lambda: now[0], stall_limit=60)
    ops.ready()

    def advance(seconds: float) -> int:
        before = sent.count("WATCHDOG=1")
        for _ in range(int(seconds)):
            now[0] += 1
            ops.tick()
        return sent.count("WATCHDOG=1") - before

    assert advance(20) == 4  # idle between cycles: every 5 s (half of WATCHDOG_USEC)
    ops.cycle_started()
    assert advance(50) == 10  # a long cycle is fine while young...
    ops._on_response(None)  # ...and every answer from GitLab or the receiver is progress
    assert advance(55) == 11
    assert advance(100) == 0  # then 60 s without any answer: the keep-alives stop
    logging.getLogger("gitlab_log_shipper.test").error("from the main thread: not the cycle's progress")
    assert advance(10) == 0
    worker = threading.Thread(target=lambda: logging.getLogger("gitlab_log_shipper.test").error("project 1: 502"))
    worker.start()
    worker.join()
    assert advance(10) == 2  # a line logged by the cycle (a project that failed) is progress: not wedged
    ops.cycle_finished(CycleReport())
    assert advance(10) == 2  # a cycle that ends (even late) restores them
    shipper.stop.set()
    ops.tick()
    assert sent.count("STOPPING=1") == 1 and advance(10) == 0
    shipper.close()
    for handler in list(logging.getLogger().handlers):
        if type(handler).__name__ == "_LogProgress":
            logging.getLogger().removeHandler(handler)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text("utf-8")
    assert "Type=notify" in text and "WatchdogSec=" in text and "NotifyAccess=main" in text
    assert "RestartPreventExitStatus=2" in text and "Restart=on-failure" in text
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
                      "StateDirectory=gitlab-log-shipper", "LogsDirectory=gitlab-log-shipper",
                      "User=gitlab-log-shipper", "CapabilityBoundingSet=", "SystemCallFilter=@system-service"):
        assert hardening in text, hardening
    # The unit runs /opt/gitlab-log-shipper/bin/gitlab-log-shipper; verify checks that ExecStart exists, so
    # point it at this checkout's executable and check everything else as written.
    executable = shutil.which("gitlab-log-shipper") or str(Path(sys.executable).parent / "gitlab-log-shipper")
    unit = tmp_path / "gitlab-log-shipper.service"
    unit.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={executable}", text), "utf-8")
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
