"""The run record and its state transitions, pure functions on plain models.

The store (faasci.store) applies a transition atomically; everything here is testable
without NATS. A stage's attempts are claimed by number, so a duplicate delivery of the
same invocation finds its attempt already taken and does nothing.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from .errors import Conflict
from .pipeline import Pipeline

RunStatus = Literal["queued", "running", "passed", "failed", "cancelled"]
StageStatus = Literal["pending", "queued", "running", "passed", "failed", "skipped", "cancelled"]
AttemptStatus = Literal["running", "passed", "failed", "cancelled"]
FINISHED = ("passed", "failed", "cancelled")


def now() -> datetime:
    return datetime.now(UTC)


def new_run_id() -> str:
    """Sortable by creation time, unique without coordination, valid as a NATS key."""
    return now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


class Attempt(BaseModel):
    number: int
    status: AttemptStatus = "running"
    exit_code: int | None = None
    reason: str | None = None  # why it failed: "exit", "timeout" or "infra"
    error: str | None = None  # one line a person can act on
    started_at: datetime = Field(default_factory=now)
    finished_at: datetime | None = None
    duration_s: float | None = None
    log: str | None = None  # link served by the pipeline-log function
    log_key: str | None = None  # object key in S3
    worker: str | None = None


class StageRun(BaseModel):
    name: str
    status: StageStatus = "pending"
    attempts: list[Attempt] = []
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None

    @property
    def next_attempt(self) -> int:
        return len(self.attempts) + 1


class Run(BaseModel):
    id: str = Field(default_factory=new_run_id)
    service: str
    repo: str  # as the trigger named it: a path or a git URL
    ref: str
    commit: str
    status: RunStatus = "queued"
    trigger: str = "manual"
    source: str  # what a stage clones: the repository, or the snapshot store for a working tree
    path: str = ""  # the service's folder inside the repository
    snapshot: bool = False  # the commit is a snapshot of uncommitted work
    created_at: datetime = Field(default_factory=now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    pipeline: Pipeline
    stages: list[StageRun] = []

    def stage(self, name: str) -> StageRun:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise Conflict(f"run {self.id} has no stage {name!r}", field="stage")

    def stage_after(self, name: str) -> StageRun | None:
        names = [s.name for s in self.stages]
        index = names.index(name) + 1
        return self.stages[index] if index < len(names) else None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def new_run(pipeline: Pipeline, only: str | None = None, **fields) -> Run:
    names = [only] if only else pipeline.stage_names()
    run = Run(pipeline=pipeline, service=pipeline.service, **fields)
    run.stages = [StageRun(name=n) for n in names]
    run.stages[0].status = "queued"
    return run


# Transitions. Each mutates the run it is given and says what should happen next.


class Next(BaseModel):
    """What a finished attempt leads to: invoke `stage` (attempt `attempt`), or nothing more."""

    stage: str | None = None
    attempt: int = 1
    run_finished: bool = False


def claim(run: Run, stage_name: str, attempt: int | None, worker: str) -> Attempt:
    """Take attempt `attempt` (the next one when None) of a stage; Conflict if it is not free."""
    stage = run.stage(stage_name)
    if run.finished:
        raise Conflict(f"run {run.id} is already {run.status}", field="run_id")
    if stage.status != "queued":
        raise Conflict(f"stage {stage_name} of run {run.id} is {stage.status}", field="stage")
    wanted = stage.next_attempt if attempt is None else attempt
    if wanted != stage.next_attempt:
        raise Conflict(
            f"attempt {wanted} of {stage_name} in run {run.id} was already taken", field="attempt"
        )
    taken = Attempt(number=wanted, worker=worker)
    stage.attempts.append(taken)
    stage.status = "running"
    stage.started_at = stage.started_at or taken.started_at
    run.status = "running"
    run.started_at = run.started_at or taken.started_at
    return taken


def finish(
    run: Run,
    stage_name: str,
    number: int,
    *,
    passed: bool,
    exit_code: int | None,
    reason: str | None = None,
    error: str | None = None,
    log: str | None = None,
    log_key: str | None = None,
) -> Next:
    """Record the end of an attempt and decide what follows: the next stage, a retry, or the end."""
    stage = run.stage(stage_name)
    attempt = stage.attempts[number - 1]
    attempt.status = "passed" if passed else "failed"
    attempt.exit_code, attempt.reason, attempt.error = exit_code, reason, error
    attempt.log, attempt.log_key = log, log_key
    attempt.finished_at = now()
    attempt.duration_s = _seconds(attempt.started_at, attempt.finished_at)
    if run.finished:  # cancelled meanwhile: record the attempt, start nothing
        return Next(run_finished=True)

    spec = run.pipeline.stages.get(stage_name)
    if not passed and spec and reason in spec.retry_on and number <= spec.retries:
        stage.status = "queued"
        return Next(stage=stage_name, attempt=number + 1)

    stage.status = "passed" if passed else "failed"
    stage.finished_at = attempt.finished_at
    stage.duration_s = _seconds(stage.started_at, stage.finished_at)
    following = run.stage_after(stage_name)
    if passed and following is not None:
        following.status = "queued"
        return Next(stage=following.name)
    _end(run, "passed" if passed else "failed")
    return Next(run_finished=True)


def _end(run: Run, status: RunStatus) -> None:
    run.status = status
    run.finished_at = now()
    run.duration_s = _seconds(run.created_at, run.finished_at)
    for stage in run.stages:
        if stage.status in ("pending", "queued"):
            stage.status = "skipped" if status != "cancelled" else "cancelled"
