"""`faasci up --observe`: the stack's traces in Jaeger (jaeger.py) and its metrics in
Prometheus (prometheus.py), started before the gateway so its functions export to them
from their first request."""

from __future__ import annotations

from . import jaeger
from .config import LocalConfig

PARTS = ("jaeger", "prometheus")  # what `faasci down` stops too


def start(cfg: LocalConfig, env: dict[str, str], say) -> None:
    """Start Jaeger and Prometheus unless they run (nothing when not observing)."""
    if not cfg.observe:
        return
    # Not fatal, as the container engine is not: the stack works without them.
    try:
        if jaeger.start(cfg, env):
            say(f"traces: Jaeger on {cfg.jaeger_url} (OTLP/HTTP on {cfg.otlp_endpoint})")
    except (SystemExit, TimeoutError) as e:  # not installed, or not answering
        say(f"traces: Jaeger did not start: {e}")
    from . import prometheus

    try:
        if prometheus.start(cfg, env):
            say(f"metrics: Prometheus on {prometheus.url(cfg)}")
    except (SystemExit, TimeoutError) as e:
        say(f"metrics: Prometheus did not start: {e}")


def trace_link(cfg: LocalConfig | None, trace_id: str) -> str | None:
    """The trace's page in the stack's Jaeger, when that stack observes and Jaeger runs."""
    from . import processes

    if cfg is None or not cfg.observe or not processes.pid_of(cfg.run, "jaeger"):
        return None
    return jaeger.trace_link(cfg, trace_id)


def parts(cfg: LocalConfig) -> dict[str, dict]:
    """`faasci status`'s entries for Jaeger and Prometheus (none when not observing)."""
    if not cfg.observe:
        return {}
    from . import processes, prometheus

    found = {}
    for name, ready in (("jaeger", jaeger.ready), ("prometheus", prometheus.ready)):
        pid = processes.pid_of(cfg.run, name)
        found[name] = {"pid": pid, "healthy": bool(pid) and ready(cfg)}
    return found
