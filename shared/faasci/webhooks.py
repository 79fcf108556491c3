"""Git host webhooks: a push event (GitHub / Gitea form) starts a run of the pushed commit."""

from __future__ import annotations

from .errors import UserError
from .trigger import start_run

ZERO_SHA = "0" * 40


def on_push(event: dict) -> dict:
    repository = event.get("repository")
    if not isinstance(repository, dict):
        raise UserError("push event has no repository object", field="repository")
    url = repository.get("clone_url") or repository.get("git_url") or repository.get("url")
    ref, after = event.get("ref"), event.get("after")
    if not isinstance(url, str) or not url:
        raise UserError("push event has no repository.clone_url", field="repository.clone_url")
    if not isinstance(ref, str) or not ref.startswith(("refs/heads/", "refs/tags/")):
        raise UserError(
            "push event ref must be refs/heads/<branch> or refs/tags/<tag>", field="ref"
        )
    if after == ZERO_SHA:
        return {"ignored": f"{ref} was deleted"}
    if after is not None and not (isinstance(after, str) and len(after) == 40):
        raise UserError("push event after must be a 40-character commit sha", field="after")
    name = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    run = start_run(url, name, trigger="push", commit=after)
    return {"statusCode": 202, "body": {"run_id": run.id, "commit": run.commit, "ref": run.ref}}
