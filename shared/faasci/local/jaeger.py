"""A real Jaeger beside the local stack (`faasci up --observe`): the all-in-one program
(Jaeger v2, an OpenTelemetry Collector) built from the Go module proxy by
./scripts/install into the venv's bin/, with in-memory storage.

It takes the functions' spans over OTLP/HTTP on `jaeger_otlp_port` (4318) and serves its
UI and query API on `jaeger_ui_port` (16686: /trace/<trace id>, /api/traces/<trace id>).
Its configuration is written into the stack's home with every port named and bound to
127.0.0.1 (the built-in one listens on a dozen fixed ports: two stacks would collide),
and its own telemetry off.
"""

from __future__ import annotations

from pathlib import Path

import requests
import yaml

from . import processes
from .config import LocalConfig, tool

MAX_TRACES = 50_000  # in memory: the oldest traces go first past this


def config(cfg: LocalConfig) -> dict:
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query"],
            "pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                     "exporters": ["jaeger_storage_exporter"]}},
            # No metrics server of its own (it would take port 8888 on every stack).
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            "jaeger_storage": {"backends": {"memory": {"memory": {"max_traces": MAX_TRACES}}}},
            "jaeger_query": {
                # Not its own traces: they would go to OTLP's default port, 4317, every few
                # seconds (a warning each time in jaeger.log, or spans in a stranger's).
                "enable_tracing": False,
                "storage": {"traces": "memory"},
                "http": {"endpoint": f"127.0.0.1:{cfg.jaeger_ui_port}"},
                "grpc": {"endpoint": f"127.0.0.1:{cfg.jaeger_ui_port - 1}"},
            },
        },
        "receivers": {"otlp": {"protocols": {
            "http": {"endpoint": f"127.0.0.1:{cfg.jaeger_otlp_port}"}}}},
        # Stored within a fraction of a second: a trace is in the UI as its run goes.
        "processors": {"batch": {"timeout": "200ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memory"}},
    }  # fmt: skip


def write_config(cfg: LocalConfig) -> Path:
    path = cfg.home / "jaeger.yml"
    path.write_text(yaml.safe_dump(config(cfg), sort_keys=False))
    return path


def ready(cfg: LocalConfig) -> bool:
    """Its query API answers (the receiver starts before it)."""
    try:
        return requests.get(f"{cfg.jaeger_url}/api/services", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start(cfg: LocalConfig, env: dict[str, str]) -> bool:
    """Start Jaeger unless it runs: True when started."""
    if processes.pid_of(cfg.run, "jaeger"):
        return False
    argv = [tool("jaeger"), f"--config={write_config(cfg)}"]
    processes.start(cfg.run, "jaeger", argv, cfg.logs / "jaeger.log", env)
    processes.wait_until(lambda: ready(cfg), 60, "Jaeger")
    return True


def trace_link(cfg: LocalConfig, trace_id: str) -> str:
    """The trace in Jaeger's UI."""
    return f"{cfg.jaeger_url}/trace/{trace_id}"


def trace(cfg: LocalConfig, trace_id: str) -> list[dict]:
    """GET /api/traces/<trace id>: the traces Jaeger holds under that id (its `data`; [] when
    it has none yet)."""
    r = requests.get(f"{cfg.jaeger_url}/api/traces/{trace_id}", timeout=10)
    if r.status_code == 404:
        return []
    r.raise_for_status()
    return r.json().get("data") or []
