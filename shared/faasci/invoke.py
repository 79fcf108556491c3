"""The one client for invoking functions through an OpenFaaS gateway, sync or async."""

from __future__ import annotations

import json
import uuid

import requests

ASYNC_BODY_LIMIT = 256_000  # the queue-worker's cap; async bodies carry references only


class InvocationError(Exception):
    """The gateway did not accept an invocation."""


class Gateway:
    def __init__(self, url: str, timeout: float = 30):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def call(
        self,
        function: str,
        body: dict | bytes | None = None,
        *,
        path: str = "",
        method: str = "POST",
        headers: dict | None = None,
        timeout: float | None = None,
        query: dict | None = None,
    ) -> requests.Response:
        """Invoke synchronously and return the function's response, whatever its status."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return self.session.request(
            method,
            f"{self.url}/function/{function}{'/' + path if path else ''}",
            data=data,
            params=query,
            timeout=timeout or self.timeout,
            headers={"Content-Type": "application/json", **(headers or {})},
        )

    def call_async(
        self,
        function: str,
        body: dict,
        *,
        call_id: str | None = None,
        callback_url: str | None = None,
        headers: dict | None = None,
    ) -> str:
        """Queue an invocation; returns its call id. Raises InvocationError unless 202."""
        data = json.dumps(body).encode()
        if len(data) > ASYNC_BODY_LIMIT:
            raise InvocationError(f"async body of {len(data)} bytes is over {ASYNC_BODY_LIMIT}")
        extra = {"X-Call-Id": call_id or str(uuid.uuid4())}
        if callback_url:
            extra["X-Callback-Url"] = callback_url
        try:
            resp = self.session.post(
                f"{self.url}/async-function/{function}",
                data=data,
                timeout=self.timeout,
                headers={"Content-Type": "application/json", **extra, **(headers or {})},
            )
        except requests.RequestException as e:
            raise InvocationError(f"gateway {self.url} unreachable: {e}") from None
        if resp.status_code != 202:
            raise InvocationError(f"async {function}: HTTP {resp.status_code} {resp.text[:200]}")
        return resp.headers.get("X-Call-Id", extra["X-Call-Id"])
