"""Asynchronous invocations, as OpenFaaS's gateway and queue-worker do them: the gateway
publishes the request on JetStream and answers 202; the worker invokes the function, then
POSTs its response to X-Callback-Url with X-Call-Id, X-Duration-Seconds,
X-Function-Status and X-Function-Name.

Unlike the community queue-worker, several invocations run at once (a stage holds its
invocation for minutes), the message is kept in progress while the function works, and
a function that is down (restarting) or busy (429: of-watchdog's max_inflight) gets the
request again a little later instead of losing it. The stream uses file storage, so
queued requests survive a restart.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time

import requests

from ..bus import Bus

log = logging.getLogger("faasci.queue")

STREAM = "faas-request"
DURABLE = "faas-queue-worker"
ACK_WAIT_S = 30
MAX_DELIVER = 20
HEARTBEAT_S = 10
STREAM_CONFIG = {"duplicate_window": 600}  # a repeated call id within 10 minutes is dropped


def request_message(
    function: str,
    path: str,
    method: str,
    query: str,
    headers: dict,
    body: bytes,
    call_id: str,
    callback_url: str | None,
) -> dict:
    return {
        "function": function,
        "path": path,
        "method": method,
        "query": query,
        "headers": headers,
        "body": base64.b64encode(body).decode(),
        "call_id": call_id,
        "callback_url": callback_url,
        "start_ns": time.time_ns(),
    }


# Headers that say who calls: part of a request's identity, so a caller without the
# platform's signing key can never make a request identical to an internal one.
CREDENTIAL_HEADERS = ("authorization", "x-faasci-signature")


def dedup_id(message: dict) -> str:
    """JetStream's Msg-Id for a request: a repeat is stored once. A digest of everything
    the function gets (function, method, path, query, call id, credentials and body), never
    the client's X-Call-Id alone, which anyone may set to the id of a hand-off to come (it
    would drop the real one). Only a byte-identical request, credentials included, is a
    duplicate; one that gets through twice anyway is harmless (stages claim attempts)."""
    headers = {k.lower(): v for k, v in message["headers"].items()}
    parts = [message["function"], message["method"], message["path"], message["query"],
             message["call_id"], *(headers.get(h, "") for h in CREDENTIAL_HEADERS)]  # fmt: skip
    return hashlib.sha256(json.dumps([*parts, message["body"]]).encode()).hexdigest()


async def enqueue(bus: Bus, message: dict) -> None:
    await bus.publish_json(f"{STREAM}.{message['function']}", message, msg_id=dedup_id(message))


async def ensure_queue(bus: Bus) -> None:
    await bus.ensure_stream(STREAM, [f"{STREAM}.>"], **STREAM_CONFIG)


async def backlog(bus: Bus) -> tuple[int, int]:
    """(requests waiting for the worker, requests it holds): its consumer's counts."""
    info = await (await bus.js()).consumer_info(STREAM, DURABLE)
    return info.num_pending, info.num_ack_pending


class QueueWorker:
    def __init__(self, bus: Bus, invoke, concurrency: int = 32):
        """`invoke(function, path, method, query, headers, body) -> (status, headers, body)`
        calls the function; it raises ConnectionError when the function cannot be reached."""
        self.bus, self.invoke, self.concurrency = bus, invoke, concurrency
        self.session = requests.Session()

    async def run(self) -> None:
        await self.bus.consume(STREAM, [f"{STREAM}.>"], DURABLE, self._handle,
                               ack_wait=ACK_WAIT_S, max_deliver=MAX_DELIVER,
                               concurrency=self.concurrency, **STREAM_CONFIG)  # fmt: skip

    async def _handle(self, msg) -> None:
        message = json.loads(msg.data)
        heartbeat = asyncio.create_task(self._keep_in_progress(msg))
        try:
            status, headers, body = await asyncio.to_thread(self._invoke, message)
            refused = f"busy (HTTP {status})" if status == 429 else None
        except ConnectionError as e:
            status, headers, body = 503, {}, json.dumps({"error": str(e)}).encode()
            refused = f"unreachable ({e})"
        finally:
            heartbeat.cancel()
        if refused and msg.metadata.num_delivered < MAX_DELIVER:
            log.warning("%s %s; redelivering", message["function"], refused)
            await msg.nak(delay=2)
            return
        await asyncio.to_thread(self._callback, message, status, headers, body)
        await msg.ack()

    def _invoke(self, message: dict) -> tuple[int, dict, bytes]:
        headers = {
            **message["headers"],
            "X-Call-Id": message["call_id"],
            "X-Start-Time": str(message["start_ns"]),
        }
        return self.invoke(
            message["function"],
            message["path"],
            message["method"],
            message["query"],
            headers,
            base64.b64decode(message["body"]),
        )

    async def _keep_in_progress(self, msg) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await msg.in_progress()

    def _callback(self, message: dict, status: int, headers: dict, body: bytes) -> None:
        url = message.get("callback_url")
        duration = (time.time_ns() - message["start_ns"]) / 1e9
        log.info(
            "async %s %s -> %s in %.3fs", message["function"], message["call_id"], status, duration
        )
        if not url:
            return
        try:
            self.session.post(
                url,
                data=body,
                timeout=30,
                headers={
                    "Content-Type": headers.get("Content-Type", "application/octet-stream"),
                    "X-Call-Id": message["call_id"],
                    "X-Duration-Seconds": f"{duration:.6f}",
                    "X-Function-Status": str(status),
                    "X-Function-Name": message["function"],
                },
            )
        except requests.RequestException as e:
            log.warning("callback to %s failed: %s", url, e)
