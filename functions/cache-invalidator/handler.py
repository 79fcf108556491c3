"""Keeps the S3 dependency cache honest: drops entries whose manifests changed (on a push,
from the webhook), and entries unused past the retention period (on its schedule)."""

from faasci import invalidation
from faasci.api import endpoint, is_cron


@endpoint
def handle(event, context):
    if is_cron(event):
        return invalidation.scheduled()
    return invalidation.route(event)
