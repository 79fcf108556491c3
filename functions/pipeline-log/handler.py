"""Serves stored stage logs: GET /<run id>/<stage>[/<attempt>] as plain text."""

from faasci import logs
from faasci.api import endpoint


@endpoint
def handle(event, context):
    return logs.serve(event.path)
