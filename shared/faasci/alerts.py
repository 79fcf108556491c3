"""The one Slack alert of a failed run, posted by the notifier function.

The alert's state lives in the run record: a delivery is claimed there first (so two
notifiers never both send), the message goes out, and the result is recorded. While Slack
is unreachable or keeps refusing with 429/5xx, the alert stays pending and a timer invokes
the notifier again later: never dropped. A crash between Slack accepting the message and
the record saying so is the one window in which a second send could happen; the claim
expires only after SENDING_LEASE_S to keep that window to a crash.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from . import metrics, services, slack, timers
from .errors import Conflict
from .runs import Run, now
from .settings import settings
from .stage import invoke_with_retries

log = logging.getLogger("faasci.alerts")

SENDING_LEASE_S = 300
LOG_TAIL_BYTES = 3000


def redelivery_delay(tries: int) -> float:
    """10 s, doubling, at most 10 minutes."""
    return min(10 * 2 ** (tries - 1), 600)


def deliver(run_id: str) -> dict:
    config = slack.SlackConfig.from_settings(settings())
    store = services.run_store()
    run, mine = store.update(run_id, lambda r: _take(r, config.configured), "alert.sending")
    if not mine:
        return {"run_id": run_id, "alert": run.alert.status}
    stage = next(s for s in run.stages if s.status == "failed")
    message = slack.alert_message(run, stage.name, _log_tail(run, stage.name))
    try:
        delivery = metrics.alert_delivery(slack.send, config, message)  # counts the outcome
    except slack.SlackUnavailable as e:
        delay, why = e.retry_after or redelivery_delay(run.alert.tries), str(e)
        store.update(run_id, lambda r: _record(r, "pending", error=why), "alert.pending")
        timers.schedule(services.bus(), "notify", {"run_id": run_id, "try": run.alert.tries},
                        delay, f"{run_id}.notify.{run.alert.tries}")  # fmt: skip
        log.warning("run %s: Slack unavailable (%s); alert queued for %.0fs", run_id, e, delay)
        return {"run_id": run_id, "alert": "pending", "retry_in_s": delay}
    except slack.SlackRejected as e:
        why = str(e)
        store.update(run_id, lambda r: _record(r, "rejected", error=why), "alert.rejected")
        log.error("run %s: Slack refused the alert: %s", run_id, e)
        return {"run_id": run_id, "alert": "rejected", "error": str(e)}
    store.update(run_id, lambda r: _record(r, "sent", delivery=delivery), "alert.sent")
    log.info("run %s: alert sent", run_id)
    return {"run_id": run_id, "alert": "sent"}


def _take(run: Run, configured: bool) -> bool:
    """Claim the delivery; False when it is done, or being done by another notifier."""
    alert = run.alert
    if alert is None:
        raise Conflict(f"run {run.id} has no alert to send (it did not fail)", field="run_id")
    if alert.status == "sending" and now() - alert.sending_since < timedelta(
        seconds=SENDING_LEASE_S
    ):
        return False
    if alert.status not in ("pending", "sending"):
        return False
    if not configured:
        alert.status = "unconfigured"
        alert.last_error = "no slack-webhook-url or slack-bot-token secret"
        return False
    alert.status, alert.sending_since = "sending", now()
    alert.tries += 1
    return True


def _record(run: Run, status: str, error: str | None = None, delivery: str | None = None):
    alert = run.alert
    alert.status, alert.last_error, alert.sending_since = status, error, None
    if status == "sent":
        alert.sent_at, alert.delivery = now(), delivery


def _log_tail(run: Run, stage: str) -> str | None:
    attempt = run.stage(stage).attempts[-1] if run.stage(stage).attempts else None
    if attempt is None or attempt.log_key is None:
        return None
    try:  # only the tail is read: a log may be up to its cap (100 MB by default)
        objects = services.objects()
        size = (objects.head(attempt.log_key) or {}).get("size", 0)
        tail = b"".join(objects.stream(attempt.log_key, start=max(0, size - LOG_TAIL_BYTES)))
        return tail.decode(errors="replace")
    except Exception as e:  # the alert matters more than its excerpt
        log.warning("run %s: no log tail for the alert: %s", run.id, e)
        return None


def on_notify_timer(timer: dict) -> None:
    """A queued alert's wait is over: invoke the notifier again."""
    invoke_with_retries("notifier", {"run_id": timer["run_id"]},
                        f"{timer['run_id']}.notify.retry.{timer['try']}")  # fmt: skip
