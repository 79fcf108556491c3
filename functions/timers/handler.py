"""Fires the bundle's delayed work (retry back-offs, lease checks of running attempts,
alert redelivery) from a JetStream timer stream; GET answers how many timers fired."""

from faasci import timers_service
from faasci.api import endpoint

worker = timers_service.start()  # every replica shares the stream's durable consumer


@endpoint
def handle(event, context):
    return {"fired": worker.fired}
