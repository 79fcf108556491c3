"""faasci.caps and faasci.limits on a real NATS server: slots taken and waited for by
threads as by stage functions, in order; leases of silent workers running out; the store of
per-service limits."""

import contextlib
import secrets
import threading
import time

import pytest

from faasci import caps, limits, pipeline, runs, services
from faasci.store import RunStore


@pytest.fixture
def on_nats(nats_bus, monkeypatch):
    """faasci.services pointed at the test's own NATS server; its run store."""
    store = RunStore(nats_bus)
    monkeypatch.setattr(services, "bus", lambda: nats_bus)
    monkeypatch.setattr(services, "run_store", lambda: store)
    monkeypatch.delenv("FAASCI_CAP_SCOPE", raising=False)
    return store


def fresh_service() -> str:
    return f"caps-{secrets.token_hex(4)}"


def new_run(store: RunStore, service: str) -> runs.Run:
    spec = pipeline.parse(f"service: {service}\nstages:\n  unit: {{run: ['true']}}\n", service)
    return store.create(runs.new_run(spec, repo="/r", ref="main", commit="a" * 40, source="/r"))


@pytest.fixture
def kept():
    """Slots taken with `enter`, held until the test ends, then given back."""
    held = []
    yield held
    for slot in held:
        with contextlib.suppress(Exception):
            slot.__exit__(None, None, None)


def enter(run_id: str, kept: list) -> None:
    """Take a slot (waiting for it) and hold it until the test ends (`kept`)."""
    held = caps.slot(run_id, "unit")
    kept.append(held)
    held.__enter__()


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not {what}"
        time.sleep(0.02)


def test_limits_are_stored_per_service_merged_and_cleared(on_nats):
    """PUT's fields land in NATS KV over the defaults; a later PUT keeps what it does not
    name; null goes back to the default."""
    service = fresh_service()
    assert limits.overrides_of(service) == limits.Overrides()
    limits.set_overrides(service, {"concurrency": 3, "monthly_budget": 12.5})
    limits.set_overrides(service, {"burst": 7})
    limits._cache.clear()  # as another process sees it
    got = limits.for_service(service)
    assert (got.concurrency, got.burst, got.burst_window_s, got.monthly_budget) == (3, 7, 60, 12.5)
    limits.set_overrides(service, {"monthly_budget": None})
    limits._cache.clear()
    assert limits.overrides_of(service).model_dump(exclude_none=True) == {
        "concurrency": 3, "burst": 7,
    }  # fmt: skip
    assert limits.for_service(fresh_service()) == limits.defaults()


def test_at_most_the_cap_hold_slots_and_waiters_get_in_in_arrival_order(on_nats):
    """Six attempts of a service capped at 2: never more than 2 inside at once, and as each
    slot is given back the longest waiting gets in."""
    service = fresh_service()
    limits.set_overrides(service, {"concurrency": 2, "burst": 2})
    guard, inside, most, order = threading.Lock(), [0], [0], []
    done = {}

    def work(run_id: str) -> None:
        with caps.slot(run_id, "unit"):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                order.append(run_id)
            done[run_id].wait(30)
            with guard:
                inside[0] -= 1

    def entered(ledger: caps.Ledger) -> int:
        return len(ledger.holders) + len(ledger.waiters)

    threads, arrivals = [], []
    for i in range(6):
        run = new_run(on_nats, service)
        arrivals.append(run.id)
        done[run.id] = threading.Event()
        thread = threading.Thread(target=work, args=(run.id,))
        thread.start()
        threads.append(thread)
        # each one holds or waits before the next one comes, so arrival order is fixed
        wait_until(lambda n=i + 1: entered(caps.read(service)) == n, "held or queued")
    wait_until(lambda: len(order) == 2, "the first two in")
    assert order == arrivals[:2]
    for i, run_id in enumerate(arrivals):
        done[run_id].set()
        if i + 2 < len(arrivals):
            wait_until(lambda n=i + 3: len(order) == n, "let in")
            assert order == arrivals[: i + 3]
    for thread in threads:
        thread.join(60)
    assert most[0] == 2 and order == arrivals
    ledger = caps.read(service)
    assert not ledger.holders and not ledger.waiters


def test_a_slot_is_given_back_when_the_block_raises(on_nats):
    """An exception out of the stage frees its slot: the next one gets in."""
    service = fresh_service()
    limits.set_overrides(service, {"concurrency": 1, "burst": 1})
    first, second = new_run(on_nats, service), new_run(on_nats, service)
    with pytest.raises(RuntimeError), caps.slot(first.id, "unit"):
        assert len(caps.read(service).holders) == 1
        raise RuntimeError("the stage broke")
    assert not caps.read(service).holders
    with caps.slot(second.id, "unit"):
        assert list(caps.read(service).holders) == [f"{second.id}.unit.1"]


def test_a_killed_holders_slot_is_freed_when_its_lease_runs_out(on_nats, monkeypatch, kept):
    """A holder that stops renewing (its process was killed) loses its slot after LEASE_S,
    and the waiter gets in; a live holder's lease is renewed by its process meanwhile."""
    monkeypatch.setattr(caps, "LEASE_S", 2.0)
    monkeypatch.setattr(caps, "REFRESH_S", 0.3)
    monkeypatch.setattr(caps, "_keeper", caps._Keeper())  # one that renews that often
    service = fresh_service()
    limits.set_overrides(service, {"concurrency": 1, "burst": 1})
    key = caps.ledger_key(service)
    lim = limits.for_service(service)
    # A slot taken by a worker that then dies: nothing renews it.
    held, _ = caps.change_ledger(
        key, lambda led, now: caps.take(led, "dead.unit.1", "dead", lim, now)
    )
    assert held
    waiter = new_run(on_nats, service)
    with caps.slot(waiter.id, "unit"):
        ledger = caps.read(service)
        assert list(ledger.holders) == [f"{waiter.id}.unit.1"]
        # Held well past its lease: its process renews it, so nobody else gets in.
        other = new_run(on_nats, service)
        threading.Thread(target=enter, args=(other.id, kept), daemon=True).start()
        wait_until(lambda: len(caps.read(service).waiters) == 1, "queued")
        deadline = time.time() + 3 * caps.LEASE_S
        while time.time() < deadline:
            assert list(caps.read(service).holders) == [f"{waiter.id}.unit.1"]
            time.sleep(0.2)
    wait_until(lambda: list(caps.read(service).holders) == [f"{other.id}.unit.1"], "taken over")


def test_a_duplicate_invocation_of_a_waiting_attempt_is_refused(on_nats, kept):
    """While an attempt waits for a slot it counts as waiting (not lost), and a second
    invocation of it is a 409 (Taken)."""
    service = fresh_service()
    limits.set_overrides(service, {"concurrency": 1, "burst": 1})
    holder, waiting = new_run(on_nats, service), new_run(on_nats, service)
    with caps.slot(holder.id, "unit"):
        threading.Thread(target=enter, args=(waiting.id, kept), daemon=True).start()
        wait_until(lambda: len(caps.read(service).waiters) == 1, "queued")
        # The hand-off guard leaves a queued attempt be (caps.waiting), not a running one.
        assert caps.waiting(on_nats.get(waiting.id), "unit", 1)
        assert not caps.waiting(on_nats.get(holder.id), "unit", 1)
        with pytest.raises(caps.Taken) as e, caps.slot(waiting.id, "unit", 1):
            pass
        assert e.value.status == 409 and e.value.field == "attempt"
    wait_until(lambda: list(caps.read(service).holders) == [f"{waiting.id}.unit.1"], "let in")


def test_a_cancelled_runs_waiter_leaves_the_queue(on_nats):
    """A run cancelled while its stage waits: the waiter gives its ticket back and takes no
    slot (its claim then refuses the attempt)."""
    service = fresh_service()
    limits.set_overrides(service, {"concurrency": 1, "burst": 1})
    holder, waiting = new_run(on_nats, service), new_run(on_nats, service)
    outcome = []

    def wait_for_slot() -> None:
        with caps.slot(waiting.id, "unit"):
            outcome.append([*caps.read(service).holders])

    with caps.slot(holder.id, "unit"):
        thread = threading.Thread(target=wait_for_slot, daemon=True)
        thread.start()
        wait_until(lambda: len(caps.read(service).waiters) == 1, "queued")
        on_nats.update(waiting.id, runs.cancel, "run.cancelled")
        thread.join(30)
        assert outcome == [[f"{holder.id}.unit.1"]]  # it went on without a slot
        assert not caps.read(service).waiters


def test_an_attempt_its_claim_will_refuse_takes_no_slot(on_nats):
    """A duplicate of an attempt already claimed (or of a finished run) passes straight to
    its claim's 409, holding nothing."""
    service = fresh_service()
    limits.set_overrides(service, {"concurrency": 1, "burst": 1})
    run = new_run(on_nats, service)
    on_nats.update(run.id, lambda r: runs.claim(r, "unit", 1, "someone"), "stage.started")
    with caps.slot(run.id, "unit", 1):
        assert not caps.read(service).holders


def test_namespace_scope_caps_every_service_together(on_nats, monkeypatch, kept):
    """FAASCI_CAP_SCOPE=namespace: one ledger for all services, with the default limits."""
    monkeypatch.setenv("FAASCI_CAP_SCOPE", "namespace")
    monkeypatch.setenv("FAASCI_CONCURRENCY", "1")
    monkeypatch.setenv("FAASCI_BURST", "1")
    a, b = new_run(on_nats, fresh_service()), new_run(on_nats, fresh_service())
    with caps.slot(a.id, "unit"):
        threading.Thread(target=enter, args=(b.id, kept), daemon=True).start()
        wait_until(lambda: len(caps.read(b.service).waiters) == 1, "queued")
        assert caps.ledger_key(b.service) == "namespace"
        assert list(caps.read(a.service).holders) == [f"{a.id}.unit.1"]
    wait_until(lambda: list(caps.read(b.service).holders) == [f"{b.id}.unit.1"], "let in")
