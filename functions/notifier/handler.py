"""Posts the one Slack alert of a failed run: {"run_id": ...}, from the bundle itself (a
stage whose run failed, or the timer of a queued alert)."""

from faasci import alerts
from faasci.api import Route, Router, json_body, run_id_field


def notify(event, principal):
    return alerts.deliver(run_id_field(json_body(event).get("run_id")))


handle = Router("notifier", [Route("POST", "/", "internal", notify)])
