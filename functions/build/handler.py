"""The build stage: run this stage's commands of a run (see faasci.api.stage_handler)."""

from faasci.api import stage_handler

handle = stage_handler("build")
