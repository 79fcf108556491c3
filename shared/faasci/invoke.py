"""The one client for invoking functions through an OpenFaaS gateway, sync or async.

Every /function and /async-function request carries credentials: a bearer token when one
is given (the CLI, tests: a str, or a callable giving a fresh one), else the bundle's
internal signature when this process holds the signing secret (functions). /system calls
use the gateway's basic auth (`system_auth`), which never travels to a function.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import requests
import urllib3

from . import auth, tracing

ASYNC_BODY_LIMIT = 256_000  # the queue-worker's cap; async bodies carry references only


class Credentials(requests.auth.AuthBase):
    """requests' auth hook: chooses per request, so whatever goes through the session
    (Gateway's calls, or session.get/post of a test) is authenticated the right way."""

    def __init__(self, token: str | Callable[[], str] | None, system_auth: tuple | None):
        self.token, self.system_auth = token, system_auth

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        path = unquote(urlsplit(r.url).path)
        if path.lstrip("/").partition("/")[0] == "system" and self.system_auth:
            return requests.auth.HTTPBasicAuth(*self.system_auth)(r)
        body = r.body.encode() if isinstance(r.body, str) else (r.body or b"")
        try:
            r.headers.update(self.for_function(r.method, path, body, r.headers))
        except auth.Unavailable as e:  # as a failed connection: callers retry those
            raise requests.ConnectionError(e.message) from None
        return r

    def for_function(self, method: str, path: str, body: bytes, given) -> dict[str, str]:
        """The headers that authenticate a request to /function or /async-function `path`:
        the bearer token, else this function's signature; none for another path, or when
        the request has its own Authorization. Raises auth.Unavailable when it cannot sign."""
        kind, _, rest = path.lstrip("/").partition("/")
        if kind not in ("function", "async-function") or any(
            name.lower() == "authorization" for name in given
        ):
            return {}
        if self.token:
            token = self.token() if callable(self.token) else self.token
            return {"Authorization": f"Bearer {token}"}
        function, _, inner = rest.partition("/")
        return auth.sign_headers(method, auth.canonical_path(function, inner), body)


class InvocationError(Exception):
    """The gateway did not accept an invocation."""


class Gateway:
    def __init__(
        self,
        url: str,
        timeout: float = 30,
        token: str | Callable[[], str] | None = None,
        system_auth: tuple[str, str] | None = None,
        trust_env: bool = True,
    ):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        # A function's gateway is its cluster's own: no proxy from the environment, and no
        # ~/.netrc, read on every request otherwise. A person's may be behind a proxy.
        self.session.trust_env = trust_env
        self.session.auth = self.credentials = Credentials(token, system_auth)
        # Async invocations, a function's every hand-off, go through urllib3 itself: requests'
        # own work on a call (~0.4 ms of CPU) is more than urllib3's. Never retried here.
        self.pool = urllib3.PoolManager(retries=False)

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
            # The current span's traceparent: the function continues its trace.
            headers=tracing.inject({"Content-Type": "application/json", **(headers or {})}),
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
        path = f"/async-function/{function}"
        sent = tracing.inject({"Content-Type": "application/json", **extra, **(headers or {})})
        try:
            sent.update(self.credentials.for_function("POST", path, data, sent))
            resp = self.pool.request("POST", self.url + path, body=data, headers=sent,
                                     timeout=urllib3.Timeout(connect=self.timeout,
                                                             read=self.timeout),
                                     redirect=False)  # fmt: skip
        except auth.Unavailable as e:
            raise InvocationError(f"gateway {self.url} unreachable: {e.message}") from None
        except urllib3.exceptions.HTTPError as e:
            raise InvocationError(f"gateway {self.url} unreachable: {e}") from None
        if resp.status != 202:
            text = resp.data[:200].decode(errors="replace")
            raise InvocationError(f"async {function}: HTTP {resp.status} {text}")
        return resp.headers.get("X-Call-Id", extra["X-Call-Id"])
