"""The run store on the real NATS server: atomic claims, and an event for every change."""

import json
import threading

import pytest

from faasci import api, pipeline, runs, services, stage
from faasci.auth import Principal
from faasci.errors import Conflict, NotFound
from faasci.store import EVENTS_STREAM, EVENTS_SUBJECT, RunStore


def new_run() -> runs.Run:
    spec = pipeline.validate(
        {"service": "svc", "stages": {"lint": {"run": ["true"]}, "unit": {"run": ["true"]}}}
    )
    return runs.new_run(spec, repo="/tmp/r", ref="main", commit="a" * 40, source="/tmp/r")


def test_concurrent_claims_of_one_attempt_have_one_winner(client_settings):
    """Eight threads claiming the same attempt at once: exactly one gets it."""
    store = services.run_store()
    run = store.create(new_run())
    results, barrier = [], threading.Barrier(8)

    def claim(i):
        barrier.wait()
        try:
            store.update(run.id, lambda r: runs.claim(r, "lint", 1, f"w{i}"), "stage.started")
            results.append("won")
        except Conflict:
            results.append("lost")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 7 + ["won"]
    stored = store.get(run.id)
    assert len(stored.stage("lint").attempts) == 1 and stored.stage("lint").status == "running"


def test_an_update_from_a_read_record_is_refused_once_another_wrote_first(client_settings):
    """An update starting from a record `read` earlier (`seen`) changes it without reading
    it again; once another write came in between, it is applied to the newest instead."""
    store = services.run_store()
    run = store.create(new_run())
    seen = store.read(run.id)
    updated, _ = store.update(run.id, lambda r: runs.claim(r, "lint", 1, "w1"), "stage.started",
                              seen)  # fmt: skip
    assert store.read(run.id)[1] > seen[1] and updated.stage("lint").status == "running"
    stale = store.read(run.id)
    beat = store.update(run.id, lambda r: runs.heartbeat(r, "lint", 1), None)[0]  # in between
    beat_at = beat.stage("lint").attempts[0].heartbeat_at
    assert beat_at != stale[0].stage("lint").attempts[0].heartbeat_at
    with pytest.raises(Conflict):  # applied to the newest: the attempt is already claimed
        store.update(run.id, lambda r: runs.claim(r, "lint", 1, "w2"), "stage.started", stale)
    assert store.get(run.id).stage("lint").attempts[0].worker == "w1"
    cancelled, _ = store.update(run.id, lambda r: runs.cancel(r), "run.cancelled", stale)
    assert cancelled.status == "cancelled"
    assert store.get(run.id).stage("lint").attempts[0].heartbeat_at == beat_at  # not lost


def test_a_hand_off_carries_the_record_so_the_next_claim_reads_nothing(client_settings,
                                                                       monkeypatch):  # fmt: skip
    """The hand-off's body holds the record as lint's end wrote it, with its revision; the
    stage router takes it from a function only, and unit's claim then writes without a read."""
    store = services.run_store()
    run = store.create(new_run())
    store.update(run.id, lambda r: runs.claim(r, "lint", 1, "w1"), "stage.started")
    passed = lambda r: runs.finish(r, "lint", 1, status="passed", exit_code=0)  # noqa: E731
    store.update(run.id, passed, "stage.finished")
    body = json.loads(json.dumps(stage.handoff_body(run.id, 1)))  # as the queue has it
    user = Principal("alice", "user", frozenset({"runner"}))
    assert api._handed_record(body, run.id, user) is None
    assert api._handed_record(body, "20260101-000000-other", Principal("lint", "function")) is None
    seen = api._handed_record(body, run.id, Principal("lint", "function"))
    assert seen[1] == store.read(run.id)[1] and seen[0] == store.get(run.id)
    reads, read = [], store._get

    async def counted(run_id):
        reads.append(run_id)
        return await read(run_id)

    monkeypatch.setattr(store, "_get", counted)
    claimed, _ = store.update(run.id, lambda r: runs.claim(r, "unit", 1, "w2"), "stage.started",
                              seen)  # fmt: skip
    assert reads == [] and claimed.stage("unit").attempts[0].worker == "w2"
    assert store.read(run.id)[1] == seen[1] + 1


def test_an_update_starts_from_what_this_process_last_wrote(client_settings, monkeypatch):
    """No read before a write while this process wrote last; after another process wrote,
    the write is refused and redone on the newest, and what `change` raises on a record
    that may be old is not believed until the newest says so too."""
    store, elsewhere = services.run_store(), RunStore(services.bus())  # another process's
    run = store.create(new_run())
    store.update(run.id, lambda r: runs.claim(r, "lint", 1, "w1"), "stage.started")
    reads, read = [], store._get

    async def counted(run_id):
        reads.append(run_id)
        return await read(run_id)

    monkeypatch.setattr(store, "_get", counted)
    store.update(run.id, lambda r: runs.heartbeat(r, "lint", 1), None)
    assert reads == []
    elsewhere.update(run.id, lambda r: runs.finish(r, "lint", 1, status="passed", exit_code=0),
                     "stage.finished")  # fmt: skip

    def only_after_lint(r):  # raises on the record this process knows (lint running)
        if r.stage("lint").status != "passed":
            raise Conflict("lint has not passed")
        return runs.claim(r, "unit", 1, "w2")

    claimed, _ = store.update(run.id, only_after_lint, "stage.started")
    assert reads == [run.id]
    assert claimed.stage("unit").attempts[0].worker == "w2"
    assert claimed.stage("lint").attempts[0].heartbeat_at is not None  # nothing lost


def test_a_failed_change_leaves_the_record_untouched(client_settings):
    """An exception inside a change writes nothing."""
    store = services.run_store()
    run = store.create(new_run())
    with pytest.raises(Conflict):
        store.update(run.id, lambda r: runs.claim(r, "unit", None, "w"), "stage.started")
    assert store.get(run.id) == run


def test_unknown_run(client_settings):
    """Reading a run that does not exist is NotFound."""
    with pytest.raises(NotFound):
        services.run_store().get("20000101-000000-000000")


def test_every_change_is_published_as_an_event(client_settings):
    """Create, claim and finish each publish an event on faasci.events.<run id>."""
    store = services.run_store()
    run = store.create(new_run())
    store.update(run.id, lambda r: runs.claim(r, "lint", 1, "w"), "stage.started")
    store.update(run.id, lambda r: runs.finish(r, "lint", 1, status="passed", exit_code=0),
                 "stage.finished")  # fmt: skip

    async def read_events():
        js = await services.bus().js()
        sub = await js.subscribe(f"{EVENTS_SUBJECT}.{run.id}", stream=EVENTS_STREAM,
                                 ordered_consumer=True)  # fmt: skip
        events = []
        for _ in range(3):
            msg = await sub.next_msg(timeout=5)
            events.append(json.loads(msg.data))
        await sub.unsubscribe()
        return events

    events = services.bus().call(read_events)
    assert [e["event"] for e in events] == ["run.created", "stage.started", "stage.finished"]
    assert events[-1]["stages"] == {"lint": "passed", "unit": "queued"}
    assert all(e["run_id"] == run.id for e in events)


def test_logs_round_trip_through_s3(client_settings, tmp_path):
    """A log stored with the object store reads back byte for byte; a missing key is NotFound."""
    store = services.objects()
    path = tmp_path / "stage.log"
    path.write_bytes("naïve ✓ log\n".encode() * 1000)
    store.put_file("logs/test/unit/1.log", path)
    assert store.get_bytes("logs/test/unit/1.log") == path.read_bytes()
    with pytest.raises(NotFound):
        store.get_bytes("logs/test/unit/404.log")


def test_listing_pages_by_cursor_and_filters_by_service(client_settings):
    """page(): newest first, `before` continues where a page ended, `next` is None at the
    end; `service` lists that service's runs only (the index healed when an entry is lost)."""
    import secrets as random

    from faasci import store as store_module

    store = services.run_store()
    mine = f"listing.{random.token_hex(4)}"  # a dot: NATS tokens must not split it

    def run_of(service: str) -> runs.Run:
        spec = pipeline.validate({"service": service, "stages": {"lint": {"run": ["true"]}}})
        return runs.new_run(spec, repo="/tmp/r", ref="main", commit="a" * 40, source="/tmp/r")

    created = sorted((store.create(run_of(mine)).id for _ in range(5)), reverse=True)
    other = store.create(run_of(f"{mine}-other")).id
    pages, cursor = [], ""
    while True:
        found, cursor = store.page(2, before=cursor, service=mine)
        pages.append([r.id for r in found])
        if cursor is None:
            break
    assert pages == [created[:2], created[2:4], created[4:]]
    everything = [r.id for r in store.list(limit=10**9)]
    assert set(created) | {other} <= set(everything) and everything == sorted(everything)[::-1]
    first, after = store.page(3)
    assert [r.id for r in first] == everything[:3] and after == everything[2]

    async def drop_index_entry():
        bucket = store_module.INDEX_BUCKET
        js = await store.bus.js()
        subject = f"$KV.{bucket}.{mine.replace('.', '=')}.{created[0]}"
        await js.purge_stream(f"KV_{bucket}", subject=subject)
        assert not await store._subjects(bucket, subject, count=False)  # gone: healed below

    store.bus.call(drop_index_entry)
    assert [r.id for r in store.list(limit=10, service=mine)] == created
