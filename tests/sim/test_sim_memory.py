"""A 200 MB trace streams from the simulator in flat memory.

The simulator runs in its own process (started through the CLI, as scripts use it) so its memory can be
read from ``/proc/PID/status`` without the test's own buffers in the figure. ``VmHWM`` is the peak
resident size: if serving the trace built the log in memory it would jump by 200 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gitlab_log_shipper.sim.logs import LogSpec

from repo_paths import REPO_ROOT

SIZE = 200 * 1024 * 1024
SPEC = {"size": SIZE, "seed": 7, "invalid_utf8": True}
MAX_GROWTH_KB = 30 * 1024

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS (now) of a process, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0])
    return values


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    scenario = {"projects": [{"path": "big", "pipelines": [{"jobs": [{"name": "huge", "log": SPEC}]}]}]}
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gitlab_log_shipper.sim", "gitlab", "--port", "0", "--scenario", str(path)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        env = {}
        while len(env) < 2:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line, f"simulator exited early: {proc.stderr.read() if proc.stderr else ''}"
            key, _, value = line.strip().partition("=")
            env[key] = value
        yield proc, env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_200_mb_trace_streams_in_flat_memory(sim_process: tuple[subprocess.Popen[str], dict[str, str]]) -> None:
    proc, env = sim_process
    session = requests.Session()
    session.headers["PRIVATE-TOKEN"] = env["GITLAB_TOKEN"]
    api = f"{env['GITLAB_URL']}/api/v4"
    (project,) = session.get(f"{api}/projects", timeout=10).json()
    (pipeline,) = session.get(f"{api}/projects/{project['id']}/pipelines", timeout=10).json()
    (job,) = session.get(f"{api}/projects/{project['id']}/pipelines/{pipeline['id']}/jobs", timeout=10).json()
    assert job["artifacts"][0]["size"] == SIZE  # the size is visible before downloading
    before = memory_kb(proc.pid)

    digest = hashlib.sha256()
    received = 0
    with session.get(f"{api}/projects/{project['id']}/jobs/{job['id']}/trace", stream=True, timeout=30) as r:
        assert r.status_code == 200 and r.headers["Content-Length"] == str(SIZE)
        for chunk in r.iter_content(chunk_size=1024 * 1024):
            digest.update(chunk)
            received += len(chunk)
    after = memory_kb(proc.pid)

    assert received == SIZE
    assert digest.hexdigest() == LogSpec(**SPEC).sha256()  # type: ignore[arg-type]
    growth = after["VmHWM"] - before["VmHWM"]
    assert growth < MAX_GROWTH_KB, f"peak RSS grew by {growth} kB while streaming ({before} -> {after})"
    assert after["VmRSS"] - before["VmRSS"] < MAX_GROWTH_KB
