"""Serves stored stage logs: GET /<run id>/<stage>[/<attempt>] as plain text, to viewers and
to holders of a signed link."""

from faasci import logs
from faasci.api import Router

handle = Router("pipeline-log", logs.ROUTES)
