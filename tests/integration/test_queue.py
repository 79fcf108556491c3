"""The local queue-worker on a real NATS server: a function that is busy (429, of-watchdog's
max_inflight) or unreachable gets the request again; its final answer reaches the callback."""

import asyncio
import json

from faasci.local import queue


def test_busy_and_unreachable_functions_get_the_request_again(nats_bus, callback_receiver):
    """429, then a refused connection, then 200: three deliveries, one callback with 200."""
    url, received = callback_receiver
    answers = [(429, {}, b"busy"), ConnectionError("down"), (200, {}, b"done")]
    calls = []

    def invoke(function, path, method, query, headers, body):
        calls.append((function, body, headers["X-Call-Id"]))
        answer = answers[len(calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    nats_bus.call(queue.ensure_queue, nats_bus)
    message = queue.request_message("unit", "", "POST", "", {}, b'{"run_id": "r"}', "call-1", url)
    nats_bus.call(queue.enqueue, nats_bus, message)
    worker = queue.QueueWorker(nats_bus, invoke, concurrency=2)
    asyncio.run_coroutine_threadsafe(worker.run(), nats_bus.loop)

    headers, body = received.get(timeout=20)
    assert headers["X-Function-Status"] == "200" and body == b"done"
    assert headers["X-Call-Id"] == "call-1"
    assert calls == [("unit", b'{"run_id": "r"}', "call-1")] * 3
    assert received.empty()  # one callback: the final answer


def test_a_forged_call_id_does_not_drop_the_real_request(nats_bus):
    """A client's request carrying the call id of a hand-off to come is queued as its own;
    the hand-off after it is not dropped as a duplicate, while a true repeat of it is."""
    nats_bus.call(queue.ensure_queue, nats_bus)
    call_id, body = "20300101-000000-abcdef.integration.1", b'{"run_id": "x", "attempt": 1}'
    signed = {"X-Faasci-Signature": "t=1,fn=unit,v1=00"}
    forged = queue.request_message("integration", "", "POST", "", {}, body, call_id, None)
    real = queue.request_message("integration", "", "POST", "", signed, body, call_id, None)
    repeat = queue.request_message("integration", "", "POST", "", signed, body, call_id, None)

    async def publish_all():
        js = await nats_bus.js()
        acks = []
        for m in (forged, real, repeat):
            acks.append(await js.publish(f"{queue.STREAM}.integration", json.dumps(m).encode(),
                                         headers={"Nats-Msg-Id": queue.dedup_id(m)}))  # fmt: skip
        return [bool(a.duplicate) for a in acks]

    assert nats_bus.call(publish_all) == [False, False, True]
