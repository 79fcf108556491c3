"""Fires the bundle's delayed work (retry back-offs, lease checks of running attempts,
alert redelivery) from a JetStream timer stream; GET answers how many timers fired."""

from faasci import timers_service
from faasci.api import Route, Router

worker = timers_service.start()  # every replica shares the stream's durable consumer

handle = Router("timers", [Route("GET", "/", "viewer", lambda event, p: {"fired": worker.fired})])
