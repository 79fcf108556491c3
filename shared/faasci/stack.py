"""Reading stack.yml as faas-cli does: `${VAR:-default}` substitution in stack.yml,
environment_file merged over each function's own environment, secrets, labels,
annotations, limits and the template's fprocess; the result is the deployment faas-cli
would send for each function."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

ENV_RE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def substitute(text: str, env: dict[str, str]) -> str:
    return ENV_RE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


@dataclass
class FunctionSpec:
    """One function's deployment (faas-provider's FunctionDeployment)."""

    name: str
    # The handler folder the local process mode runs; None for a deployment of an image only.
    handler: Path | None = None
    image: str = ""
    env_process: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)  # {memory, cpu}
    requests: dict[str, str] = field(default_factory=dict)
    constraints: list[str] = field(default_factory=list)
    read_only_root_filesystem: bool = False

    @property
    def schedule(self) -> str | None:
        """The cron schedule cron-connector would honour for this function, if any."""
        if self.annotations.get("topic") == "cron-function":
            return self.annotations.get("schedule")
        return None


@dataclass
class Stack:
    path: Path
    gateway: str
    functions: dict[str, FunctionSpec]

    @property
    def gateway_port(self) -> int:
        return urlparse(self.gateway).port or 8080


def load(path: Path, env: dict[str, str] | None = None) -> Stack:
    env = dict(os.environ) if env is None else env
    base = path.parent
    data = yaml.safe_load(substitute(path.read_text(), env))
    functions = {}
    for name, spec in (data.get("functions") or {}).items():
        # As faas-cli: environment files are plain YAML, and their keys win.
        environment = _strings(spec.get("environment"))
        for extra in spec.get("environment_file") or []:
            loaded = yaml.safe_load((base / extra).read_text()) or {}
            environment.update(_strings(loaded.get("environment")))
        functions[name] = FunctionSpec(
            name=name,
            handler=(base / spec["handler"]).resolve(),
            image=spec.get("image", ""),
            env_process=spec.get("fprocess") or _fprocess(base, spec.get("lang")),
            environment=environment,
            secrets=list(spec.get("secrets") or []),
            labels=_strings(spec.get("labels")),
            annotations=_strings(spec.get("annotations")),
            limits=_strings(spec.get("limits")),
            requests=_strings(spec.get("requests")),
            constraints=list(spec.get("constraints") or []),
            read_only_root_filesystem=bool(spec.get("readonly_root_filesystem")),
        )
    return Stack(path=path, gateway=data["provider"]["gateway"], functions=functions)


def _fprocess(base: Path, lang: str | None) -> str:
    """The template's fprocess, which faas-cli sends as envProcess; "" without the template."""
    template = base / "template" / str(lang) / "template.yml"
    if not lang or not template.is_file():
        return ""
    return str((yaml.safe_load(template.read_text()) or {}).get("fprocess") or "")


def _strings(mapping) -> dict[str, str]:
    return {str(k): "" if v is None else str(v) for k, v in (mapping or {}).items()}
