"""Starts runs from git push events (the git host's signature is checked by
faasci.webhooks.handle) and from cron-connector's schedule."""

from faasci import webhooks
from faasci.api import Route, Router
from faasci.trigger import scheduled

handle = Router(
    "webhook",
    [Route("POST", "/", "webhook", lambda event, principal: webhooks.handle(event))],
    on_schedule=scheduled,
)
