"""Run status and history as JSON: GET / lists runs, GET /<id> shows one, POST / starts one,
POST /<id>/cancel stops one (routes and roles: faasci.runs_api.ROUTES)."""

from faasci import runs_api
from faasci.api import Router

handle = Router("runs", runs_api.ROUTES)
