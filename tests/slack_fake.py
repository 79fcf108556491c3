"""A local Slack for tests: an incoming webhook and chat.postMessage on 127.0.0.1, speaking
Slack's wire formats, with a script of answers to play first (rate limits, outages).

The formats, as Slack documents them:
- Incoming webhooks take a JSON body; success is HTTP 200 with the body `ok`, and an error
  is HTTP 400 (invalid_payload, no_text, invalid_blocks), 403 (action_prohibited,
  invalid_token), 404 (channel_not_found, no_service), 410 (channel_is_archived) or 500
  (rollup_error) with the error code as a plain-text body.
  https://api.slack.com/changelog/2016-05-17-changes-to-errors-for-incoming-webhooks
  https://docs.slack.dev/messaging/sending-messages-using-incoming-webhooks
- chat.postMessage is a POST, form-encoded or JSON (blocks as a JSON string in a form), with
  the token as `Authorization: Bearer xoxb-...` or a `token` field. It answers HTTP 200 with
  {"ok": true, "channel": <ID>, "ts": "<seconds>.<micros>", "message": {...}} or
  {"ok": false, "error": "invalid_auth" | "channel_not_found" | ...}.
  https://docs.slack.dev/reference/methods/chat.postMessage
- A rate limit is HTTP 429 with `Retry-After: <seconds>`, on webhooks and the Web API alike.
  https://api.slack.com/docs/rate-limits
- Block Kit limits, checked here as Slack checks them (invalid_blocks):
  https://docs.slack.dev/reference/block-kit/blocks/header-block and .../section-block
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl


@dataclass
class Reply:
    """One scripted answer. Reply() is Slack's normal behaviour (deliver, or refuse a bad
    request); anything else is answered as given, and nothing is delivered."""

    status: int = 200
    error: str | None = None  # the webhook's body, or the Web API's "error"
    retry_after: int | None = None

    @property
    def normal(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass
class Seen:
    """A request as the fake received it, and the HTTP status it answered."""

    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    payload: dict | None  # the JSON body, or the form's fields with `blocks` decoded
    at: float = field(default_factory=time.monotonic)
    status: int = 0


class SlackFake:
    """Slack on a free local port. `webhook_url` and `api_url` (ending in /api/) point at it;
    `delivered` holds each message Slack would have posted; `requests` every request seen."""

    def __init__(
        self,
        token: str = "xoxb-1111111111-2222222222-fakefakefakefakefakefake",
        channels: dict[str, str] | None = None,
    ):
        self.token = token
        self.channels = channels or {"#ci-alerts": "C0CIALERTS"}  # name -> ID
        self.webhook_path = f"/services/T0FAKE000/B0FAKE000/{secrets.token_hex(12)}"
        self.requests: list[Seen] = []
        self.delivered: list[dict] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._ts = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def webhook_url(self) -> str:
        return self.url + self.webhook_path

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order; normally after that."""
        with self._lock:
            self._script.extend(replies)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def go_down(self) -> None:
        """Stop answering: connections to the port are refused, as when Slack is unreachable."""
        self.close()

    def come_back(self) -> None:
        """Answer again, on the same port (the URLs given out stay valid)."""
        port = self._server.server_address[1]
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> SlackFake:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # What a request gets: (status, headers, body).

    def _answer(self, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(seen)
            reply = self._script.popleft() if self._script else Reply()
        api = seen.path.startswith("/api/")
        if not reply.normal:
            return _scripted(reply, api)
        if seen.path == "/api/chat.postMessage":
            return self._post_message(seen)
        if api:
            return _json(404, {"ok": False, "error": "unknown_method"})
        if seen.path == self.webhook_path:
            return self._webhook(seen)
        return _text(404, "no_service")  # no webhook at this URL

    def _webhook(self, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        message = seen.payload
        if not isinstance(message, dict):
            return _text(400, "invalid_payload")
        if not (message.get("text") or message.get("blocks") or message.get("attachments")):
            return _text(400, "no_text")
        if message.get("blocks") is not None and block_kit_problems(message["blocks"]):
            return _text(400, "invalid_blocks")
        with self._lock:
            self.delivered.append(message)
        return _text(200, "ok")

    def _post_message(self, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        args = seen.payload if isinstance(seen.payload, dict) else {}
        auth = seen.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else args.get("token")
        if not token:
            return _json(200, {"ok": False, "error": "not_authed"})
        if token != self.token:
            return _json(200, {"ok": False, "error": "invalid_auth"})
        channel = args.get("channel")
        ids = set(self.channels.values())
        if channel not in self.channels and channel not in ids:
            return _json(200, {"ok": False, "error": "channel_not_found"})
        if not (args.get("text") or args.get("blocks") or args.get("attachments")):
            return _json(200, {"ok": False, "error": "no_text"})
        if args.get("blocks") is not None and block_kit_problems(args["blocks"]):
            return _json(200, {"ok": False, "error": "invalid_blocks"})
        with self._lock:
            self._ts += 1
            ts = f"{int(time.time())}.{self._ts:06d}"
            message = {k: v for k, v in args.items() if k != "token"}
            self.delivered.append({**message, "ts": ts})
        posted = {
            "type": "message",
            "subtype": "bot_message",
            "bot_id": "B0FAKEBOT",
            "text": args.get("text", ""),
            "ts": ts,
            **({"blocks": args["blocks"]} if args.get("blocks") else {}),
        }
        return _json(200, {"ok": True, "channel": self.channels.get(channel, channel),
                           "ts": ts, "message": posted})  # fmt: skip


def unused_port() -> int:
    """A local port nothing listens on (bound, then released): a Slack that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def block_kit_problems(blocks) -> list[str]:
    """What Slack would refuse in these blocks (as invalid_blocks); empty when none."""
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 50:
        return ["blocks must be a list of 1 to 50 blocks"]
    problems: list[str] = []

    def text(obj, where: str, limit: int, kinds=("plain_text", "mrkdwn")) -> None:
        if not isinstance(obj, dict) or obj.get("type") not in kinds:
            problems.append(f"{where}: not a {' or '.join(kinds)} text object")
        elif not isinstance(obj.get("text"), str) or not 1 <= len(obj["text"]) <= limit:
            problems.append(f"{where}: text must be 1 to {limit} characters")

    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        where = f"blocks[{i}] ({kind})"
        if kind == "header":
            text(block.get("text"), where, 150, kinds=("plain_text",))
        elif kind == "section":
            if "text" not in block and "fields" not in block:
                problems.append(f"{where}: needs text or fields")
            if "text" in block:
                text(block["text"], where, 3000)
            fields = block.get("fields", [])
            if len(fields) > 10:
                problems.append(f"{where}: more than 10 fields")
            for j, f in enumerate(fields):
                text(f, f"{where}.fields[{j}]", 2000)
        elif kind == "context":
            elements = block.get("elements") or []
            if not 1 <= len(elements) <= 10:
                problems.append(f"{where}: 1 to 10 elements")
            for j, e in enumerate(elements):
                text(e, f"{where}.elements[{j}]", 3000)
        elif kind == "actions":
            elements = block.get("elements") or []
            if not 1 <= len(elements) <= 25:
                problems.append(f"{where}: 1 to 25 elements")
            for j, e in enumerate(elements):
                if e.get("type") == "button":
                    text(e.get("text"), f"{where}.elements[{j}]", 75, kinds=("plain_text",))
                    if len(e.get("url", "")) > 3000:
                        problems.append(f"{where}.elements[{j}]: url over 3000 characters")
        elif kind != "divider":
            problems.append(f"{where}: unknown block type")
    return problems


def _scripted(reply: Reply, api: bool) -> tuple[int, dict[str, str], bytes]:
    defaults = {429: ("rate_limited", "ratelimited")}
    webhook_error, api_error = defaults.get(
        reply.status, ("rollup_error", "internal_error") if reply.status >= 500 else ("", "")
    )
    if api:
        answer = _json(reply.status, {"ok": False, "error": reply.error or api_error})
    else:
        answer = _text(reply.status, reply.error or webhook_error)
    status, headers, body = answer
    if reply.retry_after is not None:
        headers["Retry-After"] = str(reply.retry_after)
    return status, headers, body


def _json(status: int, data: dict) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(data).encode()


def _text(status: int, text: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "text/html"}, text.encode()


def _parse(content_type: str, body: bytes) -> dict | None:
    try:
        if content_type.startswith("application/x-www-form-urlencoded"):
            form = dict(parse_qsl(body.decode(), keep_blank_values=True))
            if "blocks" in form:
                form["blocks"] = json.loads(form["blocks"])
            return form
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _handler_for(fake: SlackFake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen = Seen(self.path, headers, body, _parse(headers.get("content-type", ""), body))
            status, reply_headers, reply = fake._answer(seen)
            seen.status = status
            self.send_response(status)
            for name, value in reply_headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format, *args) -> None:  # quiet: pytest shows failures
            pass

    return Handler
