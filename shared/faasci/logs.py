"""Stage logs stored in S3, served by the pipeline-log function to viewers, and to anyone
holding the attempt's link (a Slack alert's "Full log" opens without a token).

A link carries `?sig=<expiry>.<random>`, and the run record keeps the link it was given:
the log opens when the two match and the expiry has not passed. Nothing to verify it
with rotates away (a key-signed link would die with the signing key's overlap window).
"""

from __future__ import annotations

import hmac
import secrets
import time
from urllib.parse import parse_qs, urlsplit

from . import STAGES
from .api import Route, run_id_field
from .errors import NotFound, UserError
from .services import objects, run_store
from .settings import settings

FUNCTION = "pipeline-log"
LINK_TTL_S = 7 * 24 * 3600


def log_key(run_id: str, stage: str, attempt: int) -> str:
    return f"logs/{run_id}/{stage}/{attempt}.log"


def log_link(run_id: str, stage: str, attempt: int) -> str:
    """The URL of an attempt's log: it opens without a token for LINK_TTL_S once the run
    record holds it."""
    sig = f"{int(time.time() + LINK_TTL_S)}.{secrets.token_urlsafe(24)}"
    return f"{settings().public_url}/function/{FUNCTION}/{run_id}/{stage}/{attempt}?sig={sig}"


def link_opens(event, run_id: str, stage: str, attempt: str) -> bool:
    """Is the request's ?sig= the unexpired one of this attempt's recorded link?"""
    sig = event.query.get("sig", "")
    expiry = sig.partition(".")[0]
    if not expiry.isdigit() or int(expiry) < time.time() or not attempt.isdigit():
        return False
    try:
        found = run_store().get(run_id_field(run_id)).stage(stage).attempts
    except (UserError, KeyError, ValueError):  # no such run or stage: not a link of ours
        return False
    recorded = [a.log for a in found if a.number == int(attempt) and a.log]
    given = parse_qs(urlsplit(recorded[0]).query).get("sig", [""])[0] if recorded else ""
    return bool(given) and hmac.compare_digest(given.encode(), sig.encode())


def serve(event, principal, run_id: str, stage: str, attempt: str | None = None) -> dict:
    """GET /<run id>/<stage>[/<attempt>]: the log as plain text (the last attempt by default)."""
    run_id = run_id_field(run_id)
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}", field="stage")
    if attempt is not None:
        if not attempt.isdigit():
            raise UserError("attempt must be a positive whole number", field="attempt")
        number = int(attempt)
    else:
        attempts = run_store().get(run_id).stage(stage).attempts
        if not attempts:
            raise NotFound(f"stage {stage} of run {run_id} has not run", field="stage")
        number = attempts[-1].number
    text = objects().get_bytes(log_key(run_id, stage, number))
    return {
        "statusCode": 200,
        "body": text,
        "headers": {"Content-Type": "text/plain; charset=utf-8"},
    }


ROUTES = [
    Route("GET", "/<run_id>/<stage>", "viewer", serve),
    Route("GET", "/<run_id>/<stage>/<attempt>", "viewer", serve, link=link_opens),
]
