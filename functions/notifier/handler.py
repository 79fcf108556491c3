"""Posts the one Slack alert of a failed run: {"run_id": ...} (invoked when retries ran out)."""

from faasci import alerts
from faasci.api import endpoint, json_body, run_id_field


@endpoint
def handle(event, context):
    return alerts.deliver(run_id_field(json_body(event).get("run_id")))
