"""The run record and its state transitions, pure functions on plain models.

The store (faasci.store) applies a transition atomically; everything here is testable
without NATS. A stage's attempts are claimed by number, so a duplicate delivery of the
same invocation finds its attempt already taken and does nothing.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from .errors import Conflict, NotFound
from .gitops import Approval
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
    # When it was owed: its stage queued (the previous stage's end, the run's creation) or
    # its retry due. started_at - queued_at is its wait in the queue (the hop, between stages).
    queued_at: datetime | None = None
    started_at: datetime = Field(default_factory=now)
    finished_at: datetime | None = None
    duration_s: float | None = None
    log: str | None = None  # link served by the pipeline-log function
    log_key: str | None = None  # object key in S3
    worker: str | None = None
    heartbeat_at: datetime | None = None  # the worker is alive while this keeps moving
    cache: dict | None = None  # what the dependency cache did (faasci.cache.CacheReport)
    image: str | None = None  # the build stage: the image it pushed, repository@sha256:…
    # The build stage: what the Trivy gate found in that image (faasci.scan.gate: passed,
    # blocked_by, counts, the SBOM's key and, when blocked, the quarantined report's key).
    scan: dict | None = None
    # The promote stage: what it did (faasci.gitops.Promotion: environment, repository, file,
    # image, commit in the environment repository or None when unchanged, approved_by).
    promotion: dict | None = None
    # The deploy stage: what its rollout did (faasci.rollout.Deployment: target, function or
    # application, image, previous, rolled_back_to, healthy_after_s).
    deployment: dict | None = None
    # What its processes used (faasci.usage.Usage: cpu_s, peak_rss_bytes, wall_s, commands)
    # and the environment its run is for (faasci.costs.environment_of), priced by faasci.costs.
    usage: dict | None = None


class StageRun(BaseModel):
    name: str
    status: StageStatus = "pending"
    attempts: list[Attempt] = []
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    retry_at: datetime | None = None  # when the next attempt is due, while backing off
    queued_at: datetime | None = None  # when its next attempt became owed

    @property
    def next_attempt(self) -> int:
        return len(self.attempts) + 1


class Alert(BaseModel):
    """The one Slack alert a failed run gets: queued until delivered, never sent twice."""

    status: Literal["pending", "sending", "sent", "rejected", "unconfigured"] = "pending"
    tries: int = 0
    last_error: str | None = None
    sending_since: datetime | None = None
    sent_at: datetime | None = None
    delivery: str | None = None  # Slack's message ts, or "webhook"


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
    alert: Alert | None = None
    # The image the build stage pushed (repository@sha256:…): later stages see it as
    # FAASCI_IMAGE, run in it with `image: built`, and promote it.
    image: str | None = None
    # A promotion that needs an admin's approval: asked for, then given (faasci.gitops).
    approval: Approval | None = None
    # The W3C traceparent of the run's root span (faasci.tracing.begin_run): every stage
    # attempt's span is its child, so the run is one trace. None when tracing is off.
    traceparent: str | None = None

    def stage(self, name: str) -> StageRun:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise NotFound(f"run {self.id} has no stage {name!r}", field="stage")

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
    run.stages[0].status, run.stages[0].queued_at = "queued", run.created_at
    return run


# Transitions. Each mutates the run it is given and says what should happen next; each
# can be applied again after an ambiguous write (a NATS timeout) without doing more.


class Next(BaseModel):
    """What a finished attempt leads to: invoke `stage` (attempt `attempt`, after `delay_s`),
    or nothing more; `notify` when the run has just failed."""

    stage: str | None = None
    attempt: int = 1
    delay_s: float = 0
    run_finished: bool = False
    notify: bool = False


def claim(run: Run, stage_name: str, attempt: int | None, worker: str) -> Attempt:
    """Take attempt `attempt` (the next one when None) of a stage; Conflict if it is not free."""
    stage = run.stage(stage_name)
    if attempt is not None and 0 < attempt <= len(stage.attempts):
        mine = stage.attempts[attempt - 1]
        if mine.worker == worker and mine.status == "running":  # our own write, applied again
            return mine
    if run.finished:
        raise Conflict(f"run {run.id} is already {run.status}", field="run_id")
    if stage.status != "queued":
        raise Conflict(f"stage {stage_name} of run {run.id} is {stage.status}", field="stage")
    wanted = stage.next_attempt if attempt is None else attempt
    if wanted != stage.next_attempt:
        raise Conflict(
            f"attempt {wanted} of {stage_name} in run {run.id} was already taken", field="attempt"
        )
    taken = Attempt(number=wanted, worker=worker, heartbeat_at=now(), queued_at=stage.queued_at)
    stage.attempts.append(taken)
    stage.status = "running"
    stage.retry_at = None
    stage.started_at = stage.started_at or taken.started_at
    run.status = "running"
    run.started_at = run.started_at or taken.started_at
    return taken


def heartbeat(run: Run, stage_name: str, number: int) -> bool:
    """Mark a running attempt alive; False when it is no longer running (lost or cancelled)."""
    attempt = run.stage(stage_name).attempts[number - 1]
    if attempt.status != "running" or run.finished:
        return False
    attempt.heartbeat_at = now()
    return True


def finish(
    run: Run,
    stage_name: str,
    number: int,
    *,
    status: AttemptStatus,
    exit_code: int | None = None,
    reason: str | None = None,
    error: str | None = None,
    log: str | None = None,
    log_key: str | None = None,
    cache: dict | None = None,
    delivered: dict | None = None,
    usage: dict | None = None,
) -> Next:
    """Record the end of an attempt and decide what follows: the next stage, a retry after
    its back-off, or the end of the run."""
    stage = run.stage(stage_name)
    attempt = stage.attempts[number - 1]
    if attempt.status != "running":  # already recorded (a repeated write, or a lost worker)
        return next_after(run, stage_name, number)
    attempt.status = status
    attempt.exit_code, attempt.reason, attempt.error = exit_code, reason, error
    attempt.log, attempt.log_key, attempt.cache = log, log_key, cache
    attempt.usage = usage
    for name, value in (delivered or {}).items():  # what the stage's delivery step did
        setattr(attempt, name, value)
    if attempt.image and status == "passed":
        run.image = attempt.image
    attempt.finished_at = now()
    attempt.duration_s = _seconds(attempt.started_at, attempt.finished_at)
    if run.finished:  # cancelled meanwhile: record the attempt, start nothing
        _close_stage(stage, "cancelled", attempt.finished_at)
        return Next(run_finished=True)
    if status == "cancelled":
        _close_stage(stage, "cancelled", attempt.finished_at)
        _end(run, "cancelled")
        return Next(run_finished=True)

    spec = run.pipeline.stages.get(stage_name)
    # Only exit/timeout/infra can be in retry_on: a reason of a delivery step's own (e.g.
    # `rollout`, a target that did not become healthy; `promotion`, a GitOps configuration
    # that cannot work; `approval`, no admin approved in time; `blocked`, an image the Trivy
    # gate stopped) is never retried.
    if status == "failed" and spec and reason in spec.retry_on and number <= spec.retries:
        delay = spec.backoff.delay(number)
        stage.status = "queued"
        stage.retry_at = attempt.finished_at + timedelta(seconds=delay)
        stage.queued_at = stage.retry_at
        return Next(stage=stage_name, attempt=number + 1, delay_s=delay)

    _close_stage(stage, status, attempt.finished_at)
    following = run.stage_after(stage_name)
    if status == "passed" and following is not None:
        following.status, following.queued_at = "queued", attempt.finished_at
        return Next(stage=following.name)
    _end(run, status)
    if status == "failed":
        run.alert = Alert()
        return Next(run_finished=True, notify=True)
    return Next(run_finished=True)


def lose(run: Run, stage_name: str, number: int, silent_s: float) -> Next:
    """The worker of a running attempt stopped sending heartbeats: the attempt failed for an
    infrastructure reason (and is retried as such)."""
    return finish(run, stage_name, number, status="failed", reason="infra",
                  error=f"worker lost: no heartbeat for {silent_s:.0f}s")  # fmt: skip


def next_after(run: Run, stage_name: str, number: int) -> Next:
    """What should follow attempt `number` of a stage, judged from the record alone."""
    stage = run.stage(stage_name)
    if run.finished:
        return Next(run_finished=True, notify=run.status == "failed")
    if stage.status == "queued" and stage.next_attempt == number + 1:
        wait = (stage.retry_at - now()).total_seconds() if stage.retry_at else 0
        return Next(stage=stage_name, attempt=number + 1, delay_s=max(wait, 0))
    following = run.stage_after(stage_name)
    if stage.status == "passed" and following and following.status == "queued":
        return Next(stage=following.name, attempt=following.next_attempt)
    return Next()


class Owed(BaseModel):
    """What a hand-off still owes, judged from the record: invoking `function` (a stage,
    at `attempt`, or "notifier"), due since `since` (in the future while a retry backs
    off); `unrecorded` while the attempt's end is not written yet."""

    function: str | None = None
    attempt: int = 1
    since: datetime | None = None
    unrecorded: bool = False


def owed_after(run: Run, stage_name: str | None, number: int) -> Owed:
    """What should follow attempt `number` of a stage (`stage_name` None: the run's start)
    and has not happened yet. Only this hand-off's own successor counts (the next stage's
    first attempt, or this stage's next attempt), so two guards never chase one attempt."""
    if stage_name is None:
        first = run.stages[0]
        if not run.finished and first.status == "queued" and not first.attempts:
            return Owed(function=first.name, since=run.created_at)
        return Owed()
    ended = run.stage(stage_name).attempts[number - 1]
    if ended.status == "running" and not run.finished:
        return Owed(unrecorded=True)
    following = next_after(run, stage_name, number)
    if following.notify:
        alert = run.alert
        if alert and alert.status == "pending" and alert.tries == 0:  # never picked up
            return Owed(function="notifier", since=run.finished_at)
        return Owed()
    if not following.stage:
        return Owed()
    target = run.stage(following.stage)
    ours = number + 1 if following.stage == stage_name else 1
    if following.attempt != ours or len(target.attempts) >= ours:
        return Owed()
    return Owed(function=target.name, attempt=ours,
                since=target.retry_at or ended.finished_at)  # fmt: skip


def cancel(run: Run) -> None:
    """Stop a run: queued stages never start; a running one is killed by its worker."""
    if run.finished:
        raise Conflict(f"run {run.id} is already {run.status}", field="run_id")
    _end(run, "cancelled")


def _close_stage(stage: StageRun, status: StageStatus, at: datetime) -> None:
    stage.status = status
    stage.retry_at = None
    stage.finished_at = at
    stage.duration_s = _seconds(stage.started_at, stage.finished_at)


def _end(run: Run, status: RunStatus) -> None:
    run.status = status
    run.finished_at = now()
    run.duration_s = _seconds(run.created_at, run.finished_at)
    for stage in run.stages:
        if stage.status in ("pending", "queued"):
            stage.status = "skipped" if status != "cancelled" else "cancelled"
