"""Concurrency caps with burst: at most `concurrency` stage executions of a service run at
once (faasci.limits), or of the whole namespace with FAASCI_CAP_SCOPE=namespace (the
defaults' limits then; `off` caps nothing). When demand goes over the cap a burst lets up to
`burst` run for `burst_window_s`; then the cap holds again, and the next burst may start
only after as long again at the cap (the cool-down: a service spends at most half of any
busy period bursting). Executions a burst let in finish; only new ones wait.

Work over the cap waits instead of failing: the stage's invocation holds a ticket in the
service's queue, first come first served, and its attempt is claimed only once it holds a
slot. Until then its record stays `queued`, so its queue wait (started_at - queued_at)
includes the wait for a slot, and a cancelled run's waiter leaves the queue.

The ledger is one entry per scope in the NATS KV bucket `faasci-caps` (key `service.<name>`
or `namespace`): holders and waiters, each with its worker and the end of its lease, the
next ticket number and the current burst's window. Every change is a compare-and-set on the
entry's revision, so processes on any node agree; taking a free slot is one read and one
write, as is giving it back. A holder's lease is renewed every REFRESH_S by its process (one
write per scope for all the slots it holds); a waiter renews its own while it waits. A
killed worker's lease runs out after LEASE_S, and the next change of the ledger drops it.
Waiters hear of every change (a plain NATS subscription on the bucket's subjects carries the
new ledger), so a freed slot is taken within a round trip, and look again every POLL_S.

A waiting invocation holds a request of its function (of-watchdog's max_inflight, the
template's THREADS), which is why stack.yml sizes those above the burst. The hand-off guard
(faasci.stage) leaves an attempt that waits here be (`waiting`); a duplicate invocation of
it gets 409 (Taken), like a duplicate of a claimed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel

from . import limits as limits_store
from . import services
from .bus import compare_and_set
from .errors import Conflict, NotFound
from .limits import Limits

if TYPE_CHECKING:
    from .runs import Run

T = TypeVar("T")
log = logging.getLogger("faasci.caps")

BUCKET = "faasci-caps"
LEASE_S = 30.0  # as faasci.stage.LEASE_S: a holder or waiter silent this long is gone
REFRESH_S = 5.0  # as faasci.stage.HEARTBEAT_S: how often a live one renews its lease
POLL_S = 1.0  # a waiter looks again at least this often, besides every change it hears of
RUN_CHECK_S = 2.0  # and at its run this often: a run cancelled meanwhile leaves the queue
PATIENCE_S = 120  # as the run store: a NATS restart is waited out
RELEASE_PATIENCE_S = 10  # giving a slot back: past this its lease frees it
SCOPES = ("service", "namespace", "off")


class Entry(BaseModel):
    w: str  # the worker: host:pid/token, unique per execution
    exp: float  # when its lease ends (seconds since the epoch)
    n: int = 0  # a waiter's ticket: the lowest goes first


class Ledger(BaseModel):
    next: int = 1  # the next ticket
    holders: dict[str, Entry] = {}  # "<run>.<stage>.<attempt>" -> its holder
    waiters: dict[str, Entry] = {}
    burst_from: float | None = None  # the last burst's window (seconds since the epoch)
    burst_until: float | None = None


class Taken(Conflict):
    """Another live worker holds, or waits for, a slot for this same attempt (a duplicate
    invocation): this one does nothing."""


# The ledger's rules: pure functions of (ledger, now), tested without NATS.


def in_burst(ledger: Ledger, now: float) -> bool:
    return ledger.burst_until is not None and (ledger.burst_from or 0) <= now < ledger.burst_until


def limit_at(ledger: Ledger, limits: Limits, now: float) -> int:
    """How many may hold a slot now: the burst while its window lasts, else the cap."""
    return max(limits.burst, limits.concurrency) if in_burst(ledger, now) else limits.concurrency


def may_burst(ledger: Ledger, limits: Limits, now: float) -> bool:
    """Can a burst start now: one is allowed, none is on, and the last one's cool-down (as
    long as its window) is over."""
    if limits.burst <= limits.concurrency or limits.burst_window_s <= 0 or in_burst(ledger, now):
        return False
    return ledger.burst_until is None or now >= ledger.burst_until + limits.burst_window_s


def prune(ledger: Ledger, now: float) -> bool:
    """Drop holders and waiters whose lease has run out (their worker died); True if any."""
    gone = [k for k, e in ledger.holders.items() if e.exp < now]
    gone_waiting = [k for k, e in ledger.waiters.items() if e.exp < now]
    for k in gone:
        del ledger.holders[k]
    for k in gone_waiting:
        del ledger.waiters[k]
    return bool(gone or gone_waiting)


def take(ledger: Ledger, key: str, worker: str, limits: Limits, now: float,
         lease_s: float | None = None) -> tuple[bool, bool]:  # fmt: skip
    """Ask for a slot for `key` (an attempt) as `worker`: (held, changed). Held: the slot is
    ours. Otherwise our ticket is in the queue (kept at its place when we ask again, or when
    a worker taking over from a dead one asks). `changed`: the ledger must be written.
    Raises Taken when another live worker holds or waits for `key`."""
    lease_s = lease_s or LEASE_S
    for entries in (ledger.holders, ledger.waiters):
        other = entries.get(key)
        if other and other.w != worker and other.exp >= now:
            raise Taken(f"attempt {key} already holds or waits for a slot ({other.w})",
                        field="attempt")  # fmt: skip
    mine = ledger.holders.get(key)
    if mine and mine.w == worker:  # our own earlier write (an ambiguous one, repeated)
        return True, False
    ledger.holders.pop(key, None)  # a dead worker's: ours now
    waiting = ledger.waiters.pop(key, None)
    pruned = prune(ledger, now)
    ticket = waiting.n if waiting else ledger.next
    if not waiting:
        ledger.next += 1
    ahead = sum(1 for e in ledger.waiters.values() if e.n < ticket)
    started = False
    if len(ledger.holders) + ahead + 1 > limits.concurrency and may_burst(ledger, limits, now):
        ledger.burst_from, ledger.burst_until = now, now + limits.burst_window_s
        started = True
    if len(ledger.holders) + ahead < limit_at(ledger, limits, now):
        ledger.holders[key] = Entry(w=worker, exp=now + lease_s)
        return True, True
    due = not waiting or waiting.w != worker or waiting.exp - now < lease_s - REFRESH_S
    if not (due or pruned or started):  # still waiting, nothing new to write
        ledger.waiters[key] = waiting
        return False, False
    ledger.waiters[key] = Entry(w=worker, exp=now + lease_s, n=ticket)
    return False, True


def release(ledger: Ledger, key: str, worker: str, now: float) -> tuple[None, bool]:
    """Give up `worker`'s slot or ticket for `key`: (None, changed)."""
    changed = False
    for entries in (ledger.holders, ledger.waiters):
        entry = entries.get(key)
        if entry and entry.w == worker:
            del entries[key]
            changed = True
    return None, prune(ledger, now) or changed


def renew(ledger: Ledger, held: dict[str, str], now: float,
          lease_s: float | None = None) -> tuple[None, bool]:  # fmt: skip
    """Renew the leases of the slots a process holds ({key: worker}). A slot dropped while
    NATS was away (its lease ran out) is counted again: its stage is still running."""
    lease_s = lease_s or LEASE_S
    for key, worker in held.items():
        entry = ledger.holders.get(key)
        if entry is None or entry.w == worker:
            ledger.holders[key] = Entry(w=worker, exp=now + lease_s)
    prune(ledger, now)
    return None, bool(held)


# The ledger in NATS KV.


def scope() -> str:
    value = (os.environ.get("FAASCI_CAP_SCOPE") or "service").strip().lower()
    if value not in SCOPES:
        raise ValueError(f"FAASCI_CAP_SCOPE={value!r} is not one of {', '.join(SCOPES)}")
    return value


def check_settings() -> None:
    """ValueError naming the first cap setting that does not read (FAASCI_CAP_SCOPE,
    FAASCI_CONCURRENCY, FAASCI_BURST, ...): readiness says so (faasci.health), rather than
    every stage failing on it."""
    scope()
    limits_store.defaults()


def ledger_key(service: str) -> str:
    return "namespace" if scope() == "namespace" else f"service.{service}"


def limits_of(service: str) -> Limits:
    """The limits that cap `service`'s stages: its own, or the namespace's (the defaults)."""
    return limits_store.defaults() if scope() == "namespace" else limits_store.for_service(service)


def change_ledger(key: str, change: Callable[[Ledger, float], tuple[T, bool]],
                  patience: float = PATIENCE_S) -> tuple[T, Ledger]:  # fmt: skip
    """Apply `change` to the scope's ledger: one read, and one compare-and-set write when it
    changed something (read again and re-applied when another wrote first)."""
    bus = services.bus()

    def apply(value: bytes | None) -> tuple[bytes | None, tuple[T, Ledger]]:
        ledger = Ledger.model_validate_json(value) if value is not None else Ledger()
        result, changed = change(ledger, time.time())
        return (ledger.model_dump_json().encode() if changed else None), (result, ledger)

    async def _change() -> tuple[T, Ledger]:
        return await compare_and_set(await bus.bucket(BUCKET), key, apply)

    return bus.call(_change, patience=patience)


def read(service: str) -> Ledger:
    return change_ledger(ledger_key(service), lambda ledger, now: (None, False))[1]


def usage(service: str) -> dict:
    """What the cap of `service` is doing now: running, waiting, the limit now, the burst."""
    if scope() == "off":
        return {"scope": "off"}
    ledger, now, lim = read(service), time.time(), limits_of(service)
    prune(ledger, now)

    def iso(t: float | None) -> str | None:
        return datetime.fromtimestamp(t, UTC).isoformat() if t is not None else None

    return {
        "scope": scope(),
        "running": len(ledger.holders),
        "waiting": len(ledger.waiters),
        "limit": limit_at(ledger, lim, now),
        "burst_from": iso(ledger.burst_from),
        "burst_until": iso(ledger.burst_until),
    }


def waiting(run, stage: str, number: int) -> bool:
    """Is attempt `number` of `stage` waiting for a slot, its worker alive? (The hand-off
    guard then leaves it be: it is not lost, only queued.) False when it cannot say."""
    if scope() == "off" or stage not in run.pipeline.stages:
        return False
    try:
        ledger = read(run.service)
    except Exception:  # NATS away: the guard acts as without caps
        return False
    entry = ledger.waiters.get(f"{run.id}.{stage}.{number}")
    return entry is not None and entry.exp >= time.time()


class _Notices:
    """Every change of a ledger, heard on the bucket's subjects ($KV.faasci-caps.<key>: a KV
    write is a publish there), so waiters wake at once; the newest value per key."""

    def __init__(self):
        self.cond = threading.Condition()
        self.version = 0
        self.latest: dict[str, bytes] = {}
        self._bus = None

    def listen(self) -> None:
        bus = services.bus()
        with self.cond:
            if self._bus is bus:
                return
            self._bus = bus
        prefix = f"$KV.{BUCKET}."

        async def on_change(msg) -> None:
            with self.cond:
                self.latest[msg.subject.removeprefix(prefix)] = msg.data
                self.version += 1
                self.cond.notify_all()

        async def _subscribe() -> None:
            await (await bus.nc()).subscribe(f"{prefix}>", cb=on_change)

        try:
            bus.call(_subscribe, patience=PATIENCE_S)
        except Exception:
            with self.cond:
                self._bus = None
            raise

    def wait(self, seen: int, timeout: float) -> int:
        """Until a change after version `seen` (or `timeout`); the version now."""
        with self.cond:
            self.cond.wait_for(lambda: self.version != seen, timeout)
            return self.version


class _Keeper:
    """Renews the leases of the slots this process holds, every REFRESH_S, in one write per
    scope. What it renews is read at each write, so a slot given back is never renewed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held: dict[str, dict[str, str]] = {}  # ledger key -> {key: worker}
        self.thread: threading.Thread | None = None

    def add(self, scope_key: str, key: str, worker: str) -> None:
        with self.lock:
            self.held.setdefault(scope_key, {})[key] = worker
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="caps-keeper", daemon=True)
                self.thread.start()

    def remove(self, scope_key: str, key: str) -> None:
        with self.lock:
            held = self.held.get(scope_key, {})
            held.pop(key, None)
            if not held:
                self.held.pop(scope_key, None)

    def now_held(self, scope_key: str) -> dict[str, str]:
        with self.lock:
            return dict(self.held.get(scope_key, {}))

    def _run(self) -> None:
        while True:
            time.sleep(REFRESH_S)
            with self.lock:
                keys = list(self.held)
            for scope_key in keys:

                def change(ledger: Ledger, now: float, k: str = scope_key) -> tuple[None, bool]:
                    return renew(ledger, self.now_held(k), now)

                try:
                    change_ledger(scope_key, change, patience=REFRESH_S)
                except Exception as e:  # NATS away: renewed once it is back (renew re-adds)
                    log.warning("renewing the slots of %s failed: %s", scope_key, e)


_notices = _Notices()
_keeper = _Keeper()


def _owed(run, stage: str, attempt: int | None) -> int | None:
    """The attempt this invocation would claim, or None when claim will refuse it (the run
    ended, the stage is not queued, the attempt is taken): no slot is needed for that."""
    try:
        owed = run.stage(stage)
    except NotFound:
        return None
    if run.finished or owed.status != "queued":
        return None
    wanted = owed.next_attempt if attempt is None else attempt
    return wanted if wanted == owed.next_attempt else None


def _still_owed(run_id: str, stage: str, number: int) -> bool:
    try:
        return _owed(services.run_store().get(run_id), stage, number) == number
    except NotFound:
        return False


def _acquire(service: str, scope_key: str, key: str, worker: str, run_id: str, stage: str,
             number: int) -> bool:  # fmt: skip
    """Take a slot, waiting in the queue for it: True once held; False when the attempt is
    no longer owed meanwhile (the run was cancelled), its ticket given back."""
    began = time.monotonic()
    checked = began
    told = False
    seen = _notices.version
    while True:
        lim = limits_of(service)  # read every round: an admin raising the cap lets waiters in
        held, ledger = change_ledger(scope_key, functools.partial(_take, key, worker, lim))
        if held:
            _keeper.add(scope_key, key, worker)
            if told:
                log.info("run %s: %s attempt %d got a slot of %s after %.1fs", run_id, stage,
                         number, scope_key, time.monotonic() - began)  # fmt: skip
            return True
        if not told:
            _notices.listen()
            ahead = sum(1 for e in ledger.waiters.values() if e.n < ledger.waiters[key].n)
            log.info("run %s: %s attempt %d waits for a slot of %s (%d running, %d ahead, "
                     "limit %d)", run_id, stage, number, scope_key, len(ledger.holders), ahead,
                     limit_at(ledger, lim, time.time()))  # fmt: skip
            told = True
        stepped = time.monotonic()
        while True:  # until the newest ledger lets us in, our lease wants renewing, or POLL_S
            seen = _notices.wait(seen, POLL_S)
            if time.monotonic() - checked >= RUN_CHECK_S:
                checked = time.monotonic()
                if not _still_owed(run_id, stage, number):
                    log.info("run %s: %s attempt %d is no longer owed; leaving the queue",
                             run_id, stage, number)  # fmt: skip
                    _give_back(scope_key, key, worker)
                    return False
            if time.monotonic() - stepped >= POLL_S or _may_take(scope_key, key, worker, lim):
                break


def _take(key: str, worker: str, lim: Limits, ledger: Ledger, now: float) -> tuple[bool, bool]:
    return take(ledger, key, worker, lim, now)


def _may_take(scope_key: str, key: str, worker: str, lim: Limits) -> bool:
    """Would the newest ledger heard of let `key` in? Read-only."""
    with _notices.cond:
        raw = _notices.latest.get(scope_key)
    if not raw:  # nothing heard of it since our own step: POLL_S looks again
        return False
    try:
        return take(Ledger.model_validate_json(raw), key, worker, lim, time.time())[0]
    except Exception:  # Taken, or an unreadable value: the real step says
        return True


def _give_back(scope_key: str, key: str, worker: str) -> None:
    _keeper.remove(scope_key, key)
    with contextlib.suppress(RuntimeError):  # RuntimeError: no loop runs here (the usual case)
        if asyncio.get_running_loop() is services.bus().loop:
            # On the bus's own thread (a slot collected there, never exited): waiting for the
            # bus here would block it, so the write goes on from a thread of its own.
            threading.Thread(target=_give_back, args=(scope_key, key, worker),
                             daemon=True).start()  # fmt: skip
            return
    try:
        change_ledger(scope_key, lambda ledger, now: release(ledger, key, worker, now),
                      patience=RELEASE_PATIENCE_S)  # fmt: skip
    except Exception as e:  # its lease frees it
        log.warning("giving back the slot of %s in %s failed: %s", key, scope_key, e)


@contextlib.contextmanager
def slot(run_id: str, stage: str, attempt: int | None = None,
         seen: tuple[Run, int] | None = None) -> Iterator[tuple[Run, int] | None]:  # fmt: skip
    """Run the block holding a slot of the run's service (waiting for one, in order), given
    back on every way out. An invocation its claim will refuse anyway (a duplicate, a run
    that ended) takes none; a duplicate of one already waiting or running raises Taken.
    The block gets the record as read here (or as `seen`, handed on with the invocation),
    with its revision (RunStore.update's `seen`), or None."""
    if scope() == "off":
        yield seen
        return
    try:
        seen = seen or services.run_store().read(run_id)
    except NotFound:
        yield None  # claim answers it
        return
    run = seen[0]
    number = _owed(run, stage, attempt)
    if number is None:  # claim answers it
        yield seen
        return
    scope_key, key = ledger_key(run.service), f"{run_id}.{stage}.{number}"
    worker = f"{socket.gethostname()}:{os.getpid()}/{secrets.token_hex(4)}"
    try:
        held = _acquire(run.service, scope_key, key, worker, run_id, stage, number)
    except Taken:
        raise
    except BaseException:  # NATS gone while waiting, or the process stopping
        _give_back(scope_key, key, worker)
        raise
    try:
        yield seen  # after a wait it may be old: the claim's write then reads it again
    finally:
        if held:
            _give_back(scope_key, key, worker)


def capped(execute: Callable[..., T]) -> Callable[..., T]:
    """faasci.stage.execute, run holding a slot (`slot`)."""

    @functools.wraps(execute)
    def run_capped(run_id: str, stage: str, attempt: int | None = None,
                   seen: tuple[Run, int] | None = None) -> T:  # fmt: skip
        with slot(run_id, stage, attempt, seen) as seen:
            return execute(run_id, stage, attempt, seen=seen)

    return run_capped
