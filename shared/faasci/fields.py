"""Field types the pipeline file's models share (faasci.pipeline, and the models of the
delivery steps it holds: faasci.rollout, …)."""

from typing import Annotated

from pydantic import BeforeValidator


def _scalar(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError("must be a string, a number or a boolean")


# An environment variable's value as YAML may write it: `true`, 3 and "x" are all strings.
EnvValue = Annotated[str, BeforeValidator(_scalar)]
