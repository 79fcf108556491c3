"""faasci.once.held on the test stack's real NATS: a key held as a lock across threads, as
across replicas (one rollout of a function at a time)."""

import secrets
import threading
import time

import pytest

from faasci import once

BUCKET = "faasci-test-held"


def test_blocks_holding_one_key_run_one_at_a_time(client_settings):
    """Three threads holding the same key: every block runs, and never two at once."""
    key, guard, inside, most, done = secrets.token_hex(4), threading.Lock(), [0], [0], []

    def work(i: int) -> None:
        with once.held(BUCKET, key, 60, 30, threading.Event()):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.5)
            with guard:
                inside[0] -= 1
            done.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(done) == [0, 1, 2] and most[0] == 1


def test_a_key_held_elsewhere_ends_the_wait_at_its_limit_or_at_a_cancel(client_settings):
    """NotHeld after the wait (having said it waits), at once when cancelled; the key is
    free again once its holder's block ends."""
    key, said = secrets.token_hex(4), []
    with once.held(BUCKET, key, 60, 0, threading.Event()):
        started = time.monotonic()
        with pytest.raises(once.NotHeld), once.held(BUCKET, key, 60, 2, threading.Event(),
                                                    lambda: said.append("waiting")):  # fmt: skip
            pass
        assert 2 <= time.monotonic() - started < 10 and said == ["waiting"]
        cancel = threading.Event()
        cancel.set()
        started = time.monotonic()
        with pytest.raises(once.NotHeld), once.held(BUCKET, key, 60, 600, cancel):
            pass
        assert time.monotonic() - started < 5
    with once.held(BUCKET, key, 60, 0, threading.Event()):
        pass
