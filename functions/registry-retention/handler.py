"""Deletes image tags older than FAASCI_RETENTION_DAYS that no environment references and
no recent run promoted, then has the registry collect their blobs (faasci.retention)."""

from faasci import retention
from faasci.api import Router

handle = Router("registry-retention", retention.ROUTES, on_schedule=retention.scheduled)
