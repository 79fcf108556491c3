"""Executing one attempt of one stage of a run, and handing the run on.

claim the attempt → check out the commit → run the commands (a watcher keeps the
attempt's heartbeat and stops the commands on cancel) → store the log in S3 → record the
result → invoke what follows asynchronously, with only references in the body: the next
stage, a retry once its back-off has passed (a timer, not a sleeping worker), or the
notifier when the run has failed.

A worker that dies mid-attempt stops its heartbeat; the attempt's lease timer notices and
records the attempt as lost, which is retried like any infrastructure failure.

Recording an attempt's end and invoking what follows are one recoverable step: a durable
hand-off guard (a timer) is armed before the record is written, and invokes the successor
again, with back-off, for as long as the record says it is owed and nobody has claimed it.
So neither a gateway that is down for minutes nor a worker dying between the record and the
invocation leaves a run `running` with nothing running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from . import (
    audit,
    cache,
    caps,
    costs,
    downstream,
    git,
    gitops,
    images,
    invalidation,
    metrics,
    rollout,
    runs,
    scan,
    services,
    shell,
    spool,
    stage_secrets,  # fmt: skip
    timers,
    tracing,
    usage,
)
from .errors import NotFound
from .invoke import InvocationError
from .logs import LiveLog, discard_parts, log_key, log_link
from .pipeline import BUILT
from .runs import Next, Run
from .sandbox import ImageSandbox, Overlay, Sandbox, stage_path
from .settings import settings

log = logging.getLogger("faasci.stage")

WORKER = f"{socket.gethostname()}:{os.getpid()}"
HEARTBEAT_S = 5  # how often a running attempt says it is alive
LEASE_S = 30  # silence after which its worker counts as lost
WATCH_S = 1  # how often the watcher looks for a cancel
# A delivery stage that only ran commands says what it did not do.
COMMANDS_ONLY = {
    "build": "ran the configured commands; no image was built (the stage has no `docker`)",
    "promote": "ran the configured commands; nothing was promoted (the stage has no `gitops`)",
    "deploy": "ran the configured commands; nothing was rolled out (the stage has no "
    "`openfaas` or `argocd` target)",
}


@caps.capped  # a slot of the service's concurrency cap, waited for in order (faasci.caps)
@tracing.attempt_scope  # the attempt's span and log fields end with the call
def execute(run_id: str, stage: str, attempt: int | None = None,
            seen: tuple[Run, int] | None = None) -> dict:  # fmt: skip
    """Run one attempt of `stage`; Conflict when it is not this caller's to run. `seen`: the
    record as the cap's slot just read it (claimed without reading it again)."""
    store = services.run_store()
    # Unique per execution: a claim written twice (after an ambiguous NATS write) is ours,
    # while a duplicate delivery reaching this same process is not.
    worker = f"{WORKER}/{secrets.token_hex(4)}"
    run, taken = store.update(
        run_id, lambda r: runs.claim(r, stage, attempt, worker), "stage.started", seen
    )
    number = taken.number
    tracing.begin_attempt(run, stage, number)  # a span in the run's trace (its record's)
    log.info("run %s: %s attempt %d started", run_id, stage, number)
    arm_lease(run_id, stage, number)
    workdir = settings().workdir / f"{run_id}-{stage}-{number}"
    remove_tree(workdir)
    workdir.mkdir(parents=True)
    log_file = workdir / "stage.log"
    started = time.monotonic()
    watcher = Watcher(run_id, stage, number)
    watcher.start()
    kept = None
    metrics.stage_started(run, stage, taken)  # its wait in the queue; one more in flight
    try:
        held = stage_secrets.load(run, stage)  # this stage's own secrets, and their masker
        # Streamed to S3 while the commands write it (masked, capped: faasci.logs.LiveLog).
        live = LiveLog(log_file, log_key(run_id, stage, number), held.masker)
        with log_file.open("wb") as out, stage_secrets.in_use(held), live, usage.metered() as used:
            outcome, reason, error, cache_report, delivered = _run_commands(
                run, stage, number, workdir, out, watcher, held
            )
        log_file, tail = live.finish(), live.tail  # the whole log, masked and capped
        error = held.masker.text(error)
        # The commands are done: their outcome and log stay on local disk until S3 and NATS
        # take them (faasci.spool), while the watcher keeps the attempt's lease alive. A
        # store that is down or slow only delays the record; it never fails the attempt.
        kept = spool.Kept(workdir.name, log_file, {
            "run_id": run_id, "stage": stage, "attempt": number, "exit_code": outcome.exit_code,
            "cancelled": outcome.cancelled, "reason": reason, "error": error,
            "cache": cache_report, "delivered": delivered,
            "usage": costs.usage_record(run, used.total),
            "log_metadata": live.metadata(), "log_parts": live.sent_parts})  # fmt: skip
        remove_tree(workdir)
        run, following, reason, error, link = store_result(kept)
        hand_on(run_id, following)  # first: the next stage waits on nothing else here
    finally:
        watcher.stop()
        metrics.stage_left(run, stage)
        remove_tree(workdir)
        if kept is not None:
            kept.release()
    downstream.after_stage(run, stage)  # a released library: its dependents' integration runs
    costs.after_attempt(run, stage, number)  # its month's spend, and the budget's alerts
    recorded = run.stage(stage).attempts[number - 1].status
    metrics.stage_finished(run, stage, run.stage(stage).attempts[number - 1], cache_report)
    log.info("run %s: %s attempt %d %s", run_id, stage, number, recorded)
    result = {
        "run_id": run_id,
        "stage": stage,
        "attempt": number,
        "status": recorded,
        "exit_code": outcome.exit_code,
        "reason": reason,
        "error": error,
        "duration_s": round(time.monotonic() - started, 3),
        "log": link,
        "log_tail": tail,
        "commands": len(run.pipeline.stages[stage].run),
        "next": following.stage,
        "retry_in_s": following.delay_s if following.stage == stage else None,
        "cache": cache_report,
        "image": run.stage(stage).attempts[number - 1].image,
        **delivered,
        "run_status": run.status,
    }
    if stage in COMMANDS_ONLY and not delivered:
        result["note"] = COMMANDS_ONLY[stage]
    return result


class Watcher(threading.Thread):
    """Beside a running attempt: writes its heartbeat, and sets `stop_commands` when the run
    is cancelled or the attempt is no longer this worker's (declared lost)."""

    def __init__(self, run_id: str, stage: str, number: int):
        super().__init__(name=f"watch-{run_id}-{stage}", daemon=True)
        self.run_id, self.stage, self.number = run_id, stage, number
        self.stop_commands = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        store, last_beat = services.run_store(), time.monotonic()
        while not self._done.wait(WATCH_S):
            try:
                if time.monotonic() - last_beat >= HEARTBEAT_S:
                    _, alive = store.update(
                        self.run_id,
                        lambda r: runs.heartbeat(r, self.stage, self.number),
                        event=None,
                    )
                    last_beat = time.monotonic()
                else:
                    run = store.get(self.run_id)
                    attempt = run.stage(self.stage).attempts[self.number - 1]
                    alive = attempt.status == "running" and not run.finished
            except Exception as e:  # NATS restarting: the commands go on meanwhile
                log.warning("run %s: watching %s failed: %s", self.run_id, self.stage, e)
                continue
            if not alive:
                log.info("run %s: %s cancelled or taken over; stopping", self.run_id, self.stage)
                self.stop_commands.set()
                return

    def stop(self) -> None:
        self._done.set()


def _run_commands(run: Run, stage: str, number: int, workdir: Path, out, watcher: Watcher,
                  given: stage_secrets.StageSecrets | None = None):  # fmt: skip
    """Check out, restore or set up the dependencies, run the commands in the stage's
    sandbox (with the stage's secrets: `given`), then the stage's delivery step (`_deliver`).
    Returns (outcome, failure reason or None, error line or None, cache report or None,
    what the delivery step records on the attempt: {} when the stage has none)."""
    spec = run.pipeline.stages[stage]
    image = run.image if spec.image == BUILT else spec.image
    if spec.image == BUILT and not image:
        out.write(b"[faas-ci] image: built, but no build of this commit pushed one\n")
        return (shell.Outcome(exit_code=None), "exit", "no image was built for this commit",
                None, {})  # fmt: skip
    box = (ImageSandbox(workdir, run.path, image=image) if image
           else Sandbox(workdir, run.path))  # fmt: skip
    try:
        git.checkout(run.source, run.commit, box.src)
    except git.GitError as e:
        out.write(f"[faas-ci] {e}\n".encode())
        return shell.Outcome(exit_code=None), "infra", str(e), None, {}
    out.write(f"[faas-ci] {run.service} {stage} attempt {number} at {run.commit[:12]}"
              f"{f' in {image}' if image else ''}\n".encode())  # fmt: skip
    if given and given.error:  # named by path, never by value
        out.write(f"[faas-ci] {given.error}\n".encode())
        return shell.Outcome(exit_code=None), given.reason, given.error, None, {}
    report = None
    try:
        env = _command_env(run, stage, number, box)
        with contextlib.ExitStack() as held:  # the cache entry stays ours while in use
            outcome, commands = shell.Outcome(exit_code=0), list(spec.run)
            # A stage of no commands (one that only delivers) needs no dependencies.
            if run.pipeline.cache and spec.cache and spec.run:
                report, outcome = _dependencies(run, spec, box, env, out, watcher, held)
                commands = [*run.pipeline.cache.prepare, *commands]
            if outcome.passed:
                box.prepare()
                # The secrets go to the commands only: not to the cache set-up above,
                # whose result other stages restore.
                if given and given.values:
                    env = {**env, **given.place(box.home, box.workspace / "home")}
                outcome = shell.run_commands(
                    commands, box.launch, env, spec.timeout, out,
                    cancel=watcher.stop_commands, pgid_file=workdir / "pgid",
                )  # fmt: skip
    except OSError as e:
        out.write(f"[faas-ci] cannot run commands: {e}\n".encode())
        return shell.Outcome(exit_code=None), "infra", f"cannot run commands: {e}", report, {}
    report = report and report.model_dump()
    if box.failed():
        return outcome, "infra", "the stage sandbox could not be set up (see the log)", report, {}
    if outcome.cancelled:
        return outcome, "cancelled", "cancelled while running", report, {}
    if outcome.timed_out:
        return (outcome, "timeout", f"timed out after {spec.timeout}s in {outcome.command!r}",
                report, {})  # fmt: skip
    if outcome.exit_code:
        return outcome, "exit", f"{outcome.command!r} exited with {outcome.exit_code}", report, {}
    done = _deliver(run, stage, spec, box, out, watcher, given)  # the commands passed
    return done.outcome, done.reason, done.error, report, done.record


@dataclass
class Delivered:
    """What a stage's delivery step did: its outcome, why it failed, and the fields it sets
    on the attempt's record (runs.Attempt: image, …)."""

    outcome: shell.Outcome = field(default_factory=lambda: shell.Outcome(exit_code=0))
    reason: str | None = None
    error: str | None = None
    record: dict = field(default_factory=dict)


def _deliver(run: Run, stage: str, spec, box: Sandbox, out, watcher: Watcher,
             given: stage_secrets.StageSecrets | None = None) -> Delivered:  # fmt: skip
    """The step a stage takes once its commands pass: the build stage builds, pushes and
    scans the image (`docker`), promote writes it into an environment repository
    (`gitops`), deploy rolls it out (`openfaas`, `argocd`). Other stages deliver nothing."""
    if stage == "build" and spec.docker:
        return _build_image(run, spec, box, out, watcher)
    if stage == "deploy" and (spec.openfaas or spec.argocd):
        return _deploy(run, spec, out, watcher, given.values if given else {})
    if stage == "promote" and spec.gitops:
        return _promote(run, spec, box, out, watcher)
    return Delivered()


def _promote(run: Run, spec, box: Sandbox, out, watcher: Watcher) -> Delivered:
    """Write the run's image into the environment repository its ref picks, after an admin's
    approval where that environment asks for one (faasci.gitops)."""

    def say(line: str) -> None:
        out.write(f"[faas-ci] {line}\n".encode())
        out.flush()

    try:
        done = gitops.run_promotion(run, spec.gitops, spec.timeout, say, watcher.stop_commands,
                                    scratch=box.attempt)  # fmt: skip
    except (gitops.PromotionFailed, git.GitError) as e:
        reason = getattr(e, "reason", "infra")
        say(str(e))
        failed = shell.Outcome(exit_code=None, timed_out=reason == "timeout",
                               cancelled=reason == "cancelled", command="gitops")  # fmt: skip
        return Delivered(failed, reason, str(e))
    return Delivered(record={"promotion": done.model_dump(mode="json")})


def _deploy(run: Run, spec, out, watcher: Watcher, secrets: dict[str, str]) -> Delivered:
    """Roll the run's image out to the stage's target and wait until it is healthy there
    (faasci.rollout), with the stage's own `secrets` (already loaded for its commands); its
    `deployment` is recorded whatever happened. A run whose promote stage promoted nothing
    (its ref matches no environment) rolls nothing out either."""
    promote = next((s for s in run.stages if s.name == "promote" and s.attempts), None)
    if promote and (promote.attempts[-1].promotion or {}).get("environment", "") is None:
        out.write(f"[faas-ci] ref {run.ref} was promoted to no environment: nothing is rolled "
                  "out\n".encode())  # fmt: skip
        return Delivered(record={"deployment": None})
    done = rollout.deploy(run, spec, out, watcher.stop_commands, lambda: secrets)
    record = rollout.to_record(done)
    if done.healthy:
        return Delivered(record=record)
    failed = shell.Outcome(exit_code=None, cancelled=done.reason == "cancelled", command="deploy")
    return Delivered(failed, done.reason, done.error, record)


def _build_image(run: Run, spec, box: Sandbox, out, watcher: Watcher) -> Delivered:
    """Build and push the service's image (faasci.images)."""
    repository = images.repository_for(run.service, spec.docker)
    try:
        pushed = images.build_and_push(spec.docker, box.src / run.path, repository, run.commit,
                                       out, spec.timeout, watcher.stop_commands)  # fmt: skip
    except images.BuildFailed as e:
        out.write(f"[faas-ci] {e}\n".encode())
        failed = shell.Outcome(
            exit_code=None,
            timed_out=e.reason == "timeout",
            cancelled=e.reason == "cancelled",
            command="docker build",
        )
        return Delivered(failed, e.reason, str(e))
    return _scan_image(run, spec, box, out, watcher, {"image": pushed.ref})


def _scan_image(run: Run, spec, box: Sandbox, out, watcher: Watcher, record: dict) -> Delivered:
    """The Trivy gate on the pushed image (faasci.scan), unless the pipeline turned it off:
    a blocked image fails the stage as `blocked` (never retried), a scan that cannot run as
    `infra`."""
    gate = scan.effective(spec.scan)
    if not gate.enabled:
        out.write(b"[faas-ci] scan: false: the image is not scanned\n")
        return Delivered(record=record)
    try:
        found = scan.gate(record["image"], run.service, run.id, run.commit, gate,
                          box.attempt / "scan", out, min(spec.timeout, scan.SCAN_TIMEOUT_S),
                          watcher.stop_commands)  # fmt: skip
    except scan.Blocked as e:
        return Delivered(shell.Outcome(exit_code=None, command="trivy"), scan.BLOCKED, str(e),
                         {**record, "scan": e.record})  # fmt: skip
    except scan.ScanError as e:
        out.write(f"[faas-ci] {e}\n".encode())
        failed = shell.Outcome(exit_code=None, timed_out=e.reason == "timeout",
                               cancelled=e.reason == "cancelled", command="trivy")  # fmt: skip
        return Delivered(failed, e.reason, str(e), record)
    return Delivered(record={**record, "scan": found})


def _dependencies(
    run: Run, spec, box: Sandbox, env: dict[str, str], out, watcher: Watcher,
    held: contextlib.ExitStack,
) -> tuple[cache.CacheReport, shell.Outcome]:  # fmt: skip
    """Put the dependency cache in place: restored (overlay-mounted from the node-local
    layer, filled from S3 when the node lacks it), or made by the set-up, under its own
    timeout, and kept."""

    def say(line: str) -> None:
        out.write(f"[faas-ci] {line}\n".encode())
        out.flush()

    cspec, real_dir = run.pipeline.cache, box.src / run.path
    key = cache.compute_key(
        cache.namespace_of(run.repo), cspec, cache.manifests_in_dir(cspec, real_dir),
        cache.stage_runtime(env["PATH"], settings().workspace, spec.image),
    )  # fmt: skip
    node = services.node_cache()
    entry = held.enter_context(node.use(key))
    report = cache.CacheReport(key=key.value, hit=entry is not None)
    if entry is not None:
        report.source, report.restored_bytes = entry.source, entry.restored_bytes
        report.restore_s = entry.restore_s
        say(f"cache hit {key.value[:12]} ({entry.source}, {entry.restore_s * 1000:.0f} ms)")
    else:
        report.reason = node.miss_reason(key)
        say(f"cache miss {key.value[:12]} ({report.reason}): running the set-up")
        box.prepare()
        started = time.monotonic()
        outcome = shell.run_commands(
            cspec.setup, box.launch, env, cspec.setup_timeout, out,
            cancel=watcher.stop_commands, pgid_file=box.attempt / "pgid",
        )  # fmt: skip
        report.setup_s = round(time.monotonic() - started, 3)
        if not outcome.passed:
            return report, outcome
        # Kept on this node at once; the upload to S3 goes on while the commands run.
        entry = node.adopt(key, {"work": real_dir, "home": box.home}, cspec.paths,
                           service=run.service, repo=run.repo, wait=False)  # fmt: skip
        held.callback(_saved, entry, report)
        invalidation.request_check(run)  # a new key: what no branch needs any more can go
        say(f"cache kept {key.value[:12]} on this node ({entry.size} bytes); uploading")
    roots = {"work": real_dir, "home": box.home}
    box.overlays = [
        Overlay(entry.path(path), roots[root] / rel)
        for path in cspec.paths
        for root, rel in [cache.split_path(path)]
        if entry.path(path).is_dir()
    ]
    for path in cspec.paths:  # a cached file (not a folder) is copied in
        root, rel = cache.split_path(path)
        if entry.path(path).is_file():
            (roots[root] / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(entry.path(path), roots[root] / rel)
    return report, shell.Outcome(exit_code=0)


def _saved(entry, report: cache.CacheReport) -> None:
    """Once the commands are done: wait for the cache's upload, for the record."""
    entry.wait_saved()
    report.saved_bytes, report.save_s = entry.saved_bytes, entry.save_s


def _command_env(run: Run, stage: str, number: int, box: Sandbox) -> dict[str, str]:
    """A clean environment: the project's tools, never faas-ci's own interpreter, packages,
    settings or secrets."""
    return {
        "PATH": stage_path(box.service_dir, box.system_path()),
        "HOME": str(box.workspace / "home"),
        "LANG": "C.UTF-8",
        **run.pipeline.env,
        "CI": "true",
        "FAASCI": "true",
        "FAASCI_RUN_ID": run.id,
        "FAASCI_SERVICE": run.service,
        "FAASCI_STAGE": stage,
        "FAASCI_ATTEMPT": str(number),
        "FAASCI_COMMIT": run.commit,
        "FAASCI_REF": run.ref,
        "FAASCI_WORKSPACE": str(box.workspace / "src"),
        **({"FAASCI_IMAGE": run.image} if run.image else {}),
    }


def store_result(kept: spool.Kept) -> tuple[Run, Next, str | None, str | None, str | None]:
    """Store a finished attempt's log, then record its end, each tried until the stores
    take it (within FAASCI_STORE_PATIENCE_S). (run, what follows, reason, error, log link):
    a log that could not be stored makes the attempt failed as `infra`."""
    done = kept.outcome
    run_id, stage, number = done["run_id"], done["stage"], done["attempt"]
    key, link = log_key(run_id, stage, number), log_link(run_id, stage, number)
    reason, error = done["reason"], done["error"]
    until = time.monotonic() + spool.patience_s()
    try:  # a log that would overfill the spool is tried once, not kept
        spool.persist(f"run {run_id}: storing the log of {stage}",
                      lambda: services.objects().put_file(key, kept.log,
                                                          metadata=done["log_metadata"]),
                      time.monotonic() if kept.over_bound else until)  # fmt: skip
    except spool.GaveUp as e:  # the log is the record of what happened: losing it is infra
        log.error("run %s: %s", run_id, e)
        full = " (the local spool is full)" if kept.over_bound else ""
        reason, error = "infra", f"storing the log failed{full}: {e.__cause__}"
        key = link = None
    if key and done.get("log_parts", True):  # (an entry spooled before the field: look)
        discard_parts(key)
    status = "cancelled" if done["cancelled"] else ("passed" if reason is None else "failed")
    run, following = _record_end(
        run_id, stage, number, until,
        lambda r: runs.finish(r, stage, number, status=status, exit_code=done["exit_code"],
                              reason=reason, error=error, log=link, log_key=key,
                              cache=done["cache"], delivered=done.get("delivered"),
                              usage=done.get("usage")),
    )  # fmt: skip
    return run, following, reason, error, link


def recover_spooled() -> None:
    """Store and record what a dead process of this function finished and kept in its
    spool (killed while the stores were away), then hand the run on; in the background.
    An attempt its lease has meanwhile recorded lost stays lost (`finish` does nothing)."""
    for kept in spool.left_behind():
        threading.Thread(target=_recover, args=(kept,), name=f"recover-{kept.dir.name}",
                         daemon=True).start()  # fmt: skip


def _recover(kept: spool.Kept) -> None:
    try:
        log.info("storing the result %s left by a process that died", kept.dir.name)
        run_id = kept.outcome["run_id"]
        run, following, *_ = store_result(kept)
        hand_on(run_id, following)
        downstream.after_stage(run, kept.outcome["stage"])  # as execute does
        costs.after_attempt(run, kept.outcome["stage"], kept.outcome["attempt"])
        kept.release()
    except Exception as e:  # kept for the next start, until the spool's sweep
        log.error("storing the result %s failed: %s", kept.dir.name, e)


def remove_tree(path: Path) -> None:
    """rmtree that also takes the mode-0 folders overlayfs leaves in its work folders."""

    def unlock(func, failed, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            os.chmod(failed, 0o700)
            shutil.rmtree(failed) if os.path.isdir(failed) else os.unlink(failed)

    if path.exists():
        shutil.rmtree(path, onerror=unlock)


ATTEMPT_DIR_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}-[a-z]+-[0-9]+$")


def sweep_workdirs() -> None:
    """Remove attempt folders no process works in any more. A function's process runs
    alone on its scratch disk (a pod's emptyDir, a local function's own folder), so at its
    start every attempt folder there is one a dead process left; the spool is kept."""
    root = settings().workdir
    for path in root.iterdir() if root.is_dir() else ():
        if path.is_dir() and ATTEMPT_DIR_RE.match(path.name):
            log.info("removing %s, left by a process that died", path)
            remove_tree(path)


# Handing on: every path out of an attempt goes through here.

HANDOFF_GRACE_S = 60  # a hand-off the gateway accepted is claimed well within this
SEEN_MAX_BYTES = 64 * 1024  # a larger record is not sent along: the stage reads it
HANDOFF_BACKOFF_MAX_S = 30  # while the gateway refuses: how often the guard tries again


def hand_on(run_id: str, following: Next, patient: bool = True) -> None:
    """Invoke what follows a recorded attempt. A failure is logged, not raised: the result
    is recorded and the attempt's hand-off guard invokes the successor once the gateway
    takes it. `patient` retries for ~30 s here (a short blip costs no guard delay)."""
    if following.stage and following.attempt > 1:  # a retry (a first attempt is a hand-off)
        try:  # recorded, but never at the cost of the retry itself
            audit.record("stage.retry", run=run_id, detail={"stage": following.stage,
                         "attempt": following.attempt, "delay_s": following.delay_s})  # fmt: skip
        except Exception as e:
            log.error("run %s: recording the retry of %s failed: %s", run_id, following.stage, e)
    try:
        if following.stage and following.delay_s > 0:
            stage, attempt = following.stage, following.attempt
            timers.schedule(services.bus(), "dispatch",
                            {"run_id": run_id, "stage": stage, "attempt": attempt},
                            following.delay_s, f"{run_id}.{stage}.{attempt}.due")  # fmt: skip
        elif following.stage:
            dispatch(run_id, following.stage, following.attempt, patient)
        if following.notify:
            _invoke("notifier", {"run_id": run_id}, f"{run_id}.notify", patient)
    except Exception as e:
        log.warning("run %s: handing on failed (%s); its hand-off guard will retry", run_id, e)


def hand_to_first(run_id: str, first_stage: str) -> None:
    """Hand a new run (its record written) to its first stage, guarded like any hand-off."""
    guard_handoff(run_id, None, 0)
    hand_on(run_id, Next(stage=first_stage))


def guard_handoff(run_id: str, stage: str | None, number: int) -> None:
    """Arm the durable timer that makes sure what follows attempt `number` of `stage` (None:
    the run's start) happens, where no lease timer does: at a run's start, and for an
    attempt its lease declared lost. Armed before the change is recorded, so no crash or
    outage between recording and invoking can lose the successor; when it fires it acts on
    the record alone (on_handoff_timer). Best effort: a failure to arm it is logged, and
    the immediate invocation still goes on."""
    try:
        _arm_handoff(run_id, stage, number)
    except Exception as e:
        log.error("run %s: arming the hand-off guard of %s failed: %s", run_id, stage, e)


def _arm_handoff(run_id: str, stage: str | None, number: int) -> None:
    timer_id = f"{run_id}.{stage or 'start'}.{number}.handoff"
    timers.schedule(services.bus(), "handoff",
                    {"run_id": run_id, "stage": stage, "attempt": number},
                    HANDOFF_GRACE_S, timer_id)  # fmt: skip


def _record_end(run_id: str, stage: str, number: int, until: float, change) -> tuple[Run, Next]:
    """Record the attempt's end (`change`), tried again with back-off until NATS takes it,
    for as long as an outage lasts up to `until` (monotonic); `finish` applied twice does
    nothing more. Its hand-off is guarded by the attempt's lease timer, armed at its start
    (on_lease_timer). Meanwhile the worker's watcher keeps the attempt's heartbeat, so its
    lease holds (see on_lease_timer for an outage both sides see). Past `until` this raises
    spool.GaveUp: the worker stops its heartbeat and the lease timer records the attempt
    lost once NATS is back, as for a worker that died."""

    def once() -> tuple[Run, Next]:
        return services.run_store().update(run_id, change, "stage.finished")

    return spool.persist(f"run {run_id}: recording the end of {stage} attempt {number}",
                         once, until)  # fmt: skip


def dispatch(run_id: str, stage: str, attempt: int, patient: bool = True) -> None:
    """Invoke a stage asynchronously. The call id is derived from the attempt, so the
    gateway's queue drops a repeated dispatch of the same attempt; one that gets through
    anyway finds its attempt claimed and does nothing."""
    _invoke(stage, handoff_body(run_id, attempt), f"{run_id}.{stage}.{attempt}", patient)


def handoff_body(run_id: str, attempt: int) -> dict:
    """A stage's invocation, with the run's record as this process last wrote or read it
    (its revision beside it), so the stage claims its attempt without reading it first
    (faasci.api._handed_record): the claim's compare-and-set on that revision holds only
    while it is the newest, and reads the record anew otherwise."""
    body: dict = {"run_id": run_id, "attempt": attempt}
    known = services.run_store().known(run_id)
    if known and len(known[0]) <= SEEN_MAX_BYTES:
        body["seen"] = {"revision": known[1], "record": known[0].decode()}
    return body


def _invoke(function: str, body: dict, call_id: str, patient: bool) -> None:
    if patient:
        invoke_with_retries(function, body, call_id)
    else:  # a timer: it backs off itself, and must answer within its ack wait
        services.gateway().call_async(function, body, call_id=call_id)


def invoke_with_retries(function: str, body: dict, call_id: str) -> None:
    for wait in (0.5, 1, 2, 4, 8, 15, None):
        try:
            services.gateway().call_async(function, body, call_id=call_id)
            return
        except InvocationError as e:
            if wait is None:
                raise
            log.warning("invoking %s (%s) failed: %s; retrying", function, call_id, e)
            time.sleep(wait)


def arm_lease(run_id: str, stage: str, number: int) -> None:
    timers.schedule(services.bus(), "lease", {"run_id": run_id, "stage": stage, "attempt": number},
                    LEASE_S, f"{run_id}.{stage}.{number}.lease")  # fmt: skip


# Timer handlers (run by the timers function).


def on_dispatch_timer(timer: dict) -> float | None:
    """A retry's back-off has passed: invoke the attempt, unless it is no longer owed."""
    return _invoke_owed(timer["run_id"], timer["stage"], timer["attempt"] - 1, grace_s=0)


def on_handoff_timer(timer: dict, run: Run | None = None) -> float | None:
    """A hand-off's guard: while the record (`run`, or read) says its successor is owed and
    nobody claimed it HANDOFF_GRACE_S after it was due, invoke it again, backing off while
    the gateway refuses. Done once it is claimed (a duplicate finds its attempt taken) or
    not owed. An attempt's lease timer goes on as its guard; a run's start has its own."""
    return _invoke_owed(timer["run_id"], timer["stage"], timer["attempt"], HANDOFF_GRACE_S, run)


def _invoke_owed(run_id: str, stage: str | None, number: int, grace_s: float,
                 run: Run | None = None) -> float | None:  # fmt: skip
    try:
        run = run or services.run_store().get(run_id)
    except NotFound:
        return None
    owed = runs.owed_after(run, stage, number)
    if owed.unrecorded:  # its worker, or else its lease timer, records the end
        return LEASE_S
    if owed.function is None:
        return None
    overdue = (runs.now() - owed.since).total_seconds() - grace_s
    if overdue < 0:
        return -overdue + 1
    if grace_s and caps.waiting(run, owed.function, owed.attempt):  # queued for a slot: alive
        return HANDOFF_GRACE_S
    if grace_s:
        log.warning("run %s: %s (attempt %d) not started %.0fs after its hand-off; invoking it",
                    run_id, owed.function, owed.attempt, overdue + grace_s)  # fmt: skip
        metrics.stuck(run, owed.function, "handoff")
    try:
        if owed.function == "notifier":
            _invoke("notifier", {"run_id": run_id}, f"{run_id}.notify", patient=False)
        else:
            dispatch(run_id, owed.function, owed.attempt, patient=False)
    except InvocationError as e:
        delay = min(HANDOFF_BACKOFF_MAX_S, 5 + overdue / 10)
        log.warning("run %s: invoking %s failed (%s); again in %.0fs", run_id, owed.function,
                    e, delay)  # fmt: skip
        return delay
    # The guard looks again later: claimed by then, or invoked once more. A retry's timer
    # is done: the failed attempt's guard watches its successor.
    return HANDOFF_GRACE_S if grace_s else None


def on_lease_timer(timer: dict) -> float | None:
    """Is the attempt's worker alive? Look again later while it is; record it lost when its
    heartbeat has been silent for LEASE_S, and hand the run on. Once the attempt has ended
    the timer is its hand-off's guard (on_handoff_timer): armed at the attempt's start, it
    was in place before the end was recorded, so no crash or outage between recording and
    invoking loses the successor, and one timer per attempt does both."""
    run_id, stage, number = timer["run_id"], timer["stage"], timer["attempt"]
    run = services.run_store().get(run_id)
    attempt = run.stage(stage).attempts[number - 1]
    if attempt.status != "running":
        return on_handoff_timer(timer, run)
    silent = runs.now() - (attempt.heartbeat_at or attempt.started_at)
    # While NATS is away no worker can write a heartbeat (nor this timer run), so silence
    # then says nothing about the worker: it counts only from when NATS was last reachable
    # here. A worker still alive (running commands, or holding its result until the stores
    # take it: faasci.spool) writes a heartbeat within HEARTBEAT_S of NATS coming back, well
    # within LEASE_S; a dead one is declared lost LEASE_S after.
    reachable = timedelta(seconds=time.monotonic() - services.bus().up_since)
    if min(silent, reachable) < timedelta(seconds=LEASE_S):
        return LEASE_S - min(silent, reachable).total_seconds() + 1
    log.warning("run %s: %s attempt %d lost (%s)", run_id, stage, number, attempt.worker)
    metrics.stuck(run, stage, "lost")
    guard_handoff(run_id, stage, number)  # as a worker does before recording the end

    def lose(r: Run) -> Next:  # compare-and-set: a heartbeat or the worker's record landing
        now = r.stage(stage).attempts[number - 1]  # first wins, and nothing is lost then
        if now.status == "running" and now.heartbeat_at != attempt.heartbeat_at:
            raise _SpokeMeanwhile
        return runs.lose(r, stage, number, silent.total_seconds())

    try:
        _, following = services.run_store().update(run_id, lose, "stage.lost")
    except _SpokeMeanwhile:
        return LEASE_S
    hand_on(run_id, following, patient=False)
    return None


class _SpokeMeanwhile(Exception):
    """The attempt's worker wrote a heartbeat after the lease timer read it silent."""
