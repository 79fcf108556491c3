"""The build stage: run this stage's commands of a run (see faasci.api.stage_router)."""

from faasci.api import stage_router

handle = stage_router("build")
