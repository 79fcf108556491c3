"""Prometheus metrics of faas-ci: what each function process did, for OpenFaaS's Prometheus.

Each function is one process (waitress serves it with threads), so one registry, the
default one, holds everything; the template server answers `/_/metrics` from it, and
stack.yml's `prometheus.io.*` annotations point OpenFaaS's Prometheus there (its
`kubernetes-pods` job). Counters and histograms are per process: queries sum over them.

Labels are bounded: `service` takes the first FAASCI_METRICS_MAX_SERVICES (50) names a
process sees and `other` for the rest, `stage` and `environment` likewise, and failure
reasons come from a fixed set, so a flood of new repositories cannot flood Prometheus.

The names the alert rules use (shared/observability/alert-rules.yml):
  faasci_stage_attempts_total{service,stage,environment,status,reason}
  faasci_stage_duration_seconds (histogram), faasci_stage_queue_wait_seconds,
  faasci_stage_handoff_seconds, faasci_stage_retries_total, faasci_stage_attempts_in_flight,
  faasci_runs_finished_total{service,status}, faasci_runs_stuck_total{service,stage,kind},
  faasci_cache_lookups_total{service,stage,result}, faasci_cache_restore_seconds,
  faasci_alert_deliveries_total{outcome}, faasci_budget_used_ratio{service},
  faasci_queue_pending_messages (the local gateway's, faasci.local.gateway).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

T = TypeVar("T")
log = logging.getLogger("faasci.metrics")

OTHER = "other"
# Failure reasons the stage records (faasci.stage, faasci.scan, faasci.gitops, rollout);
# anything else is counted as `other`.
REASONS = frozenset({"exit", "timeout", "infra", "cancelled", "blocked", "promotion",
                     "rollout", "secrets"})  # fmt: skip


class Bounded:
    """At most `limit` distinct values of one label: the first ones seen keep their name
    (a series, once made, never changes its labels), every later one is `other`. Empty
    values stay empty (no environment), and do not count."""

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = value or ""
        if not value or value in self._seen:
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(value)
            return value


def _limit(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


service_label = Bounded(_limit("FAASCI_METRICS_MAX_SERVICES", 50))
stage_label = Bounded(_limit("FAASCI_METRICS_MAX_STAGES", 20))
environment_label = Bounded(_limit("FAASCI_METRICS_MAX_ENVIRONMENTS", 10))


def reason_label(reason: str | None) -> str:
    if reason is None:
        return ""
    return reason if reason in REASONS else OTHER


# Seconds: from sub-second lint stages to the 6 h a stage may run.
DURATION_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600,
                    7200, 14400, 21600)  # fmt: skip
# The wait for a stage to start: a hop is milliseconds (target p50 5 ms, p99 50 ms), a
# queue behind a concurrency cap minutes.
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                60, 300, 900, 3600)  # fmt: skip
RESTORE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

STAGE = ("service", "stage", "environment")


def _metrics(registry: CollectorRegistry) -> dict[str, Any]:
    return {
        "duration": Histogram("faasci_stage_duration_seconds",
                              "Wall time of finished stage attempts", STAGE,
                              buckets=DURATION_BUCKETS, registry=registry),
        "attempts": Counter("faasci_stage_attempts",
                            "Finished stage attempts by status and failure reason",
                            (*STAGE, "status", "reason"), registry=registry),
        "retries": Counter("faasci_stage_retries",
                           "Failed stage attempts that were scheduled to run again", STAGE,
                           registry=registry),
        "queue_wait": Histogram("faasci_stage_queue_wait_seconds",
                                "From an attempt being owed (queued) to its start", STAGE,
                                buckets=WAIT_BUCKETS, registry=registry),
        "handoff": Histogram("faasci_stage_handoff_seconds",
                             "From one stage's end to the next stage's start (the hop)",
                             STAGE, buckets=WAIT_BUCKETS, registry=registry),
        "in_flight": Gauge("faasci_stage_attempts_in_flight",
                           "Stage attempts running in this process (a run runs one stage "
                           "at a time: summed, the runs in flight)", ("service", "stage"),
                           registry=registry),
        "runs_finished": Counter("faasci_runs_finished", "Runs finished, by status",
                                 ("service", "status"), registry=registry),
        "stuck": Counter("faasci_runs_stuck",
                         "Runs found stuck and recovered: an attempt whose worker went "
                         "silent (lost), or a hand-off nobody claimed in time",
                         ("service", "stage", "kind"), registry=registry),
        "cache": Counter("faasci_cache_lookups", "Dependency cache lookups by result",
                         ("service", "stage", "result"), registry=registry),
        "restore": Histogram("faasci_cache_restore_seconds",
                             "Time to put a cached dependency layer in place (hits)",
                             ("service", "stage"), buckets=RESTORE_BUCKETS,
                             registry=registry),
        "alerts": Counter("faasci_alert_deliveries", "Slack alert deliveries by outcome",
                          ("outcome",), registry=registry),
        "budget": Gauge("faasci_budget_used_ratio",
                        "Share of the service's monthly budget used (1 = all of it)",
                        ("service",), registry=registry),
    }  # fmt: skip


_m = _metrics(REGISTRY)


def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """This process's metrics in Prometheus's text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def environment_of(run) -> str:
    """The environment the run is for: the one its promote stage promoted to, else the one
    its ref would promote to (faasci.costs tags usage alike); empty when none."""
    for stage in getattr(run, "stages", ()):
        for attempt in reversed(stage.attempts):
            if (attempt.promotion or {}).get("environment"):
                return attempt.promotion["environment"]
    from . import costs  # not at the top: costs reports budgets through this module

    named = costs.environment_of(run)
    return "" if named == costs.NO_ENVIRONMENT else named


def _labels(run, stage: str) -> tuple[str, str, str]:
    return service_label(run.service), stage_label(stage), environment_label(environment_of(run))


def _seconds(later, earlier) -> float | None:
    if later is None or earlier is None:
        return None
    return max(0.0, (later - earlier).total_seconds())


def enabled(env=os.environ) -> bool:
    """FAASCI_METRICS unset or anything but off/0/false/no (the benchmark measures the
    overhead with it off)."""
    return env.get("FAASCI_METRICS", "on").strip().lower() not in ("off", "0", "false", "no")


ENABLED = enabled()


def _quiet(fn: Callable[..., None]) -> Callable[..., None]:
    """A hook that never fails the stage it measures (a metric is worth less than a run),
    and does nothing with metrics off."""

    @functools.wraps(fn)
    def hook(*args, **kwargs) -> None:
        if not ENABLED:
            return
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("metrics: %s failed", fn.__name__)

    return hook


@_quiet
def stage_started(run, stage: str, attempt) -> None:
    """An attempt was claimed: its wait in the queue (and, for the first attempt of a stage
    after the first, the hop from the previous stage's end); one more in flight."""
    labels = _labels(run, stage)
    waited = _seconds(attempt.started_at, attempt.queued_at)
    if waited is not None:
        _m["queue_wait"].labels(*labels).observe(waited)
        names = [s.name for s in run.stages]
        if attempt.number == 1 and names.index(stage) > 0:
            _m["handoff"].labels(*labels).observe(waited)
    _m["in_flight"].labels(labels[0], labels[1]).inc()


@_quiet
def stage_finished(run, stage: str, attempt, cache_report: dict | None = None) -> None:
    """An attempt's end was recorded (`run` as recorded, `attempt` its record): its
    duration and outcome, a retry when one is scheduled, the cache lookup, the run's end."""
    labels = _labels(run, stage)
    service = labels[0]
    if attempt.duration_s is not None:
        _m["duration"].labels(*labels).observe(attempt.duration_s)
    status = attempt.status if attempt.status != "running" else "failed"
    reason = "" if status == "passed" else reason_label(attempt.reason or status)
    _m["attempts"].labels(*labels, status, reason).inc()
    if status == "failed" and run.stage(stage).status == "queued":
        _m["retries"].labels(*labels).inc()
    if cache_report:
        cache(run, stage, bool(cache_report.get("hit")), cache_report.get("restore_s"))
    if run.finished:
        _m["runs_finished"].labels(service, run.status).inc()


@_quiet
def stage_left(run, stage: str) -> None:
    """An attempt's commands and record are done (or failed on the way): one less in flight."""
    _m["in_flight"].labels(service_label(run.service), stage_label(stage)).dec()


def cache(run, stage: str, hit: bool, restore_s: float | None = None) -> None:
    """A dependency cache lookup: hit (with the time its restore took) or miss."""
    service, stage = service_label(run.service), stage_label(stage)
    _m["cache"].labels(service, stage, "hit" if hit else "miss").inc()
    if hit and restore_s is not None:
        _m["restore"].labels(service, stage).observe(restore_s)


@_quiet
def stuck(run, stage: str | None, kind: str) -> None:
    """A run found stuck: `lost` (its attempt's worker went silent) or `handoff` (what
    follows an attempt was not claimed in time and is invoked again)."""
    _m["stuck"].labels(service_label(run.service), stage_label(stage or "start"), kind).inc()


@_quiet
def budget_used(service: str, ratio: float) -> None:
    """The share of `service`'s monthly budget spent so far (faasci.costs sets it)."""
    _m["budget"].labels(service_label(service)).set(ratio)


def alert_delivery(send: Callable[..., T], *args, **kwargs) -> T:
    """Call `send` (slack.send) and count its outcome: sent, unavailable (queued to try
    again), rejected, or error (anything else, raised on)."""
    if not ENABLED:
        return send(*args, **kwargs)
    try:
        result = send(*args, **kwargs)
    except Exception as e:
        name = type(e).__name__
        outcome = {"SlackUnavailable": "unavailable", "SlackRejected": "rejected"}.get(name)
        _m["alerts"].labels(outcome or "error").inc()
        raise
    _m["alerts"].labels("sent").inc()
    return result


class QueueBacklog(Collector):
    """The gateway's queue of asynchronous invocations as JetStream counts it, read when
    Prometheus scrapes: `read()` returns (waiting, in progress). While NATS does not
    answer, only faasci_queue_up 0 is reported."""

    def __init__(self, read: Callable[[], tuple[int, int]]):
        self.read = read

    def collect(self):
        up = GaugeMetricFamily("faasci_queue_up", "Whether the queue (NATS) answered")
        try:
            waiting, in_progress = self.read()
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("faasci_queue_pending_messages",
                                "Invocations queued and not yet taken by the queue worker",
                                value=waiting)  # fmt: skip
        yield GaugeMetricFamily("faasci_queue_in_progress_messages",
                                "Invocations taken and not yet done (acknowledged)",
                                value=in_progress)  # fmt: skip


def watch_queue(read: Callable[[], tuple[int, int]]) -> None:
    """Report the queue's backlog from this process (the gateway's)."""
    REGISTRY.register(QueueBacklog(read))
