"""An attempt's outcome and log, kept on the worker's local disk until S3 and NATS accept them.

A stage's commands are done; storing what they did must not be what fails them. The log is
moved out of the attempt's workdir into the spool (beside the outcome, as JSON, for an
operator to find), and the worker keeps trying, with back-off, to upload the log and to
record the result, while its watcher keeps the attempt's heartbeat (its lease) alive.

Bounded twice: by time (FAASCI_STORE_PATIENCE_S, 30 minutes by default: then the attempt is
given up as lost, with its reason) and by disk (FAASCI_SPOOL_MAX_BYTES, 2 GiB by default:
a log that would take the spool past it is tried once and, failing that, the attempt is
recorded failed with that reason instead of being kept).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import UserError
from .settings import settings

log = logging.getLogger("faasci.spool")

T = TypeVar("T")
DEFAULT_PATIENCE_S = 1800
DEFAULT_MAX_BYTES = 2 << 30
BACKOFF_S = (1, 2, 4, 8)  # then every BACKOFF_S[-1] seconds


class GaveUp(Exception):
    """Not stored within the bound; the last error is the cause."""


def patience_s() -> float:
    return float(os.environ.get("FAASCI_STORE_PATIENCE_S") or DEFAULT_PATIENCE_S)


def max_bytes() -> int:
    return int(os.environ.get("FAASCI_SPOOL_MAX_BYTES") or DEFAULT_MAX_BYTES)


def directory() -> Path:
    return settings().workdir / "spool"


def used_bytes() -> int:
    """The spool's size. Other attempts' entries come and go meanwhile: os.walk skips a
    folder removed under it, where Path.glob raises."""
    total = 0
    for folder, _, names in os.walk(directory()):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(folder, name)).st_size
    return total


class Kept:
    """One attempt's spool entry: `log` (the file) and `outcome` beside it (outcome.json)."""

    def __init__(self, name: str, log_file: Path | None, outcome: dict):
        self.dir, self.outcome = directory() / name, outcome
        self.log = self.dir / "stage.log"
        if log_file is not None:  # a new entry (else one found: left_behind)
            _sweep()
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.move(log_file, self.log)  # a rename: the spool is beside the workdirs
            scratch = self.dir / "outcome.json.tmp"  # whole or absent, for left_behind
            scratch.write_text(json.dumps(outcome, default=str))
            scratch.rename(self.dir / "outcome.json")
        self.over_bound = used_bytes() > max_bytes()  # this log included

    def release(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def left_behind() -> list[Kept]:
    """The entries in the spool, when no process of this function is running (at its
    start): results a dead process had not stored yet."""
    found = []
    for entry in sorted(directory().glob("*/outcome.json")):
        try:
            outcome = json.loads(entry.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s cannot be read (%s); left for the sweep", entry, e)
            continue
        kept = Kept(entry.parent.name, None, outcome)
        if kept.log.is_file():
            found.append(kept)
    return found


def _sweep() -> None:
    """Entries a dead worker left: older than any worker keeps trying."""
    oldest = time.time() - 2 * patience_s()
    for entry in directory().glob("*"):
        with contextlib.suppress(OSError):
            if entry.stat().st_mtime < oldest:
                shutil.rmtree(entry, ignore_errors=True)


def persist(what: str, attempt: Callable[[], T], deadline: float) -> T:
    """`attempt()` until it succeeds (it must be safe to repeat), backing off; GaveUp once
    `deadline` (monotonic) has passed. A UserError (a 4xx: the run is
    gone) is no outage and is raised at once."""
    tries = 0
    while True:
        try:
            return attempt()
        except UserError:
            raise
        except Exception as e:
            wait = BACKOFF_S[min(tries, len(BACKOFF_S) - 1)]
            tries += 1
            if time.monotonic() + wait > deadline:
                raise GaveUp(f"{what}: {e}") from e
            log.warning("%s failed (%s: %s); trying again in %ds (try %d)", what,
                        type(e).__name__, e, wait, tries)  # fmt: skip
            time.sleep(wait)
