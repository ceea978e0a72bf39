"""Run the simulators as standalone servers: ``python -m gitlab_log_shipper.sim gitlab|receiver``.

``gitlab`` serves a simulated GitLab and prints, one per line, ``GITLAB_URL=http://127.0.0.1:PORT`` and
``GITLAB_TOKEN=...`` (``eval``-able by a shell script), then serves until SIGTERM or SIGINT (exit 0).
``--print-env`` adds what a shipper needs to find the data: ``GITLAB_GROUPS`` (the top-level groups;
or ``GITLAB_PROJECTS`` when there are no groups) and ``SIM_EXPECTED_PIPELINES``, the number of
pipelines the shipper ships: finished (success, failed, canceled, skipped) or blocked on a manual job
(``manual``, which GitLab's ``scope=finished`` leaves out), child pipelines included. The world comes from ``--scenario FILE.json`` or is generated (below).

``receiver`` serves the recording log-analysis API and prints ``API_POST_URL=...`` (and
``API_POST_AUTH_TOKEN=...`` with ``--token``).

Generated world (``--projects N --pipelines N --jobs J --log-size BYTES --seed S``): a group
``sim-group`` with a subgroup ``sim-group/backend``; N projects alternating between them; per project N
finished pipelines created within the last 30 minutes, each with J jobs over the stages build, test,
deploy: the first test job was retried (a failed first attempt hidden without ``include_retried``), the
last job (with J >= 3) is a manual job that never ran, every fourth pipeline failed; the newest
pipeline of each project triggered a child pipeline. Every job that ran has a ``LogSpec`` log of
``--log-size`` bytes. The same options always give the same world (ids, shas, logs), apart from times.

Scenario file (JSON; every key but ``projects[].path`` optional)::

    {
      "token": "glpat-...",
      "users": [{"username": "alice", "name": "Alice", "public_email": "alice@example.com"}],
      "groups": [{"path": "acme", "name": "ACME"},
                 {"path": "platform", "parent": "acme"}],          # parent: a full path listed before
      "projects": [{
        "path": "app", "name": "App", "group": "acme/platform",    # no group: the user's namespace
        "shared_with": ["acme"], "member": true,
        "pipelines": [{
          "status": "success", "source": "push", "ref": "main", "sha": "…40 hex…", "name": null,
          "user": "alice", "author_email": "alice@example.com",
          "created_at": "2026-10-01T10:00:00Z",  "finished_at": "2026-10-01T10:04:00Z",
          "created_ago": 600, "finished_ago": 60,                  # seconds before start-up, instead
          "jobs": [{"name": "build", "stage": "build", "status": "success", "allow_failure": false,
                    "log": "plain text" | {"size": 1048576, "seed": 1, "ansi": true, "sections": true,
                                           "invalid_utf8": false, "timestamps": false},
                    "retries": [{"status": "success", "log": "..."}]}],   # newer attempts, in order
          "bridges": [{"name": "deploy-elsewhere", "stage": "deploy", "status": "failed"}],
          "children": [{"bridge_name": "trigger-child", "stage": "child", "status": "success",
                        "jobs": [ ...as above... ]}]
        }]
      }]
    }
"""

from __future__ import annotations

import json
import random
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from .gitlab import Faults, GitLabSimulator
from .logs import Log, LogSpec
from .world import FINISHED_STATUSES, JobSpec, Pipeline, World

__all__ = ["build_world", "generate_world", "main"]


# -- worlds ---------------------------------------------------------------------------------------


class ScenarioError(ValueError):
    """The scenario file does not describe a valid world; the message says where."""


def _log(value: Any, where: str) -> Log:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        try:
            return LogSpec(**value)
        except TypeError as exc:
            raise ScenarioError(f"{where}.log: {exc}") from exc
    raise ScenarioError(f"{where}.log: expected a string or an object, got {type(value).__name__}")


def _when(spec: dict[str, Any], key: str, now: datetime, where: str) -> datetime | None:
    if spec.get(key) is not None:
        text = str(spec[key])
        try:
            return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError as exc:
            raise ScenarioError(f"{where}.{key}: not an ISO 8601 time: {text!r}") from exc
    ago = key.replace("_at", "_ago")
    if spec.get(ago) is not None:
        return now - timedelta(seconds=float(spec[ago]))
    return None


def _job_specs(items: Sequence[dict[str, Any]], where: str) -> list[JobSpec]:
    specs = []
    for i, item in enumerate(items):
        if "name" not in item:
            raise ScenarioError(f"{where}.jobs[{i}]: a job needs a name")
        specs.append(JobSpec(
            name=item["name"],
            stage=item.get("stage", "test"),
            status=item.get("status", "success"),
            log=_log(item.get("log"), f"{where}.jobs[{i}]"),
            allow_failure=item.get("allow_failure"),
        ))
    return specs


def _add_retries(world: World, pipeline: Pipeline, items: Sequence[dict[str, Any]], where: str) -> None:
    """Create the newer attempts listed under each job's ``retries`` (after the pipeline's jobs, so
    they get higher ids, as retries do)."""
    by_name = {world.jobs[j].name: world.jobs[j] for j in pipeline.job_ids}
    for i, item in enumerate(items):
        previous = by_name[item["name"]]
        for k, retry in enumerate(item.get("retries", ())):
            previous = world.add_job(
                pipeline.id, previous.name, previous.stage, retry.get("status", "success"),
                _log(retry.get("log"), f"{where}.jobs[{i}].retries[{k}]"), retried_from=previous.id,
            )


def build_world(scenario: dict[str, Any], clock: Callable[[], datetime] | None = None) -> World:
    """A World from a scenario (format in this module's docstring)."""
    world = World(token=scenario["token"], clock=clock) if scenario.get("token") else World(clock=clock)
    now = world.now()
    users = {world.current_user["username"]: world.current_user}
    for u in scenario.get("users", ()):
        users[u["username"]] = world.add_user(u["username"], u.get("name"), u.get("public_email", ""))
    groups: dict[str, int] = {}
    for i, g in enumerate(scenario.get("groups", ())):
        parent = g.get("parent")
        if parent is not None and parent not in groups:
            raise ScenarioError(f"groups[{i}]: parent {parent!r} is not a group listed before it")
        group = world.add_group(g["path"], g.get("name"), groups[parent] if parent else None)
        groups[group.full_path] = group.id
    for i, p in enumerate(scenario.get("projects", ())):
        where = f"projects[{i}]"
        if "path" not in p:
            raise ScenarioError(f"{where}: a project needs a path")
        for ref in [p.get("group"), *p.get("shared_with", ())]:
            if ref is not None and ref not in groups:
                raise ScenarioError(f"{where}: unknown group {ref!r}")
        project = world.add_project(
            p["path"], p.get("name"), groups[p["group"]] if p.get("group") else None,
            [groups[g] for g in p.get("shared_with", ())], p.get("member", True),
        )
        for k, spec in enumerate(p.get("pipelines", ())):
            pwhere = f"{where}.pipelines[{k}]"
            username = spec.get("user")
            if username is not None and username not in users:
                raise ScenarioError(f"{pwhere}.user: unknown user {username!r}")
            try:
                pipeline = world.add_pipeline(
                    project.id,
                    status=spec.get("status", "success"),
                    source=spec.get("source", "push"),
                    ref=spec.get("ref", "main"),
                    sha=spec.get("sha"),
                    user=users[username] if username else None,
                    author_email=spec.get("author_email", "author@example.com"),
                    created_at=_when(spec, "created_at", now, pwhere),
                    finished_at=_when(spec, "finished_at", now, pwhere),
                    jobs=_job_specs(spec.get("jobs", ()), pwhere),
                    name=spec.get("name"),
                )
                _add_retries(world, pipeline, spec.get("jobs", ()), pwhere)
                for b in spec.get("bridges", ()):
                    world.add_bridge(pipeline.id, b["name"], b.get("stage", "child"), None, b.get("status", "success"))
                for c, child in enumerate(spec.get("children", ())):
                    cwhere = f"{pwhere}.children[{c}]"
                    created = world.add_child_pipeline(
                        pipeline.id,
                        bridge_name=child.get("bridge_name", "trigger-child"),
                        stage=child.get("stage", "child"),
                        status=child.get("status", "success"),
                        jobs=_job_specs(child.get("jobs", ()), cwhere),
                    )
                    _add_retries(world, created, child.get("jobs", ()), cwhere)
            except (KeyError, ValueError) as exc:
                if isinstance(exc, ScenarioError):
                    raise
                raise ScenarioError(f"{pwhere}: {exc}") from exc
    return world


def generate_world(
    projects: int = 2,
    pipelines: int = 3,
    jobs: int = 4,
    log_size: int = 4096,
    seed: int = 0,
    token: str | None = None,
    clock: Callable[[], datetime] | None = None,
) -> World:
    """A deterministic world of ``projects`` × ``pipelines`` finished pipelines × ``jobs`` jobs
    (see the module docstring for its shape)."""
    world = World(token=token, clock=clock) if token else World(clock=clock)
    rng = random.Random(seed)
    now = world.now()
    top = world.add_group("sim-group", "Sim Group")
    sub = world.add_group("backend", "Backend", parent_id=top.id)
    log_seed = seed * 1_000_003
    for i in range(projects):
        project = world.add_project(f"project-{i}", f"Project {i}", group_id=top.id if i % 2 == 0 else sub.id)
        step = timedelta(minutes=25) / max(1, pipelines)
        newest: Pipeline | None = None
        for k in range(pipelines):
            created = now - timedelta(minutes=29) + step * k + timedelta(seconds=(i % 30) * 5 + rng.random())
            finished = min(created + timedelta(seconds=60 + rng.randint(0, 120)), now - timedelta(seconds=1))
            failed = (i * pipelines + k) % 4 == 3
            specs: list[JobSpec] = []
            for j in range(jobs):
                if j == 0:
                    name, stage = "build", "build"
                elif j == jobs - 1 and jobs >= 3:
                    specs.append(JobSpec("deploy-production", "deploy", "manual"))
                    continue
                else:
                    name, stage = f"test-{j}", "test"
                status = "failed" if failed and j == jobs - 2 and j > 0 else "success"
                log_seed += 1
                specs.append(JobSpec(name, stage, status, LogSpec(log_size, seed=log_seed)))
            pipeline = world.add_pipeline(
                project.id, status="failed" if any(s.status == "failed" for s in specs) else "success",
                created_at=created, finished_at=finished, jobs=specs,
                ref="main" if k % 3 else f"feature-{k}", author_email=f"dev{(i + k) % 5}@example.com",
            )
            first_test = next((world.jobs[j] for j in pipeline.job_ids if world.jobs[j].stage == "test"), None)
            if first_test is not None and first_test.status == "success":
                _make_retried(world, pipeline, first_test)
            newest = pipeline
        if newest is not None:
            log_seed += 1
            child_job = JobSpec("child-test", "test", "success", LogSpec(log_size, seed=log_seed))
            world.add_child_pipeline(newest.id, jobs=[child_job])
    return world


def _make_retried(world: World, pipeline: Pipeline, job: Any) -> None:
    """Turn ``job`` into a retried failure followed by a successful new attempt, both inside the
    pipeline's run (the retry happened before the pipeline finished)."""
    with world.lock:
        job.status = "failed"
        job.failure_reason = "script_failure"
        retry = world.add_job(pipeline.id, job.name, job.stage, "success", job.log, retried_from=job.id)
        assert job.finished_at is not None and pipeline.finished_at is not None
        retry.created_at = job.finished_at
        retry.started_at = job.finished_at + timedelta(milliseconds=300)
        retry.finished_at = max(retry.started_at, pipeline.finished_at - timedelta(milliseconds=5))
        retry.queued_duration = 0.3
        if isinstance(job.log, LogSpec):
            retry.log = LogSpec(job.log.size, seed=job.log.seed + 500_000)


# -- CLI ------------------------------------------------------------------------------------------


def _serve_until_signalled(stop: Callable[[], None]) -> None:
    """Block until SIGTERM or SIGINT, then stop the server; the process then exits 0."""
    done = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not done.wait(0.5):
        pass
    stop()


def _emit(name: str, value: str) -> None:
    click.echo(f"{name}={shlex.quote(value)}")


@click.group()
def main() -> None:
    """Standalone simulators for trying the shipper end to end."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=0, show_default=True, help="Port to bind; 0 picks a free one.")
@click.option("--token", default=None, help="The valid PRIVATE-TOKEN (default: the world's).")
@click.option("--scenario", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON world description (format: see the module docstring).")
@click.option("--projects", type=click.IntRange(min=0), default=None, help="Generated world: projects [2].")
@click.option("--pipelines", type=click.IntRange(min=0), default=None, help="Generated world: pipelines per project [3].")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Generated world: jobs per pipeline [4].")
@click.option("--log-size", type=click.IntRange(min=0), default=None, help="Generated world: bytes per job log [4096].")
@click.option("--seed", type=int, default=None, help="Generated world: seed [0].")
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, help="Seconds added to every request.")
@click.option("--error-rate", type=click.FloatRange(0, 1), default=0.0, help="Share of requests answered 5xx.")
@click.option("--error-statuses", default="500,502,503", show_default=True, help="Statuses for --error-rate.")
@click.option("--rate-limit", type=click.IntRange(min=1), default=None, help="Requests per window, then 429.")
@click.option("--rate-limit-window", type=click.FloatRange(min=0.001), default=60.0, show_default=True,
              help="Seconds per rate-limit window.")
@click.option("--bare-429", is_flag=True, help="Send 429 without Retry-After / RateLimit-* headers.")
@click.option("--drop-trace-after", type=click.IntRange(min=0), default=None,
              help="Hang up after this many bytes of a trace (once per job).")
@click.option("--print-env", is_flag=True, help="Also print GITLAB_GROUPS/GITLAB_PROJECTS and SIM_EXPECTED_PIPELINES.")
@click.option("--gitlab-version", default=None, help="The version GitLab reports (/version, GraphQL metadata); "
              "before 17.0 child pipelines cannot be listed [19.5.0-pre].")
@click.option("--no-graphql", is_flag=True, help="Answer 404 on /api/graphql, as a GitLab without GraphQL.")
def gitlab(
    host: str, port: int, token: str | None, scenario: Path | None, projects: int | None, pipelines: int | None,
    jobs: int | None, log_size: int | None, seed: int | None, latency: float, error_rate: float,
    error_statuses: str, rate_limit: int | None, rate_limit_window: float, bare_429: bool,
    drop_trace_after: int | None, print_env: bool, gitlab_version: str | None, no_graphql: bool,
) -> None:
    """Serve a simulated GitLab until SIGTERM/SIGINT."""
    generator = {"projects": projects, "pipelines": pipelines, "jobs": jobs, "log_size": log_size, "seed": seed}
    if scenario is not None:
        if any(v is not None for v in generator.values()):
            raise click.UsageError("--scenario cannot be combined with the generator options")
        try:
            data = json.loads(scenario.read_text(encoding="utf-8"))
            world = build_world(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise click.BadParameter(f"{scenario}: {exc}", param_hint="--scenario") from exc
    else:
        defaults = {"projects": 2, "pipelines": 3, "jobs": 4, "log_size": 4096, "seed": 0}
        world = generate_world(**{k: v if v is not None else defaults[k] for k, v in generator.items()})
    if token:
        world.token = token
    if gitlab_version:
        world.gitlab_version = gitlab_version
    try:
        statuses = tuple(int(s) for s in error_statuses.split(",") if s.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{error_statuses!r} is not a comma list of statuses",
                                 param_hint="--error-statuses") from exc
    faults = Faults(latency=latency, error_rate=error_rate, error_statuses=statuses, rate_limit=rate_limit,
                    rate_limit_window=rate_limit_window, bare_429=bare_429, drop_trace_after=drop_trace_after)
    sim = GitLabSimulator(world, host=host, port=port, faults=faults).start()
    sim.graphql.faults.disabled = no_graphql
    _emit("GITLAB_URL", sim.url)
    _emit("GITLAB_TOKEN", world.token)
    if print_env:
        with world.lock:
            top = [g.full_path for g in world.groups.values() if g.parent_id is None]
            if top:
                _emit("GITLAB_GROUPS", ",".join(top))
            else:
                _emit("GITLAB_PROJECTS", ",".join(str(p) for p in world.projects))
            expected = sum(1 for p in world.pipelines.values() if not p.deleted and p.status in FINISHED_STATUSES)
        _emit("SIM_EXPECTED_PIPELINES", str(expected))
    sys.stdout.flush()
    _serve_until_signalled(sim.stop)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=0, show_default=True, help="Port to bind; 0 picks a free one.")
@click.option("--token", default=None, help="Bearer token to require (default: none required).")
@click.option("--path", "url_path", default="/logs", show_default=True, help="Path that accepts POSTs.")
@click.option("--max-bytes", type=click.IntRange(min=0), default=None, help="Answer 413 above this body size.")
@click.option("--delay", type=click.FloatRange(min=0), default=0.0, help="Seconds added to every answer.")
@click.option("--dump-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write every accepted JSON body to this folder.")
def receiver(host: str, port: int, token: str | None, url_path: str, max_bytes: int | None, delay: float,
             dump_dir: Path | None) -> None:
    """Serve the recording log-analysis API until SIGTERM/SIGINT."""
    from .receiver import Receiver

    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
    # Bodies are kept only to dump them: nothing else could read them from a standalone process,
    # and a long demo run would otherwise hold every document in memory.
    rec = Receiver(host=host, port=port, token=token, max_bytes=max_bytes, delay=delay,
                   store_bodies=dump_dir is not None, path=url_path, dump_dir=dump_dir).start()
    _emit("API_POST_URL", rec.url)
    if token:
        _emit("API_POST_AUTH_TOKEN", token)
    sys.stdout.flush()
    _serve_until_signalled(rec.stop)


if __name__ == "__main__":
    main(prog_name="python -m gitlab_log_shipper.sim")
