"""Starting runs: pin the repository to a commit, read its pipeline, record the run and
hand it to its first stage."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from . import STAGES, audit, downstream, git, images, pipeline, services, tracing
from .errors import Unprocessable
from .runs import Run, new_run
from .settings import settings
from .stage import hand_to_first

log = logging.getLogger("faasci.trigger")


def start_run(
    repo: str,
    ref: str | None = None,
    *,
    trigger: str = "manual",
    only: str | None = None,
    commit: str | None = None,
    dispatch_first: bool = True,
    env: dict[str, str] | None = None,
) -> Run:
    """Create a run of `repo` at `ref` (or at `commit`, recorded under `ref`).

    `only` makes a single-stage run (an HTTP invocation of one stage); `dispatch_first=False`
    leaves the first stage queued for the caller to execute. `env` adds to the pipeline's
    (a dependent's run: FAASCI_UPSTREAM, faasci.downstream)."""
    s = settings()
    s.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=s.workdir, prefix="resolve-") as scratch:
        resolved = git.resolve(repo, commit or ref, s.snapshots, scratch=Path(scratch))
        # Inside: a URL's commit is read from the clone in `scratch`.
        spec = pipeline.load(resolved.pipeline_text, resolved.files, resolved.name, resolved.read)
        entry = downstream.entry_for(spec, resolved, repo, ref if commit and ref else resolved.ref)
    spec.env.update(env or {})
    if only and only not in spec.stages:
        raise Unprocessable(f"the pipeline of {repo} has no stage {only!r}", field="stage")
    build = spec.stages.get("build")
    image = None  # a later stage alone acts on the image this commit's build pushed
    if only and build and build.docker and STAGES.index(only) > STAGES.index("build"):
        image = images.pushed_for(spec.service, build.docker, resolved.commit)
    run = new_run(
        spec,
        only=only,
        repo=repo,
        ref=ref if commit and ref else resolved.ref,
        commit=resolved.commit,
        source=resolved.source,
        path=resolved.path,
        snapshot=resolved.snapshot,
        trigger=trigger,
        image=image,
    )
    run.traceparent = tracing.begin_run(run)  # the root of the run's one trace
    audit.record("run.start", repo=repo, ref=run.ref, commit=run.commit, run=run.id,
                 detail={"trigger": trigger, **({"only": only} if only else {})})  # fmt: skip
    services.run_store().create(run)
    log.info("run %s: %s@%s (%s) from %s", run.id, run.service, run.ref, run.commit[:12], trigger)
    if dispatch_first:
        with tracing.within(run):  # the hand-off carries the run's traceparent
            hand_to_first(run.id, run.stages[0].name)  # guarded: never left queued
    if not only:  # the service catalog (faasci graph), and a push's version bump
        downstream.on_run_start(run, entry)
    return run


def scheduled(only: str | None = None) -> dict:
    """What a cron-connector request starts: one run per configured repository
    (SCHEDULED_REPOS, entries `<repo>` or `<repo>#<ref>`)."""
    started, failed = [], []
    for repo, ref in settings().scheduled():
        try:
            started.append(start_run(repo, ref, trigger="cron", only=only).id)
        except Exception as e:  # one bad entry must not stop the others
            log.warning("scheduled run of %s failed to start: %s", repo, e)
            failed.append({"repo": repo, "error": str(e)})
    return {"trigger": "cron", "started": started, "failed": failed}
