"""Stage logs stored in S3, served by the pipeline-log function."""

from __future__ import annotations

from . import STAGES
from .api import run_id_field
from .errors import NotFound, UserError
from .services import objects, run_store
from .stage import log_key


def serve(path: str) -> dict:
    """GET /<run id>/<stage>[/<attempt>]: the log as plain text (the last attempt by default)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) not in (2, 3):
        raise NotFound("expected /<run id>/<stage>[/<attempt>]", field="path")
    run_id, stage = run_id_field(parts[0]), parts[1]
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}", field="stage")
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise UserError("attempt must be a positive whole number", field="attempt")
        attempt = int(parts[2])
    else:
        attempts = run_store().get(run_id).stage(stage).attempts
        if not attempts:
            raise NotFound(f"stage {stage} of run {run_id} has not run", field="stage")
        attempt = attempts[-1].number
    text = objects().get_bytes(log_key(run_id, stage, attempt))
    return {
        "statusCode": 200,
        "body": text,
        "headers": {"Content-Type": "text/plain; charset=utf-8"},
    }
