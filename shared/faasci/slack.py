"""Slack alerts for failed stages: the Block Kit message, and one delivery through slack-sdk.

Delivery is by incoming webhook (secret `slack-webhook-url`) or by a bot token (secret
`slack-bot-token`) posting to the channel SLACK_CHANNEL. `send` delivers one message or
says why not: SlackUnavailable when trying again later may work (the caller keeps the alert
queued), SlackRejected when it will not. Neither the webhook URL nor the token ever reaches a
log line or an exception message.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.webhook import WebhookClient

from .runs import Attempt, Run
from .settings import Settings

SLACK_API_URL = "https://slack.com/api/"

# Block Kit limits (https://docs.slack.dev/reference/block-kit/blocks/header-block,
# .../section-block, .../button-element): Slack refuses a message that exceeds one.
HEADER_MAX = 150  # a header's plain_text
TEXT_MAX = 3000  # a section's text
FIELDS_MAX = 10  # a section's fields, each at most 2000 characters
BUTTON_TEXT_MAX = 75
URL_MAX = 3000  # a button's url
# Our own budgets, well inside those limits: Slack also refuses a message whose blocks are
# long in total (msg_blocks_too_long, near 13 000 characters), so this one stays under ~6 000.
VALUE_CHARS = 200  # one field's value
ATTEMPT_CHARS = 120  # one attempt's line
ATTEMPTS_SHOWN = 20  # the last ones; pipelines allow 11 today
ERROR_CHARS = 800
LOG_LINES = 15
LOG_CHARS = 2000

# Delivery: slack-sdk's retry handlers share one count per request (a handler retries only
# while the request's retries so far are fewer than its max_retry_count), and every wait
# between attempts must end within WAIT_BUDGET, so a send blocks for at most about
# WAIT_BUDGET plus one request's timeout. A longer Retry-After is handed to the caller.
RETRIES = 3
CONNECTION_RETRIES = 2  # a Slack that is down stays down for a while: fail fast, retry later
BACKOFF = 0.25  # seconds; slack-sdk waits BACKOFF * 2**retries plus up to 1 s of jitter
WAIT_BUDGET = 30.0
TIMEOUT = 10.0  # seconds for one request
TRANSIENT_ERRORS = {
    "ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout",
}  # fmt: skip

# slack-sdk logs each request's URL (for a webhook, the secret itself) at DEBUG, and at INFO
# when it retries. Its clients get this logger, which passes only warnings and errors: those
# name the error, never the URL, and the SDK does not even format its debug lines.
_sdk_log = logging.getLogger("faasci.slack.sdk")
_sdk_log.setLevel(logging.WARNING)


class SlackError(Exception):
    """A message was not delivered."""


class SlackUnavailable(SlackError):
    """Slack could not be reached or kept failing: worth trying again, after `retry_after`
    seconds when Slack said so."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class SlackRejected(SlackError):
    """Slack refused the message or the credentials: sending it again will not help."""


# The message.


def alert_message(run: Run, stage: str, log_tail: str | None = None) -> dict:
    """The alert for a failed stage: Block Kit blocks and a plain fallback `text`."""
    attempts = run.stage(stage).attempts
    last = attempts[-1] if attempts else None
    commit = run.commit[:12] + (" (uncommitted snapshot)" if run.snapshot else "")
    plural = "" if len(attempts) == 1 else "s"
    fields = [
        ("Service", run.service),
        ("Stage", stage),
        ("Repository", run.repo),
        ("Ref", run.ref),
        ("Commit", commit),
        ("Attempts", str(len(attempts))),
        ("Run", run.id),
        ("Trigger", run.trigger),
    ]
    blocks: list[dict] = [
        {"type": "header", "text": _plain(f":x: {run.service}: {stage} failed", HEADER_MAX)},
        {
            "type": "section",
            "fields": [_mrkdwn(f"*{name}*\n{_head(value, VALUE_CHARS)}") for name, value in fields],
        },
    ]
    if attempts:
        lines = [_head(_outcome(a), ATTEMPT_CHARS) for a in attempts[-ATTEMPTS_SHOWN:]]
        if len(attempts) > ATTEMPTS_SHOWN:
            lines.insert(0, "…")
        blocks.append({"type": "section", "text": _mrkdwn("*Attempts*\n" + "\n".join(lines))})
    if last and last.error:
        error = _tail(last.error, ERROR_CHARS)
        blocks.append({"type": "section", "text": _mrkdwn(f"*Error*\n{error}")})
    if log_tail and log_tail.strip():
        lines = log_tail.rstrip().splitlines()[-LOG_LINES:]
        text = "\n".join(lines).replace("```", "``\u200b`")  # a fence in the log would end ours
        blocks.append(
            {"type": "section", "text": _mrkdwn(f"*Log tail*\n```\n{_tail(text, LOG_CHARS)}\n```")}
        )
    log = last.log if last and last.log and len(last.log) <= URL_MAX else None
    if log:
        button = {"type": "button", "text": _plain("Full log", BUTTON_TEXT_MAX), "url": log}
        blocks.append({"type": "actions", "elements": [button]})
    fallback = (
        f"{run.service}: stage {stage} failed on {run.ref} at {run.commit[:12]} "
        f"after {len(attempts)} attempt{plural}"
    )
    return {"text": _escape(fallback) + (f"\nLog: {log}" if log else ""), "blocks": blocks}


def _outcome(attempt: Attempt) -> str:
    parts = [f"#{attempt.number} {attempt.status}"]
    if attempt.reason:
        parts.append(attempt.reason)
    if attempt.exit_code is not None:
        parts.append(f"exit {attempt.exit_code}")
    if attempt.duration_s is not None:
        parts.append(f"{attempt.duration_s:.1f} s")
    return " · ".join(parts)


def _plain(text: str, limit: int) -> dict:
    return {"type": "plain_text", "text": _cut(text, limit), "emoji": True}


def _mrkdwn(text: str) -> dict:
    return {"type": "mrkdwn", "text": text}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _escape(text: str) -> str:
    """Slack's mrkdwn reads &, < and > as markup; these three are all it asks to escape."""
    return text.translate(_ESCAPES)


def _head(text: str, limit: int) -> str:
    """The start of `text`, escaped, in at most `limit` characters ("…" marks a cut)."""
    return _fit(text, limit, from_end=False)


def _tail(text: str, limit: int) -> str:
    """The end of `text`, escaped, in at most `limit` characters ("…" marks a cut)."""
    return _fit(text, limit, from_end=True)


def _fit(text: str, limit: int, from_end: bool) -> str:
    escaped = _escape(text)
    if len(escaped) <= limit:
        return escaped
    kept: list[str] = []
    room = limit - 1  # for the "…"
    for char in reversed(text) if from_end else text:  # whole escapes only, never half of one
        piece = _escape(char)
        if len(piece) > room:
            break
        kept.append(piece)
        room -= len(piece)
    if from_end:
        return "…" + "".join(reversed(kept))
    return "".join(kept) + "…"


# Delivery.


@dataclass(frozen=True, repr=False)
class SlackConfig:
    """Where alerts go. The webhook wins when both it and a bot token are mounted."""

    webhook_url: str | None = None
    token: str | None = None
    channel: str | None = None  # the bot token's channel: a name like #ci or an ID
    api_url: str = SLACK_API_URL
    timeout: float = TIMEOUT

    @classmethod
    def from_settings(cls, settings: Settings, env: Mapping[str, str] | None = None) -> SlackConfig:
        env = os.environ if env is None else env
        return cls(
            webhook_url=settings.secret("slack-webhook-url") or None,
            token=settings.secret("slack-bot-token") or None,
            channel=env.get("SLACK_CHANNEL") or None,
            api_url=env.get("SLACK_API_URL") or SLACK_API_URL,
        )

    @property
    def via(self) -> str | None:
        """How alerts go: "webhook", "api" (a bot token and a channel), or None (they can't)."""
        if self.webhook_url:
            return "webhook"
        return "api" if self.token and self.channel else None

    @property
    def configured(self) -> bool:
        return self.via is not None

    def redact(self, text: str) -> str:
        """`text` with the webhook URL and the token blanked out."""
        for secret in (self.webhook_url, self.token):
            if secret:
                text = text.replace(secret, "<redacted>")
        return text

    def __repr__(self) -> str:  # never the URL or the token: this lands in logs
        if self.via == "api":
            return f"SlackConfig(via='api', channel={self.channel!r}, api_url={self.api_url!r})"
        return f"SlackConfig(via={self.via!r})"


def send(config: SlackConfig, message: dict) -> str:
    """Deliver one message; returns its id: the `ts` from chat.postMessage, or "webhook".

    Retries 429 (waiting Retry-After), 5xx and connection errors within WAIT_BUDGET; then
    raises SlackUnavailable. Raises SlackRejected for a refusal that retrying cannot fix.
    """
    if not config.configured:
        raise SlackRejected(
            "Slack is not configured: mount the secret slack-webhook-url, or slack-bot-token "
            "and set SLACK_CHANNEL"
        )
    url = config.webhook_url if config.via == "webhook" else config.api_url
    if not url.lower().startswith(("https://", "http://")):  # slack-sdk would log it
        raise SlackRejected(f"the Slack {config.via} URL is not an http(s) URL")
    handlers = _retry_handlers(deadline=time.monotonic() + WAIT_BUDGET)
    try:
        if config.via == "webhook":
            return _via_webhook(config, message, handlers)
        return _via_api(config, message, handlers)
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
        reason = config.redact(str(e)) or type(e).__name__
        raise SlackUnavailable(f"Slack could not be reached: {reason}") from None


def _via_webhook(config: SlackConfig, message: dict, handlers: list[RetryHandler]) -> str:
    client = WebhookClient(
        config.webhook_url, timeout=config.timeout, logger=_sdk_log, retry_handlers=handlers
    )
    response = client.send_dict(message)
    if response.status_code == 200:  # Slack answers "ok"
        return "webhook"
    detail = config.redact(str(response.body or "").strip())[:200]
    _raise_for(response.status_code, response.headers, detail or f"HTTP {response.status_code}")
    raise SlackRejected(f"Slack refused the message: HTTP {response.status_code} {detail}")


def _via_api(config: SlackConfig, message: dict, handlers: list[RetryHandler]) -> str:
    client = WebClient(
        token=config.token,
        base_url=config.api_url,
        timeout=config.timeout,  # type: ignore[arg-type]
        logger=_sdk_log,
        retry_handlers=handlers,
    )
    try:
        response = client.chat_postMessage(channel=config.channel, **message)
    except SlackApiError as e:  # HTTP other than 200, or {"ok": false}
        failed = e.response
    else:
        return str(response["ts"])
    # Out of the except block: the SDK's exception is not chained onto ours.
    data = failed.data if isinstance(failed.data, dict) else {}
    error = config.redact(str(data.get("error") or f"HTTP {failed.status_code}"))
    _raise_for(failed.status_code, failed.headers, error)
    if error in TRANSIENT_ERRORS:  # HTTP 200 with {"ok": false}, yet worth another try
        raise SlackUnavailable(f"Slack failed: {error}", _retry_after(failed.headers))
    needed = f" (needs {data['needed']})" if data.get("needed") else ""
    raise SlackRejected(f"Slack refused the message: {error}{needed}")


def _raise_for(status: int, headers: Mapping, detail: str) -> None:
    """SlackUnavailable for statuses that retrying later may cure: 429 and 5xx."""
    if status == 429:
        wait = _retry_after(headers)
        raise SlackUnavailable(f"Slack is rate limiting: {detail}", wait)
    if status >= 500:
        raise SlackUnavailable(f"Slack failed: HTTP {status} {detail}", _retry_after(headers))


def _header(headers: Mapping, name: str) -> str | None:
    """A header's value from slack-sdk's responses, whose values may be lists."""
    for key, value in (headers or {}).items():
        if key.lower() == name.lower():
            return str(value[0] if isinstance(value, list) else value)
    return None


def _retry_after(headers: Mapping) -> float | None:
    try:
        return float(_header(headers, "Retry-After") or "")
    except ValueError:
        return None


# Retry handlers: slack-sdk's own, bounded by the send's deadline.


def _retry_handlers(deadline: float) -> list[RetryHandler]:
    return [_RateLimits(deadline), _ServerErrors(deadline), _ConnectionErrors(deadline)]


def _backoff_fits(deadline: float, retries_so_far: int) -> bool:
    return time.monotonic() + BACKOFF * 2**retries_so_far + 1 <= deadline


class _RateLimits(RateLimitErrorRetryHandler):
    """429: wait Retry-After (slack-sdk's behaviour), when the wait ends before the deadline."""

    def __init__(self, deadline: float):
        super().__init__(max_retry_count=RETRIES)
        self.deadline = deadline

    def _can_retry(self, *, state, request, response=None, error=None) -> bool:
        if response is None or response.status_code != 429:
            return False
        value = _header(response.headers, "Retry-After")
        if value is not None and not value.strip().isdigit():
            return False  # slack-sdk reads whole seconds only and would raise on anything else
        wait = (int(value) if value is not None else 1) + 1  # it adds up to 1 s of jitter
        return time.monotonic() + wait <= self.deadline


class _ServerErrors(ServerErrorRetryHandler):
    """Every 5xx (slack-sdk's handler takes 500 and 503 only), backing off."""

    def __init__(self, deadline: float):
        super().__init__(RETRIES, BackoffRetryIntervalCalculator(backoff_factor=BACKOFF))
        self.deadline = deadline

    def _can_retry(self, *, state, request, response=None, error=None) -> bool:
        return (
            response is not None
            and 500 <= response.status_code < 600
            and _backoff_fits(self.deadline, state.current_attempt)
        )


class _ConnectionErrors(ConnectionErrorRetryHandler):
    """Refused or reset connections, backing off."""

    def __init__(self, deadline: float):
        super().__init__(CONNECTION_RETRIES, BackoffRetryIntervalCalculator(backoff_factor=BACKOFF))
        self.deadline = deadline

    def _can_retry(self, *, state, request, response=None, error=None) -> bool:
        return super()._can_retry(
            state=state, request=request, response=response, error=error
        ) and _backoff_fits(self.deadline, state.current_attempt)
