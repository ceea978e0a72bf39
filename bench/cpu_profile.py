"""Where the shipper's CPU goes: a profile of one poll cycle, reproducible with one command.

    python bench/cpu_profile.py                   # 60 pipelines x 8 jobs x 50 KB logs, as bench/run.py
    python bench/cpu_profile.py --pipelines 20 --top 40
    python bench/cpu_profile.py --compare-fields 10   # what DOCUMENT_FIELDS=enriched costs over design

The simulated GitLab and the receiver run in a child process (no latency), so every CPU second measured
here is the shipper's. Printed, for the same world each time (fresh state, fresh simulator):

* startup: the CPU a new ``gitlab-log-shipper`` process spends importing before it does anything;
* the cycle's CPU run on one thread (the worker pools replaced by an inline map) and with the real
  pools at ``--concurrency``; the difference is the cost of threads taking turns at the GIL;
* a cProfile of the one-thread cycle, grouped: GitLab GETs (python-gitlab, requests, urllib3,
  http.client), the POSTs, document writing, state store, spool; then the top functions by own time.

A measurement for people working on speed, not a test.
"""

from __future__ import annotations

import argparse
import compileall
import functools
import cProfile
import multiprocessing
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import build_world, warm_up  # noqa: E402  (bench/run.py, next to this file)

from gitlab_log_shipper.config.settings import load_config, prepare_directories  # noqa: E402
from gitlab_log_shipper.shipper import Shipper  # noqa: E402


def _serve(conn: Any, pipelines: int, jobs: int, log_size: int) -> None:
    from gitlab_log_shipper.sim.gitlab import GitLabSimulator
    from gitlab_log_shipper.sim.receiver import Receiver

    world, project_ids, _ = build_world(pipelines, jobs, log_size)
    warm_up(world)
    with GitLabSimulator(world) as sim, Receiver(store_bodies=False) as receiver:
        conn.send((sim.url, world.token, project_ids[0], receiver.url))
        conn.recv()  # serve until told to stop


@contextmanager
def servers(args: argparse.Namespace) -> Iterator[tuple[str, str, int, str]]:
    """A fresh simulated GitLab and receiver in a child process (fresh rate-limit counters each time)."""
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_serve, args=(theirs, args.pipelines, args.jobs, args.log_size), daemon=True)
    child.start()
    try:
        yield ours.recv()
    finally:
        ours.send("stop")
        child.join(10)


class _Inline:
    """Stands in for a ThreadPoolExecutor: runs everything on the calling thread."""

    def map(self, fn: Any, items: Any) -> list[Any]:
        return [fn(item) for item in items]

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed over as the pool would
            future.set_exception(exc)
        return future

    def shutdown(self, **_: Any) -> None:
        pass


DOCUMENT_FIELDS = ["enriched"]  # --document-fields


def shipper_for(urls: tuple[str, str, int, str], concurrency: int, tmp: Path) -> Shipper:
    gitlab_url, token, project_id, receiver_url = urls
    state = Path(tempfile.mkdtemp(dir=tmp, prefix="state-"))
    env = {"GITLAB_URL": gitlab_url, "GITLAB_TOKEN": token, "GITLAB_PROJECTS": str(project_id),
           "API_POST_ENABLED": "true", "API_POST_URL": receiver_url, "STATE_DIR": str(state),
           "LOG_DIR": str(state / "logs"), "INITIAL_LOOKBACK": "2h", "CONCURRENCY": str(concurrency),
           "DOCUMENT_FIELDS": DOCUMENT_FIELDS[0]}
    (tmp / "empty.env").touch()
    config = load_config(tmp / "empty.env", env)
    prepare_directories(config)
    return Shipper(config)


def one_cycle(shipper: Shipper, *, inline: bool, profile: cProfile.Profile | None = None) -> tuple[float, float, str]:
    if inline:  # the bench's only reach into the shipper's insides: its three pools
        shipper._project_pool = shipper._pipeline_pool = shipper._trace_pool = _Inline()  # type: ignore[assignment]
    cpu, wall = time.process_time(), time.perf_counter()
    if profile:
        profile.enable()
    report = shipper.run_cycle()
    if profile:
        profile.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    shipper.close()
    return cpu, wall, report.summary()


def startup_cpu() -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import gitlab_log_shipper.cli"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


GROUPS = [
    ("GitLab GETs: python-gitlab -> requests -> urllib3 -> http.client", "gitlab/client.py", "http_request"),
    ("  requests: preparing each request (merging settings, URL, headers)", "requests/sessions.py", "prepare_request"),
    ("  http.client: reading status line and headers (email parser)", "http/client.py", "begin"),
    ("POSTs to the receiver (requests, body streamed from the spool)", "gitlab_log_shipper/delivery/poster.py", "post_file"),
    ("document writing (JSON, logs escaped from the spool)", "gitlab_log_shipper/document/payload.py", "write_document"),
    ("spool cleanup", "shutil.py", "rmtree"),
]
STATE_CALLS = ("seen", "mark_handled", "record_shipped", "get_cursor", "set_cursor", "prune")


def report_profile(profile: cProfile.Profile, top: int) -> None:
    stats = pstats.Stats(profile)
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = max(entry[3] for entry in entries.values())

    def cumulative(path: str, name: str) -> float:
        return sum(entry[3] for (file, _, func), entry in entries.items() if file.endswith(path) and func == name)

    print(f"\nprofile of the one-thread cycle (cProfile, {total:.2f} s with its overhead):")
    for label, path, name in GROUPS:
        spent = cumulative(path, name)
        print(f"  {spent / total * 100:5.1f}%  {label}")
    state = sum(cumulative("gitlab_log_shipper/state/store.py", name) for name in STATE_CALLS)
    print(f"  {state / total * 100:5.1f}%  state store (SQLite)")
    print(f"\ntop {top} functions by own time:")
    stats.sort_stats("tottime").print_stats(top)


class _Attributed:
    """CPU (``time.thread_time``) spent inside the wrapped functions: the part of a cycle that belongs to them,
    measured in the cycle itself and far less noisy than the difference of two whole cycles."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = threading.local()

    def wrap(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            started = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
                if depth == 0:
                    self.seconds += time.thread_time() - started
        return timed


def compare_fields(args: argparse.Namespace, tmp: Path) -> None:
    """``--compare-fields N``: N alternated one-thread cycles with each DOCUMENT_FIELDS setting. Prints the cycles'
    CPU (medians, and the median of the paired differences) and the CPU attributed to what only the enriched
    document does: the section scanner, and the document writing's extra over the design's."""
    import gitlab_log_shipper.shipper as shipper_module
    from gitlab_log_shipper.document.sections import LogScanner

    scanner, writing = _Attributed(), _Attributed()
    for name in ("feed", "finish", "restart"):
        setattr(LogScanner, name, scanner.wrap(getattr(LogScanner, name)))
    shipper_module.write_document = writing.wrap(shipper_module.write_document)  # type: ignore[attr-defined]
    cycles: dict[str, list[float]] = {"enriched": [], "design": []}
    scanning: list[float] = []
    writes: dict[str, list[float]] = {"enriched": [], "design": []}
    for _ in range(args.compare_fields):
        for fields in ("design", "enriched"):
            DOCUMENT_FIELDS[0] = fields
            scanner.seconds = writing.seconds = 0.0
            with servers(args) as urls:
                cpu, _, _ = one_cycle(shipper_for(urls, 1, tmp), inline=True)
            cycles[fields].append(cpu)
            writes[fields].append(writing.seconds)
            if fields == "enriched":
                scanning.append(scanner.seconds)
    med = statistics.median
    design, enriched = med(cycles["design"]), med(cycles["enriched"])
    paired = med([e - d for e, d in zip(cycles["enriched"], cycles["design"])])
    extra = med(scanning) + max(0.0, med(writes["enriched"]) - med(writes["design"]))
    print(f"document fields, {args.compare_fields} alternated one-thread cycles each (imports excluded):")
    print(f"  cycle CPU, median: design {design:.3f} s, enriched {enriched:.3f} s ({100 * (enriched / design - 1):+.1f} %); "
          f"median of the paired differences {paired:+.3f} s ({100 * paired / design:+.1f} %)")
    print(f"  attributed to the enriched document: section scanner {med(scanning):.3f} s, document writing "
          f"{med(writes['enriched']):.3f} s against {med(writes['design']):.3f} s; together {extra:.3f} s = "
          f"{100 * extra / design:+.1f} % of the design cycle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--log-size", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--document-fields", choices=("enriched", "design"), default="enriched")
    parser.add_argument("--compare-fields", type=int, default=0, metavar="N",
                        help="only compare DOCUMENT_FIELDS=enriched with design over N alternated cycles each")
    args = parser.parse_args()
    if args.compare_fields:
        compileall.compile_dir(HERE.parent / "gitlab_log_shipper", quiet=1)
        with tempfile.TemporaryDirectory(prefix="gls-profile-") as tmp_name:
            compare_fields(args, Path(tmp_name))
        return 0
    DOCUMENT_FIELDS[0] = args.document_fields
    compileall.compile_dir(HERE.parent / "gitlab_log_shipper", quiet=1)  # as pip would have

    print(f"{args.pipelines} pipelines x {args.jobs} jobs x {args.log_size} B logs, no latency; "
          "CPU of the shipper only (GitLab and the receiver run in another process)")
    print(f"  startup (imports)                 {startup_cpu():6.2f} s CPU")
    with tempfile.TemporaryDirectory(prefix="gls-profile-") as tmp_name:
        tmp = Path(tmp_name)
        with servers(args) as urls:
            cpu, wall, summary = one_cycle(shipper_for(urls, 1, tmp), inline=True)
        print(f"  one cycle, one thread             {cpu:6.2f} s CPU in {wall:.2f} s ({summary})")
        with servers(args) as urls:
            threaded, wall, summary = one_cycle(shipper_for(urls, args.concurrency, tmp), inline=False)
        print(f"  one cycle, CONCURRENCY={args.concurrency:<3}        {threaded:6.2f} s CPU in {wall:.2f} s ({summary}); "
              f"threads cost {(threaded / cpu - 1) * 100:+.0f}% CPU")
        profile = cProfile.Profile()
        with servers(args) as urls:
            one_cycle(shipper_for(urls, 1, tmp), inline=True, profile=profile)
        report_profile(profile, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
