"""Starts runs from git push events (and from cron-connector's schedule)."""

from faasci import webhooks
from faasci.api import endpoint, is_cron, json_body
from faasci.trigger import scheduled


@endpoint
def handle(event, context):
    if is_cron(event):
        return scheduled()
    return webhooks.on_push(json_body(event))
