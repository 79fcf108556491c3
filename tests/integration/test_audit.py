"""The audit trail on a real NATS server: entries are recorded and read back (filtered by
time and run), and JetStream refuses to delete an entry or purge the stream."""

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from nats.js.errors import APIError

from faasci import audit

RUN = "20260101-120000-abcdef"


def test_record_and_read_back(nats_bus):
    assert audit.entries(bus=nats_bus) == audit.entries(limit=5, bus=nats_bus) == []
    audit.record("run.start", actor="user:alice", repo="/r", ref="main", commit="c0ffee",
                 run=RUN, detail={"trigger": "cli"}, bus=nats_bus)  # fmt: skip
    audit.record("cache.purge", actor="user:bob", detail={"keys": 3}, bus=nats_bus)
    audit.record("run.cancel", run=RUN, bus=nats_bus)  # no request: the actor is "system"

    found = audit.entries(bus=nats_bus)
    assert [e["action"] for e in found] == ["run.start", "cache.purge", "run.cancel"]
    first = found[0]
    assert first["actor"] == "user:alice" and first["repo"] == "/r" and first["ref"] == "main"
    assert first["commit"] == "c0ffee" and first["run"] == RUN
    assert first["detail"] == {"trigger": "cli"}
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    assert found[2]["actor"] == "system"

    assert [e["action"] for e in audit.entries(run=RUN, bus=nats_bus)] == [
        "run.start", "run.cancel"
    ]  # fmt: skip
    assert audit.entries(run="20990101-000000-000000", bus=nats_bus) == []
    assert [e["action"] for e in audit.entries(limit=1, bus=nats_bus)] == ["run.cancel"]


def test_since_filters_by_time(nats_bus):
    audit.record("run.start", actor="user:a", run=RUN, bus=nats_bus)
    time.sleep(0.2)
    middle = datetime.now(UTC)
    time.sleep(0.2)
    audit.record("run.cancel", actor="user:a", run=RUN, bus=nats_bus)
    assert [e["action"] for e in audit.entries(since=middle, bus=nats_bus)] == ["run.cancel"]
    assert len(audit.entries(since="1h", bus=nats_bus)) == 2
    assert audit.entries(since=datetime.now(UTC) + timedelta(hours=1), bus=nats_bus) == []
    with pytest.raises(ValueError, match="since"):
        audit.parse_since("yesterday")


def test_the_stream_refuses_delete_and_purge(nats_bus):
    audit.record("run.start", actor="user:a", run=RUN, bus=nats_bus)

    async def info():
        return await (await nats_bus.js()).stream_info(audit.STREAM)

    config = nats_bus.call(info).config
    assert config.deny_delete and config.deny_purge
    assert not config.max_age and config.max_msgs in (None, -1)

    async def delete_message():
        await (await nats_bus.js()).delete_msg(audit.STREAM, 1)

    async def purge():
        await (await nats_bus.js()).purge_stream(audit.STREAM)

    async def raw_delete():  # the plain API request, as any NATS client could send it
        nc = await nats_bus.nc()
        reply = await nc.request(f"$JS.API.STREAM.MSG.DELETE.{audit.STREAM}",
                                 json.dumps({"seq": 1, "no_erase": True}).encode())  # fmt: skip
        return json.loads(reply.data)

    async def loosen():  # turning the protection off is refused too
        js = await nats_bus.js()
        config.deny_delete = False
        config.deny_purge = False
        await js.update_stream(config)

    for attempt in (delete_message, purge, loosen):
        with pytest.raises(APIError):
            nats_bus.call(attempt)
    assert "error" in nats_bus.call(raw_delete)
    assert [e["action"] for e in audit.entries(bus=nats_bus)] == ["run.start"]
