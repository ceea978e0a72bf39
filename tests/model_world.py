"""The world side of the model-based test (``test_model_based.py``): a virtual clock, a simulator with a
per-request callback, and a :class:`ModelWorld` that drives the real :class:`World` and records a
snapshot of every *finish* for the oracle.

A **finish** is a pipeline coming to rest in a finished status (success, failed, canceled, skipped,
manual) together with the state of its jobs at that moment. Two finishes of one pipeline differ when
anything a document carries differs: a retry gives new job ids, a played manual job ran and has a log.
GitLab leaves ``finished_at`` null for ``skipped`` and ``manual`` (``Ci::Pipeline``'s state machine sets
it only ``before_transition any => [:success, :failed, :canceled]``, gitlabhq/gitlabhq
``app/models/ci/pipeline.rb``), so a manual pipeline that blocks again after a played job is a new
finish although its status and finished_at look the same.

Behaviours the World lacks are implemented here as GitLab behaves; they move to the simulator once it
has them (``World.play_job``, clock skew):

* :meth:`ModelWorld.play`: playing a manual job runs *that* job (same id, ``Ci::PlayBuildService``);
  the pipeline is ``running`` again until it blocks on the next manual job or finishes.
* ``finished_at`` null for skipped and manual pipelines (the World stamps it; see above).
* :meth:`ModelWorld.finish` with ``skew``: the row is stamped by a GitLab node whose clock is ahead
  (``updated_at`` and ``finished_at`` from that clock).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

from gitlab_log_shipper.sim.gitlab import GitLabSimulator, _route, _ts
from gitlab_log_shipper.sim.logs import iter_log
from gitlab_log_shipper.sim.world import JobSpec, World

RequestCallback = Callable[[str, list, dict], None]


class VirtualClock:
    """One clock for the world and the shipper; moves only when told to (thread-safe, monotonic)."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


class HookedSimulator(GitLabSimulator):
    """The simulator with ``on_request(callback)``: ``callback(endpoint, args, params)`` runs before each
    answer, outside ``world.lock`` (World mutations take it themselves). ``down=True`` answers every
    request with a 429 and ``Retry-After: 0``: python-gitlab gives up after its retries without sleeping,
    which stands for a GitLab that cannot be reached during one cycle."""

    def __init__(self, world: World, **kwargs: Any) -> None:
        super().__init__(world, **kwargs)
        self._callbacks: list[RequestCallback] = []
        self.down = False

    def on_request(self, callback: RequestCallback) -> None:
        self._callbacks.append(callback)

    def _answer(self, handler: Any) -> None:
        split = urlsplit(handler.path)
        endpoint, args = _route(split.path)
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        for callback in list(self._callbacks):
            callback(endpoint, args, params)
        if self.down:
            self._count(endpoint)
            handler.send_body(429, b"Retry later\n", {"Content-Type": "text/plain", "Retry-After": "0"})
            return
        super()._answer(handler)


@dataclass(frozen=True)
class JobState:
    id: int
    name: str
    status: str
    log: bytes


@dataclass
class Finish:
    """A snapshot of one finish; ``born``/``ended`` are world versions (mutation counters)."""

    pipeline_id: int
    project_id: int
    status: str
    finished_at: str | None
    jobs: tuple[JobState, ...]
    born: int
    ended: int | None = None
    note: str = ""

    def content(self) -> tuple[Any, ...]:
        return (self.pipeline_id, self.status, self.finished_at, self.jobs)

    def describe(self) -> str:
        jobs = ", ".join(f"{j.name}#{j.id}:{j.status}:{len(j.log)}B" for j in self.jobs)
        return (f"pipeline {self.pipeline_id} {self.status} finished_at={self.finished_at} [{jobs}] "
                f"(v{self.born}..{'now' if self.ended is None else f'v{self.ended}'}){' ' + self.note if self.note else ''}")


@dataclass
class PipelineInfo:
    id: int
    project_id: int
    child: bool
    skip_destined: bool  # its jobs never start: it can only finish as skipped
    finishes: list[Finish] = field(default_factory=list)
    deleted: bool = False


class ModelWorld:
    """Drives the World with the mutations the model uses and records every finish."""

    def __init__(self, world: World, clock: VirtualClock, log: Callable[[str], None]) -> None:
        self.world = world
        self.clock = clock
        self.log = log
        self.version = 0
        self.pipelines: dict[int, PipelineInfo] = {}
        self._log_serial = 0

    # -- helpers --------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.version += 1
        return self.version

    def _new_log(self, what: str) -> str:
        self._log_serial += 1
        return f"log {self._log_serial} of {what}\nline two {self._log_serial}\n"

    def _current(self, pid: int) -> Finish | None:
        info = self.pipelines[pid]
        if info.finishes and info.finishes[-1].ended is None:
            return info.finishes[-1]
        return None

    def _end_current(self, pid: int) -> None:
        current = self._current(pid)
        if current is not None:
            current.ended = self.version

    def _snapshot(self, pid: int, note: str = "") -> Finish:
        world = self.world
        with world.lock:
            p = world.pipelines[pid]
            jobs = []
            for job in sorted(world.pipeline_jobs(pid), key=lambda j: j.id):
                ran = job.started_at is not None and not job.erased
                data = b"".join(iter_log(job.log)) if ran and job.log is not None else b""
                jobs.append(JobState(job.id, job.name, job.status, data))
            finish = Finish(pid, p.project_id, p.status, _ts(p.finished_at), tuple(jobs), self.version, note=note)
        self.pipelines[pid].finishes.append(finish)
        return finish

    # -- queries --------------------------------------------------------------------------------

    def live(self) -> list[PipelineInfo]:
        return [i for i in self.pipelines.values() if not i.deleted]

    def status(self, pid: int) -> str:
        with self.world.lock:
            return self.world.pipelines[pid].status

    def running(self) -> list[int]:
        return [i.id for i in self.live() if self.status(i.id) == "running"]

    def at_rest(self) -> list[int]:
        return [i.id for i in self.live() if self._current(i.id) is not None]

    def manual_jobs(self, pid: int) -> list[int]:
        with self.world.lock:
            return [j.id for j in self.world.pipeline_jobs(pid) if j.status == "manual"]

    def retryable(self, pid: int) -> bool:
        with self.world.lock:
            return any(j.status in ("failed", "canceled") for j in self.world.pipeline_jobs(pid))

    # -- mutations ------------------------------------------------------------------------------

    def new_pipeline(self, project_id: int, *, skip_destined: bool = False, manual_jobs: int = 0,
                     n_jobs: int = 1) -> int:
        """A running pipeline (jobs running or pending; ``created`` for one that will be skipped)."""
        specs = []
        for i in range(n_jobs):
            status = "created" if skip_destined else ("running" if i == 0 else "pending")
            specs.append(JobSpec(f"job{i}", "test", status, log=None if skip_destined else self._new_log(f"job{i}")))
        for i in range(0 if skip_destined else manual_jobs):
            # a blocking manual job (allow_failure: false) in a later stage
            specs.append(JobSpec(f"deploy{i}", f"deploy{i}", "manual", allow_failure=False))
        status = "created" if skip_destined else "running"
        pipeline = self.world.add_pipeline(project_id, status=status, jobs=specs)
        self.pipelines[pipeline.id] = PipelineInfo(pipeline.id, project_id, False, skip_destined)
        self._bump()
        self.log(f"new pipeline {pipeline.id} in project {project_id} ({status}, {n_jobs} job(s), "
                 f"{manual_jobs if not skip_destined else 0} manual)")
        return pipeline.id

    def new_child(self, parent_id: int) -> int | None:
        with self.world.lock:
            if self.world.pipelines[parent_id].status != "running":
                return None
            child = self.world.add_child_pipeline(parent_id, status="running",
                                                  jobs=[JobSpec("child-job", "test", "running", log=self._new_log("child"))])
        self.pipelines[child.id] = PipelineInfo(child.id, child.project_id, True, False)
        self._bump()
        self.log(f"new child pipeline {child.id} of {parent_id}")
        return child.id

    def finish(self, pid: int, status: str, *, skew: float = 0.0, note: str = "") -> Finish:
        """Bring a running (or created) pipeline to rest in ``status`` and record the finish."""
        world = self.world
        with world.lock:
            manual = self.manual_jobs(pid)
            if status == "success" and manual:
                status = "manual"  # a blocking manual job is left: the pipeline blocks on it
            if status == "manual" and not manual:
                # it can only block on a manual job: add one (a later stage, not allowed to fail)
                world.add_job(pid, f"gate{self.version}", f"gate{self.version}", "manual")
                world.jobs[world.pipelines[pid].job_ids[-1]].allow_failure = False
            if status in ("failed", "canceled"):
                for job_id in manual:  # the stages after a failed (or canceled) one are skipped
                    world.jobs[job_id].status = "skipped"
            p = world.finish_pipeline(pid, status)
            if status in ("manual", "skipped"):
                p.finished_at = None  # GitLab: finished_at is set only on success, failed, canceled
            if skew:
                # stamped by a GitLab node whose clock is ``skew`` seconds ahead
                p.updated_at += timedelta(seconds=skew)
                if p.finished_at is not None:
                    p.finished_at += timedelta(seconds=skew)
            self._end_current(pid)
            self._bump()
            finish = self._snapshot(pid, note=f"skew +{skew:.0f}s" if skew else note)
        self.log(f"finish {finish.describe()}")
        return finish

    def retry(self, pid: int) -> None:
        """GitLab's Retry: failed/canceled jobs get new attempts (with new logs); the pipeline runs again."""
        world = self.world
        with world.lock:
            world.retry_pipeline(pid)
            for job in world.pipeline_jobs(pid):
                if job.retried_from is not None and job.status == "running":
                    job.log = self._new_log(f"{job.name} attempt {job.id}")
            self._end_current(pid)
            self._bump()
        self.log(f"retry pipeline {pid}")

    def play(self, pid: int) -> int | None:
        """Play the first manual job: that job runs (same id), the pipeline is running again."""
        world = self.world
        with world.lock:
            manual = sorted(self.manual_jobs(pid))
            if not manual:
                return None
            job = world.jobs[manual[0]]
            now = world.now()
            job.status = "running"
            job.started_at = now
            job.queued_duration = 0.0
            job.log = self._new_log(f"played {job.name} #{job.id}")
            p = world.pipelines[pid]
            p.status = "running"
            p.updated_at = now
            self._end_current(pid)
            self._bump()
        self.log(f"play job {manual[0]} of pipeline {pid}")
        return manual[0]

    def touch(self, pid: int) -> None:
        self.world.touch_pipeline(pid)
        self._bump()  # the finish itself is unchanged
        self.log(f"touch pipeline {pid}")

    def delete(self, pid: int) -> None:
        self.world.delete_pipeline(pid)
        with self.world.lock:
            self._end_current(pid)
            self.pipelines[pid].deleted = True
            self._bump()
        self.log(f"delete pipeline {pid}")

    def now_str(self) -> str:
        return self.clock.now().astimezone(timezone.utc).isoformat()
