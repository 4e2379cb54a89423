"""Long operations as jobs: template import, build, verify, push and pull (whole or lazy), flatten, fork.

A request starts a job and gets its id at once (HTTP 202); ``GET /v1/jobs/{id}`` gives
its state and progress, ``?wait=S`` holds the answer until the job changes state or
ends (at most S seconds), ``POST /v1/jobs/{id}/cancel`` cancels it.

A job's store work runs in a store worker like every other call (:mod:`.workers`: a
function of :mod:`.calls`, in the caller's scope); the job's thread here only waits for
it and keeps its state. Progress is what the store reports through
:class:`cowdisk.progress.Progress`: the current stage and bytes done of total, sent back
from the worker (:class:`.workers.CallProgress`, :class:`.workers.Watch`). Cancellation
crosses the same boundary: a cancel is sent to the worker, and the call's next progress
report raises :class:`~cowdisk.errors.Cancelled` inside the store operation, which then
undoes itself exactly as after any failure (import and build remove their staging,
flatten and fork roll back through their transition's undo). What a cancelled operation
leaves is the Store's to say, the same for every caller: a fork into N is one batch,
undone whole (:meth:`cowdisk.store.Store.fork`), through the library as through a job. Where an operation has passed its point of no return (a build publishing its
cache entry) the cancel is not honoured and the job ends ``succeeded``;
``cancel_requested`` says a cancel came too late. A tool the store runs (mkfs, tar,
skopeo, umoci) reports no bytes, so its wait is a heartbeat (``progress(0, 0)`` every
0.2 s, :func:`cowdisk.cache.mkfs.run`): a cancel lands there too, the tool is killed and
reaped, and the build's failure path removes its staging.

States: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``.
Finished jobs are kept ``job_retention`` seconds (at most :data:`MAX_FINISHED`).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .protocol import Cancelled, error_document
from .security import Peer
from .workers import NO_RETURN_STAGES, Watch

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})
MAX_FINISHED = 1000

PROGRESS_EVERY = 0.25
MAX_STAGES = 64
"""The most stages a job's document lists (the first and the newest are kept)."""


@dataclass
class Job:
    id: str
    op: str
    object: str
    peer: Peer
    state: str = QUEUED
    stage: str = ""
    done: int = 0
    total: int = 0
    result: Any = None
    error: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    no_return: bool = False
    worker: int | None = None
    """The store worker process that ran the job's store call."""
    seq: int = 0
    """Bumped on every change a waiter cares about: state, stage, bytes (at most every
    :data:`PROGRESS_EVERY` seconds). ``GET /v1/jobs/{id}?wait=S&since=SEQ`` returns once
    it passes ``since``."""
    stages: list[dict[str, Any]] = field(default_factory=list)
    """Each stage so far with its last byte counts (the newest is ``stage``, ``done``,
    ``total``): a client that polls sees the final counts of a stage that ended between
    two of its requests."""
    _told: float = 0.0
    _watch: Watch | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "seq": self.seq, "op": self.op, "object": self.object, "state": self.state,
                "progress": {"stage": self.stage, "done": self.done, "total": self.total},
                "stages": [dict(st) for st in self.stages],
                "result": self.result, "error": self.error["error"] if self.error else None,
                "created": self.created, "started": self.started, "finished": self.finished,
                "cancel_requested": self.cancel_requested, "peer": self.peer.as_dict()}


class JobContext:
    """What a job's function gets: the progress callback to hand the store, and a check."""

    def __init__(self, mgr: "Jobs", job: Job) -> None:
        self._mgr = mgr
        self.job = job
        self.watch = Watch(self.record)
        """What the job's store call reports to and is cancelled through (:meth:`.workers.Pool.run`)."""
        job._watch = self.watch

    def progress(self, done: int, total: int, stage: str = "") -> None:
        """A :class:`cowdisk.progress.Progress` that records and raises Cancelled once cancelled."""
        self.record(done, total, stage)
        self.check()

    def record(self, done: int, total: int, stage: str = "") -> None:
        """Note a progress report of the job's store call (it raises nothing: where the call
        runs, its own :class:`.workers.CallProgress` honours a cancel)."""
        job = self.job
        mgr = self._mgr
        with mgr.cond:
            if stage:
                job.stage = stage
                if stage.startswith(NO_RETURN_STAGES):
                    job.no_return = True
                if len(job.stages) >= MAX_STAGES:
                    del job.stages[1]
                job.stages.append({"stage": stage, "done": 0, "total": 0})
            job.done, job.total = done, total
            if job.stages:
                job.stages[-1]["done"], job.stages[-1]["total"] = done, total
            now = time.monotonic()
            if stage or now - job._told >= PROGRESS_EVERY or (total and done >= total):
                job._told = now
                job.seq = next(mgr._seq)
                mgr.cond.notify_all()

    def check(self) -> None:
        """Raise Cancelled if the job was cancelled (and may still be)."""
        if self.job.cancel_requested and not self.job.no_return:
            raise Cancelled(f"{self.job.op} {self.job.object}: job {self.job.id} cancelled", op=self.job.op,
                            obj=self.job.object)


Runner = Callable[[JobContext], Any]


class Jobs:
    """The daemon's jobs: each runs in its own (non-daemon) thread."""

    def __init__(self, retention: float = 3600.0,
                 on_done: Callable[[Job, BaseException | None, float], None] | None = None) -> None:
        self.retention = retention
        self.on_done = on_done
        self.cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._seq = itertools.count(1)
        self.accepting = True

    def start(self, op: str, obj: str, peer: Peer, run: Runner) -> Job:
        from .protocol import Unavailable

        job = Job(secrets.token_hex(8), op, obj, peer)
        with self.cond:
            if not self.accepting:
                raise Unavailable(f"{op} {obj}: the daemon is shutting down", op=op, obj=obj,
                                  hint="start the job again once the daemon is back")
            self._prune()
            self._jobs[job.id] = job
            t = threading.Thread(target=self._run, args=(job, run), name=f"job-{op}-{job.id}")
            self._threads[job.id] = t
        t.start()
        return job

    def _set(self, job: Job, **fields: Any) -> None:
        with self.cond:
            for k, v in fields.items():
                setattr(job, k, v)
            job.seq = next(self._seq)
            self.cond.notify_all()

    def _run(self, job: Job, run: Runner) -> None:
        self._set(job, state=RUNNING, started=time.time())
        ctx = JobContext(self, job)
        t0 = time.monotonic()
        err: BaseException | None = None
        try:
            ctx.check()
            result = run(ctx)
        except BaseException as e:  # a job's failure is its result, never the thread's death
            err = e
            state = CANCELLED if isinstance(e, Cancelled) else FAILED
            if state == FAILED:
                log.debug("job %s failed", job.id, exc_info=True)
            self._set(job, state=state, error=error_document(e), finished=time.time())
        else:
            self._set(job, state=SUCCEEDED, result=result, finished=time.time())
        finally:
            with self.cond:
                self._threads.pop(job.id, None)
                self.cond.notify_all()
        if self.on_done is not None:
            self.on_done(job, err, time.monotonic() - t0)

    def _prune(self) -> None:
        now = time.time()
        done = [j for j in self._jobs.values() if j.state in FINISHED]
        for j in done:
            if j.finished is not None and now - j.finished > self.retention:
                del self._jobs[j.id]
        done = sorted((j for j in self._jobs.values() if j.state in FINISHED), key=lambda j: j.finished or 0)
        for j in done[:max(0, len(done) - MAX_FINISHED)]:
            del self._jobs[j.id]

    def get(self, job_id: str) -> Job | None:
        with self.cond:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self.cond:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def wait(self, job: Job, timeout: float, since: int | None = None) -> Job:
        """Return once ``job`` changed after ``since`` (its ``seq``; default: now), or ended,
        or ``timeout`` passed, or the daemon stops."""
        end = time.monotonic() + timeout
        with self.cond:
            seq = job.seq if since is None else since
            while job.seq <= seq and job.state not in FINISHED and self.accepting:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
        return job

    def wait_done(self, job: Job, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while job.state not in FINISHED:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def cancel(self, job: Job) -> Job:
        if job.state not in FINISHED:
            self._set(job, cancel_requested=True)
            if job._watch is not None:
                job._watch.cancel()
        return job

    def running(self) -> list[Job]:
        with self.cond:
            return [j for j in self._jobs.values() if j.state not in FINISHED]

    def stop_accepting(self) -> None:
        """Refuse new jobs and wake every waiter (a stopping daemon holds no long-poll)."""
        with self.cond:
            self.accepting = False
            self.cond.notify_all()

    def shutdown(self, timeout: float) -> list[str]:
        """Stop taking jobs, let the running ones finish within ``timeout`` seconds, cancel the
        rest (they undo themselves at their next progress report) and wait for them; returns
        the ids of jobs still running after another ``timeout`` (their intents stay for recovery)."""
        with self.cond:
            self.accepting = False
        end = time.monotonic() + timeout
        with self.cond:
            while self._threads and time.monotonic() < end:
                self.cond.wait(max(0.0, end - time.monotonic()))
        for j in self.running():
            log.warning("job %s (%s %s) still running at shutdown: cancelling it", j.id, j.op, j.object)
            self.cancel(j)
        end = time.monotonic() + timeout
        with self.cond:
            while self._threads and time.monotonic() < end:
                self.cond.wait(max(0.0, end - time.monotonic()))
            return list(self._threads)
