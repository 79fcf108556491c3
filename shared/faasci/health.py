"""Readiness: can this function do its work now? Its secrets are mounted, its cap settings
read, NATS is connected and S3 answers.

The template serves this on /_/ready (of-watchdog proxies it there through `ready_path`);
/_/health never asks it: a failed liveness probe restarts the container, which brings no
NATS back. A probe comes every few seconds from each kubelet, so the answer is kept for
CACHE_S and every check is bounded by a short timeout.
"""

from __future__ import annotations

import logging
import threading
import time

import requests

from . import caps, services
from .bus import NatsUnreachable
from .settings import settings

log = logging.getLogger("faasci.health")

REQUIRED_SECRETS = ("s3-access-key", "s3-secret-key")  # every function's, in stack.yml
CACHE_S = 2.0
TIMEOUT_S = 1.0

_lock = threading.Lock()
_answer: tuple[float, bool, dict] | None = None  # (when, ok, body)


def ready() -> tuple[bool, dict]:
    """(ok, JSON body) for /_/ready; a failure names the setting or secret to fix."""
    global _answer
    with _lock:  # probes arriving together share one check
        if _answer is None or time.monotonic() - _answer[0] > CACHE_S:
            try:
                problem = _problem()
            except Exception as e:  # a broken check still answers, and is logged once
                problem = f"the readiness check failed: {type(e).__name__}: {e}", None
            body = {"status": "ok"}
            if problem:
                body = {"status": "unavailable", "error": problem[0], "setting": problem[1]}
            if _answer is None or body != _answer[2]:  # logged on a change, not per probe
                if problem:
                    log.warning("not ready: %s", problem[0])
                elif _answer is not None:
                    log.info("ready again")
            _answer = (time.monotonic(), problem is None, body)
        return _answer[1], _answer[2]


def _problem() -> tuple[str, str | None] | None:
    """The first thing in the way, as (message, setting), or None."""
    s = settings()
    for name in REQUIRED_SECRETS:
        if not (s.secrets_dir / name).is_file():
            return f"secret {name} is not mounted (no file {s.secrets_dir / name})", name
    try:
        caps.check_settings()
    except ValueError as e:  # "FAASCI_CAP_SCOPE='false' is not one of ...": names its setting
        return str(e), str(e).partition("=")[0]
    bus = services.bus()
    if not bus.connected(wait=TIMEOUT_S):
        down = NatsUnreachable(bus.url)
        return str(down), down.setting
    # Any HTTP answer means S3 is there (403 unsigned, 404 for a bucket made on first use):
    # one unsigned HEAD, so a start does not wait for boto3 (~50 ms) to answer its probe.
    endpoint = s.s3_endpoint or f"https://s3.{s.s3_region}.amazonaws.com"
    try:
        requests.head(f"{endpoint.rstrip('/')}/{s.bucket}", timeout=TIMEOUT_S)
    except requests.RequestException as e:  # no connection, or a timeout
        where = s.s3_endpoint or "AWS"
        return f"S3 at {where} (S3_ENDPOINT) is unreachable: {type(e).__name__}", "S3_ENDPOINT"
    return None


def reset() -> None:
    """Forget the kept answer (after the settings change)."""
    global _answer
    _answer = None
