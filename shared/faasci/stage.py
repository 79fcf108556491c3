"""Executing one attempt of one stage of a run, and handing the run on.

claim the attempt → check out the commit → run the commands → store the log in S3 →
record the result → invoke what follows asynchronously, with only references in the body.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from . import git, runs, services, shell
from .invoke import InvocationError
from .runs import Run
from .settings import settings

log = logging.getLogger("faasci.stage")

WORKER = f"{socket.gethostname()}:{os.getpid()}"
LOG_TAIL_CHARS = 4000
# Stages whose integrations (image build, GitOps, rollout) are not wired in yet say so.
COMMANDS_ONLY = {
    "build": "ran the configured commands; no image was built (not integrated yet)",
    "promote": "ran the configured commands; nothing was promoted (GitOps is not integrated yet)",
    "deploy": "ran the configured commands; nothing was rolled out (not integrated yet)",
}


def log_key(run_id: str, stage: str, attempt: int) -> str:
    return f"logs/{run_id}/{stage}/{attempt}.log"


def log_link(run_id: str, stage: str, attempt: int) -> str:
    return f"{settings().public_url}/function/pipeline-log/{run_id}/{stage}/{attempt}"


def execute(run_id: str, stage: str, attempt: int | None = None) -> dict:
    """Run one attempt of `stage`; Conflict when it is not this caller's to run."""
    store = services.run_store()
    run, taken = store.update(
        run_id, lambda r: runs.claim(r, stage, attempt, WORKER), "stage.started"
    )
    number = taken.number
    log.info("run %s: %s attempt %d started", run_id, stage, number)
    workdir = settings().workdir / f"{run_id}-{stage}-{number}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    log_file = workdir / "stage.log"
    started = time.monotonic()
    try:
        with log_file.open("wb") as out:
            outcome, reason, error = _run_commands(run, stage, number, workdir, out)
        tail = _tail(log_file)
        key, link = log_key(run_id, stage, number), log_link(run_id, stage, number)
        try:
            services.objects().put_file(key, log_file)
        except Exception as e:  # the log is the record of what happened: losing it is infra
            log.error("run %s: storing the log of %s failed: %s", run_id, stage, e)
            reason, error, key, link = "infra", f"storing the log failed: {e}", None, None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    run, following = store.update(
        run_id,
        lambda r: runs.finish(
            r,
            stage,
            number,
            passed=outcome.passed and reason is None,
            exit_code=outcome.exit_code,
            reason=reason,
            error=error,
            log=link,
            log_key=key,
        ),
        "stage.finished",
    )
    if following.stage:
        dispatch(run_id, following.stage, following.attempt)
    status = run.stage(stage).attempts[number - 1].status
    log.info("run %s: %s attempt %d %s", run_id, stage, number, status)
    result = {
        "run_id": run_id,
        "stage": stage,
        "attempt": number,
        "status": status,
        "exit_code": outcome.exit_code,
        "reason": reason,
        "error": error,
        "duration_s": round(time.monotonic() - started, 3),
        "log": link,
        "log_tail": tail,
        "commands": len(run.pipeline.stages[stage].run),
        "next": following.stage,
        "run_status": run.status,
    }
    if stage in COMMANDS_ONLY:
        result["note"] = COMMANDS_ONLY[stage]
    return result


def _run_commands(run: Run, stage: str, number: int, workdir: Path, out):
    """Check out and run; returns (outcome, failure reason or None, error line or None)."""
    spec = run.pipeline.stages[stage]
    checkout = workdir / "src"
    try:
        git.checkout(run.source, run.commit, checkout)
    except git.GitError as e:
        out.write(f"[faas-ci] {e}\n".encode())
        return shell.Outcome(exit_code=None), "infra", str(e)
    out.write(f"[faas-ci] {run.service} {stage} attempt {number} at {run.commit[:12]}\n".encode())
    cwd = checkout / run.path
    home = workdir / "home"
    home.mkdir()
    try:
        outcome = shell.run_commands(
            spec.run, cwd, _command_env(run, stage, number, home), spec.timeout, out
        )
    except OSError as e:  # e.g. the service folder is missing at this commit
        out.write(f"[faas-ci] cannot run commands: {e}\n".encode())
        return shell.Outcome(exit_code=None), "infra", f"cannot run commands: {e}"
    if outcome.timed_out:
        return outcome, "timeout", f"timed out after {spec.timeout}s in {outcome.command!r}"
    if outcome.exit_code:
        return outcome, "exit", f"{outcome.command!r} exited with {outcome.exit_code}"
    return outcome, None, None


def _command_env(run: Run, stage: str, number: int, home: Path) -> dict[str, str]:
    """A clean environment: the function's own settings and secrets never reach commands."""
    tools = os.path.dirname(sys.executable)  # python, pytest and ruff of this installation
    return {
        "PATH": f"{tools}:{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}",
        "HOME": str(home),
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
    }


def _tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(path.stat().st_size - LOG_TAIL_CHARS, 0))
        return f.read().decode(errors="replace")


def dispatch(run_id: str, stage: str, attempt: int) -> None:
    """Invoke a stage asynchronously. The call id is derived from the attempt, so the
    gateway's queue drops a repeated dispatch of the same attempt."""
    body = {"run_id": run_id, "attempt": attempt}
    call_id = f"{run_id}.{stage}.{attempt}"
    for wait in (0.5, 1, 2, 4, 8, None):
        try:
            services.gateway().call_async(stage, body, call_id=call_id)
            return
        except InvocationError as e:
            if wait is None:
                raise
            log.warning("run %s: dispatching %s failed (%s); retrying", run_id, stage, e)
            time.sleep(wait)
