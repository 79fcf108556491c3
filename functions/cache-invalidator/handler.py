"""Keeps the S3 dependency cache honest: drops entries whose manifests changed (on a push,
from the webhook), and entries unused past the retention period (on its schedule)."""

from faasci import invalidation
from faasci.api import Router

handle = Router("cache-invalidator", invalidation.ROUTES, on_schedule=invalidation.scheduled)
