"""The CLI's user configuration: where the gateway is, and which local stack (its stack file,
home and ports) `faasci up` last started, so `faasci` works from any directory.

A JSON file: FAASCI_CONFIG, else $XDG_CONFIG_HOME/faasci/config.json (~/.config/...).
It holds `gateway_url` and `stack_env`, the environment that points a process at the
stack (LocalConfig.env()).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


def path() -> Path:
    if os.environ.get("FAASCI_CONFIG"):
        return Path(os.environ["FAASCI_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "faasci" / "config.json"


def load(where: Path | None = None) -> dict:
    """The user configuration; {} when there is none or it cannot be read."""
    try:
        found = json.loads((where or path()).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def remember_stack(cfg, where: Path | None = None) -> Path:
    """Record the local stack `cfg` (a LocalConfig) as the one the CLI talks to, in the
    user configuration (or the file `where`)."""
    where = where or path()
    saved = {**load(where), "gateway_url": cfg.gateway_url, "stack_env": cfg.env()}
    where.parent.mkdir(parents=True, exist_ok=True)
    scratch = where.with_name(where.name + ".tmp")
    scratch.write_text(json.dumps(saved, indent=2) + "\n")
    scratch.replace(where)
    return where


def apply(env: dict | None = None) -> list[str]:
    """Point this process at the remembered local stack, unless FAASCI_STACK already names
    one: its variables are set where not set already (an explicit OPENFAAS_URL wins).
    Returns the names it set (none when no stack is remembered or its stack file is gone)."""
    env = os.environ if env is None else env
    if env.get("FAASCI_STACK"):
        return []
    saved = load()
    stack_env = saved.get("stack_env") or {}
    stack_file = stack_env.get("FAASCI_STACK")
    wanted = dict(stack_env) if stack_file and Path(stack_file).is_file() else {}
    if saved.get("gateway_url"):
        wanted.setdefault("OPENFAAS_URL", saved["gateway_url"])
    added = [key for key in wanted if key not in env]
    for key in added:
        env[key] = str(wanted[key])
    return added
