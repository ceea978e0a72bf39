"""The world side of the model-based test (``test_model_based.py``): a virtual clock and a
:class:`ModelWorld` that drives the real :class:`World` through its own mutations and records a
snapshot of every *finish* for the oracle.

A **finish** is a pipeline coming to rest in a finished status (success, failed, canceled, skipped,
manual) together with the state of its jobs at that moment. Two finishes of one pipeline differ when
anything a document carries differs: a retry gives new job ids, a played manual job ran and has a log.
GitLab leaves ``finished_at`` null for ``skipped`` and ``manual`` (the World does the same, see
``STAMPS_FINISHED_AT`` in ``sim/world.py``), so a manual pipeline that blocks again after a played job
is a new finish although its status and finished_at look the same.

Every change goes through the World (``finish_pipeline``, ``retry_pipeline``, ``play_job``,
``touch_pipeline``, ``delete_pipeline``, ``delete_project``, their ``skew=`` for a GitLab node whose
clock runs ahead). Two things the World does not model are done here under ``world.lock``:

* a pipeline that fails (or is canceled) skips the jobs of its later stages, so its blocking manual
  jobs become ``skipped`` (GitLab's ``Ci::ProcessPipelineService``: ``when: manual`` jobs run only
  ``on_success`` of the earlier stages);
* a pipeline told to block on a manual job that has none gets one (``add_job`` makes manual jobs
  ``allow_failure: true``, GitLab's default for ``when: manual`` outside rules; a blocking one is
  ``allow_failure: false``).

A project whose jobs the token cannot read (``Project.jobs_hidden``) lists no jobs: its finishes are
recorded with no jobs and ``hidden`` set; the shipper must ship them with a ``warnings`` field.

Thread safety: the mutations may run on the simulator's request threads (changes *inside* a cycle,
several at once when the shipper's CONCURRENCY > 1); each holds ``world.lock`` (reentrant, the World's
own mutations take it too) for its World change and its bookkeeping together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta, timezone
from typing import Any, Callable

from gitlab_log_shipper.sim.gitlab import _ts
from gitlab_log_shipper.sim.logs import iter_log
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import ManualClock


@dataclass(frozen=True)
class JobState:
    id: int
    name: str
    status: str
    log: bytes


@dataclass
class Finish:
    """A snapshot of one finish; ``born``/``ended`` are world versions (mutation counters).
    ``hidden``: GitLab lists no jobs for it (the token cannot read them); ``jobs`` is then empty."""

    pipeline_id: int
    project_id: int
    status: str
    finished_at: str | None
    jobs: tuple[JobState, ...]
    born: int
    ended: int | None = None
    note: str = ""
    hidden: bool = False

    def content(self) -> tuple[Any, ...]:
        return (self.pipeline_id, self.status, self.finished_at, self.jobs)

    def describe(self) -> str:
        jobs = "jobs hidden" if self.hidden else ", ".join(f"{j.name}#{j.id}:{j.status}:{len(j.log)}B" for j in self.jobs)
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


def _skew(seconds: float) -> timedelta | None:
    """The ``skew=`` for a World mutation: None (the World's node_clock_offset) unless a node ``seconds`` ahead."""
    return timedelta(seconds=seconds) if seconds else None


def _skew_note(seconds: float) -> str:
    return f" (stamped by a node {seconds:.0f} s ahead)" if seconds else ""


class ModelWorld:
    """Drives the World with the mutations the model uses and records every finish."""

    def __init__(self, world: World, clock: ManualClock, log: Callable[[str], None]) -> None:
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
            hidden = p.jobs_hidden or world.projects[p.project_id].jobs_hidden
            jobs = []
            for job in [] if hidden else sorted(world.pipeline_jobs(pid), key=lambda j: j.id):
                ran = job.started_at is not None and not job.erased
                data = b"".join(iter_log(job.log)) if ran and job.log is not None else b""
                jobs.append(JobState(job.id, job.name, job.status, data))
            finish = Finish(pid, p.project_id, p.status, _ts(p.finished_at), tuple(jobs), self.version, note=note,
                            hidden=hidden)
        self.pipelines[pid].finishes.append(finish)
        return finish

    # -- queries --------------------------------------------------------------------------------

    def live(self) -> list[PipelineInfo]:
        with self.world.lock:
            return [i for i in self.pipelines.values() if not i.deleted]

    def status(self, pid: int) -> str:
        with self.world.lock:
            return self.world.pipelines[pid].status

    def running(self) -> list[int]:
        with self.world.lock:
            return [i.id for i in self.live() if self.status(i.id) == "running"]

    def at_rest(self) -> list[int]:
        with self.world.lock:
            return [i.id for i in self.live() if self._current(i.id) is not None]

    def manual_jobs(self, pid: int) -> list[int]:
        with self.world.lock:
            return sorted(j.id for j in self.world.pipeline_jobs(pid) if j.status == "manual")

    def retryable(self, pid: int) -> bool:
        with self.world.lock:
            return any(j.status in ("failed", "canceled") for j in self.world.pipeline_jobs(pid))

    def project_pipelines(self, project_id: int) -> list[int]:
        with self.world.lock:
            return sorted(i.id for i in self.live() if i.project_id == project_id)

    # -- mutations ------------------------------------------------------------------------------

    def new_pipeline(self, project_id: int, *, skip_destined: bool = False, manual_jobs: int = 0,
                     n_jobs: int = 1) -> int:
        """A running pipeline (jobs running or pending; ``created`` for one that will be skipped)."""
        with self.world.lock:
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
        """Bring a running (or created) pipeline to rest in ``status`` and record the finish.

        ``skew``: the rows are stamped by a GitLab node whose clock is that many seconds ahead."""
        world = self.world
        with world.lock:
            manual = self.manual_jobs(pid)
            if status == "success" and manual:
                status = "manual"  # a blocking manual job is left: the pipeline blocks on it
            if status == "manual" and not manual:
                # it can only block on a manual job: add one (a later stage, not allowed to fail)
                gate = world.add_job(pid, f"gate{self.version}", f"gate{self.version}", "manual")
                gate.allow_failure = False
            if status in ("failed", "canceled"):
                for job_id in manual:  # the stages after a failed (or canceled) one are skipped
                    world.jobs[job_id].status = "skipped"
            world.finish_pipeline(pid, status, skew=_skew(skew))
            self._end_current(pid)
            self._bump()
            finish = self._snapshot(pid, note=f"skew +{skew:.0f}s" if skew else note)
        self.log(f"finish {finish.describe()}")
        return finish

    def retry(self, pid: int, *, skew: float = 0.0) -> None:
        """GitLab's Retry: failed/canceled jobs get new attempts (with new logs); the pipeline runs again."""
        world = self.world
        with world.lock:
            world.retry_pipeline(pid, skew=_skew(skew))
            for job in world.pipeline_jobs(pid):
                if job.retried_from is not None and job.status == "running":
                    world.set_job_log(job.id, self._new_log(f"{job.name} attempt {job.id}"))
            self._end_current(pid)
            self._bump()
        self.log(f"retry pipeline {pid}{_skew_note(skew)}")

    def play(self, pid: int, *, skew: float = 0.0) -> int | None:
        """Play the first manual job: that job runs (same id), the pipeline is running again."""
        world = self.world
        with world.lock:
            manual = self.manual_jobs(pid)
            if not manual:
                return None
            job = world.play_job(manual[0], skew=_skew(skew))
            world.set_job_log(job.id, self._new_log(f"played {job.name} #{job.id}"))
            self._end_current(pid)
            self._bump()
        self.log(f"play job {manual[0]} of pipeline {pid}{_skew_note(skew)}")
        return manual[0]

    def touch(self, pid: int, *, skew: float = 0.0) -> None:
        with self.world.lock:
            self.world.touch_pipeline(pid, skew=_skew(skew))
            self._bump()  # the finish itself is unchanged
        self.log(f"touch pipeline {pid}{_skew_note(skew)}")

    def delete(self, pid: int) -> None:
        with self.world.lock:
            self.world.delete_pipeline(pid)
            self._end_current(pid)
            self.pipelines[pid].deleted = True
            self._bump()
        self.log(f"delete pipeline {pid}")

    def delete_project(self, project_id: int) -> None:
        """The project is deleted, and its pipelines with it."""
        with self.world.lock:
            self.world.delete_project(project_id)
            gone = [i for i in self.pipelines.values() if i.project_id == project_id and not i.deleted]
            for info in gone:
                self._end_current(info.id)
                info.deleted = True
            self._bump()
        self.log(f"delete project {project_id} ({len(gone)} pipeline(s) with it)")

    def add_project(self, path: str, *, jobs_hidden: bool = False) -> int:
        """A new project (``path`` may be that of a deleted one: it comes back with a new id, as a project
        created again under the same path does)."""
        with self.world.lock:
            project = self.world.add_project(path)
            project.jobs_hidden = jobs_hidden
            self._bump()
        self.log(f"new project {project.id} ({path}){' whose jobs the token cannot read' if jobs_hidden else ''}")
        return project.id

    def now_str(self) -> str:
        return self.clock().astimezone(timezone.utc).isoformat()
