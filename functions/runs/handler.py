"""Run status and history as JSON: GET / lists runs, GET /<id> shows one, POST / starts one."""

from faasci import runs_api
from faasci.api import endpoint


@endpoint
def handle(event, context):
    return runs_api.route(event)
