"""The concurrency cap's ledger rules (faasci.caps: take, release, renew, the burst) and the
limits model (faasci.limits), as pure functions of a ledger and a time."""

import pytest

from faasci import caps, limits
from faasci.caps import Ledger
from faasci.errors import UserError

CAP2 = limits.Limits(concurrency=2, burst=2, burst_window_s=0)
BURST3 = limits.Limits(concurrency=2, burst=3, burst_window_s=10)
T0 = 1_000_000.0


def ask(ledger: Ledger, key: str, lim=CAP2, now: float = T0, worker: str | None = None):
    return caps.take(ledger, key, worker or f"w-{key}", lim, now)


def test_slots_up_to_the_cap_then_tickets_in_order():
    """Two take a slot at once under a cap of 2; the next ones get tickets, lowest first."""
    ledger = Ledger()
    assert ask(ledger, "a") == (True, True)
    assert ask(ledger, "b") == (True, True)
    assert ask(ledger, "c") == (False, True)
    assert ask(ledger, "d") == (False, True)
    assert set(ledger.holders) == {"a", "b"}
    assert ledger.waiters["c"].n < ledger.waiters["d"].n


def test_a_freed_slot_goes_to_the_first_waiter_never_to_a_newcomer_or_a_later_ticket():
    """After a release, the second waiter and a newcomer still wait; the first gets in."""
    ledger = Ledger()
    for key in "abcd":
        ask(ledger, key)
    caps.release(ledger, "a", "w-a", T0)
    assert ask(ledger, "d") == (False, False)  # nothing new to write for it
    assert ask(ledger, "e") == (False, True)
    assert ask(ledger, "c") == (True, True)
    assert set(ledger.holders) == {"b", "c"} and set(ledger.waiters) == {"d", "e"}


def test_asking_again_keeps_the_ticket_and_writes_only_to_renew_the_lease():
    """A waiter asking again stays at its place; it writes once its lease wants renewing."""
    ledger = Ledger()
    for key in "abc":
        ask(ledger, key)
    ticket = ledger.waiters["c"].n
    assert ask(ledger, "c", now=T0 + 1) == (False, False)
    assert ask(ledger, "c", now=T0 + caps.REFRESH_S + 1) == (False, True)
    assert ledger.waiters["c"].n == ticket
    assert ledger.waiters["c"].exp == T0 + caps.REFRESH_S + 1 + caps.LEASE_S


def test_a_holder_asking_again_still_holds_and_writes_nothing():
    """A repeated take (an ambiguous write tried again) is the same slot."""
    ledger = Ledger()
    ask(ledger, "a")
    assert ask(ledger, "a") == (True, False)
    assert list(ledger.holders) == ["a"]


def test_a_live_duplicate_is_refused_and_a_dead_workers_ticket_is_taken_over_in_place():
    """Another live worker on the same attempt: Taken. Once its lease ran out, a new worker
    takes its ticket over, keeping its place ahead of later ones."""
    ledger = Ledger()
    for key in "abcd":
        ask(ledger, key)
    with pytest.raises(caps.Taken):
        ask(ledger, "c", worker="someone-else")
    with pytest.raises(caps.Taken):
        ask(ledger, "a", worker="someone-else")
    later = T0 + caps.LEASE_S + 1  # every lease ran out: a, b, c, d all silent
    ledger.holders["a"].exp = ledger.holders["b"].exp = later + caps.LEASE_S  # a, b alive
    ledger.waiters["d"].exp = later + caps.LEASE_S  # d alive
    ticket = ledger.waiters["c"].n
    assert ask(ledger, "c", now=later, worker="new-worker") == (False, True)
    assert ledger.waiters["c"].w == "new-worker" and ledger.waiters["c"].n == ticket
    assert ledger.waiters["c"].n < ledger.waiters["d"].n


def test_a_silent_holder_is_dropped_and_its_slot_taken():
    """A holder whose lease ran out (its worker was killed) no longer counts."""
    ledger = Ledger()
    ask(ledger, "a")
    ask(ledger, "b")
    ledger.holders["b"].exp = T0 + caps.LEASE_S + 60  # b lives on; a went silent
    assert ask(ledger, "c", now=T0 + caps.LEASE_S + 1) == (True, True)
    assert set(ledger.holders) == {"b", "c"}


def test_release_gives_back_only_the_workers_own_slot():
    """Another worker's release of the same key leaves the slot held."""
    ledger = Ledger()
    ask(ledger, "a")
    assert caps.release(ledger, "a", "intruder", T0) == (None, False)
    assert caps.release(ledger, "a", "w-a", T0) == (None, True)
    assert not ledger.holders


def test_renew_extends_held_leases_and_counts_a_slot_dropped_meanwhile():
    """The keeper's renewal moves its holders' leases on, and puts back a slot whose lease
    ran out while NATS was away (its stage still runs)."""
    ledger = Ledger()
    ask(ledger, "a")
    later = T0 + caps.LEASE_S + 5
    caps.prune(ledger, later)
    assert not ledger.holders
    assert caps.renew(ledger, {"a": "w-a"}, later) == (None, True)
    assert ledger.holders["a"].exp == later + caps.LEASE_S
    assert caps.renew(Ledger(), {}, later) == (None, False)


def test_burst_lets_one_more_in_for_its_window_only():
    """Cap 2, burst 3: demand over the cap starts a burst (3 at once); once its window is
    over nobody new starts while 2 or more run."""
    ledger = Ledger()
    assert ask(ledger, "a", BURST3)[0] and ask(ledger, "b", BURST3)[0]
    assert ask(ledger, "c", BURST3, now=T0 + 1) == (True, True)
    assert (ledger.burst_from, ledger.burst_until) == (T0 + 1, T0 + 11)
    assert caps.limit_at(ledger, BURST3, T0 + 5) == 3
    assert ask(ledger, "d", BURST3, now=T0 + 2) == (False, True)
    caps.release(ledger, "a", "w-a", T0 + 12)  # the window is over: 2 still run
    assert ask(ledger, "d", BURST3, now=T0 + 12)[0] is False
    assert caps.limit_at(ledger, BURST3, T0 + 12) == 2
    caps.release(ledger, "b", "w-b", T0 + 13)
    assert ask(ledger, "d", BURST3, now=T0 + 13)[0] is True


def test_after_a_burst_the_next_waits_out_a_cool_down_as_long_as_its_window():
    """Demand over the cap again right after a burst gets no new one until the window's
    length has passed at the cap."""
    ledger = Ledger()
    for key in "abc":
        ask(ledger, key, BURST3, now=T0)
    end = ledger.burst_until
    for key in "abc":
        ledger.holders[key].exp = end + 3600
    caps.release(ledger, "c", "w-c", end + 1)
    assert ask(ledger, "c2", BURST3, now=end + 1)[0] is False  # 2 run, no burst yet
    assert not caps.may_burst(ledger, BURST3, end + BURST3.burst_window_s - 1)
    assert ask(ledger, "c2", BURST3, now=end + BURST3.burst_window_s)[0] is True
    assert ledger.burst_from == end + BURST3.burst_window_s


def test_no_burst_without_demand_over_the_cap():
    """Taking slots within the cap starts no burst."""
    ledger = Ledger()
    ask(ledger, "a", BURST3)
    ask(ledger, "b", BURST3)
    assert ledger.burst_until is None


def test_limits_defaults_come_from_the_environment():
    """FAASCI_CONCURRENCY, FAASCI_BURST, FAASCI_BURST_WINDOW_S; a burst under the cap is
    lifted to it; a value that is no number says which."""
    assert limits.defaults({}) == limits.Limits(concurrency=10, burst=25, burst_window_s=60)
    env = {"FAASCI_CONCURRENCY": "4", "FAASCI_BURST": "6", "FAASCI_BURST_WINDOW_S": "1.5",
           "FAASCI_MONTHLY_BUDGET": "200"}  # fmt: skip
    got = limits.defaults(env)
    assert got == limits.Limits(concurrency=4, burst=6, burst_window_s=1.5, monthly_budget=200)
    assert limits.defaults({"FAASCI_CONCURRENCY": "40"}).burst == 40
    with pytest.raises(ValueError, match="FAASCI_BURST"):
        limits.defaults({"FAASCI_BURST": "many"})


def test_overrides_merge_over_the_defaults():
    """Fields set for a service win; the others are the defaults."""
    base = limits.Limits(concurrency=10, burst=25, burst_window_s=60)
    got = limits.merged(limits.Overrides(concurrency=2, monthly_budget=5.0), base)
    assert got == limits.Limits(concurrency=2, burst=25, burst_window_s=60, monthly_budget=5.0)
    assert limits.merged(limits.Overrides(concurrency=30), base).burst == 30


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": "2"}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"concurrency": 2.5}, "concurrency"),
        ({"burst": -1}, "burst"),
        ({"burst_window_s": -3}, "burst_window_s"),
        ({"monthly_budget": 0}, "monthly_budget"),
        ({"monthly_budget": "lots"}, "monthly_budget"),
        ({"concurrency": 2, "parallelism": 4}, "parallelism"),
    ],
)
def test_bad_limits_name_their_field(body, field):
    """A PUT body with a bad or unknown field is a 400 naming it."""
    with pytest.raises(UserError) as e:
        limits.parse_body(body)
    assert e.value.status == 400 and e.value.field == field


def test_a_burst_set_below_the_concurrency_set_is_refused():
    """burst 2 with concurrency 5 names burst; null clears a field."""
    change = limits.parse_body({"concurrency": 5, "burst": 2})
    with pytest.raises(UserError) as e:
        limits.check(limits.Overrides(**change))
    assert e.value.field == "burst"
    assert limits.parse_body({"burst": None, "burst_window_s": 2}) == {
        "burst": None, "burst_window_s": 2,
    }  # fmt: skip
