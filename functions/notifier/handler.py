"""Posts the one Slack alert of a failed run: {"run_id": ...}, from the bundle itself (a
stage whose run failed, or the timer of a queued alert); and a service's budget alert:
{"budget": {...}} (faasci.costs.BudgetAlert, from the stage whose attempt reached it)."""

from faasci import alerts, costs
from faasci.api import Route, Router, json_body, run_id_field


def notify(event, principal):
    body = json_body(event)
    if "budget" in body:  # a service's spend reached a threshold of its budget (faasci.costs)
        return costs.deliver_budget_alert(body["budget"])
    return alerts.deliver(run_id_field(body.get("run_id")))


handle = Router("notifier", [Route("POST", "/", "internal", notify)])
