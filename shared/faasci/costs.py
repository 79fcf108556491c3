"""What runs cost: each stage attempt's usage (faasci.usage, on runs.Attempt.usage) priced by
a rate card, reported by service, stage or environment, and per-service monthly budgets.

The rate card is the JSON of FAASCI_RATE_CARD, every field optional:

    {"currency": "USD", "cpu_second": 0.000024, "gib_second": 0.0000025, "wall_second": 0}

An attempt costs cpu_s * cpu_second + (peak GiB * wall_s) * gib_second + wall_s *
wall_second: CPU time, memory held for the time the commands ran (at its peak, as a
function's memory limit is billed), and plain wall time (0 by default). The defaults are
those above (about what serverless platforms charge per vCPU-second and GiB-second).

Budgets: `faasci.limits.for_service(service).monthly_budget` (in the rate card's currency).
After an attempt is recorded its cost is added to the service's month-to-date spend (a
counter in the NATS KV bucket faasci-spend, compare-and-set; the first attempt of a month
reckons it from the run store); at 80% and at 100% the notifier posts one Slack alert per
service, month and threshold (claimed in faasci-budget-alerts: faasci.once).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError
from .usage import Usage

log = logging.getLogger("faasci.costs")

GIB = 1024**3
BY = ("service", "stage", "environment")
By = Literal["service", "stage", "environment"]
NO_ENVIRONMENT = "none"  # a run whose ref promotes to no environment (or that has no promote)
THRESHOLDS = (0.8, 1.0)  # of the monthly budget: one alert each
SPEND_BUCKET = "faasci-spend"
ALERTS_BUCKET = "faasci-budget-alerts"
KEEP_S = 62 * 24 * 3600  # a month's counter and alert claims outlive the month


class RateCard(BaseModel):
    """Prices per unit, in `currency`."""

    model_config = ConfigDict(extra="forbid")

    currency: str = "USD"
    cpu_second: float = 0.000024  # per CPU second (user + system)
    gib_second: float = 0.0000025  # per GiB of peak memory held for a second of wall time
    wall_second: float = 0.0  # per second of wall time, whatever was used


class RateCardError(UserError):
    """FAASCI_RATE_CARD is not a rate card: the platform's configuration, not the request."""

    status = 500


def rate_card(env=os.environ) -> RateCard:
    raw = env.get("FAASCI_RATE_CARD", "").strip()
    if not raw:
        return RateCard()
    try:
        card = RateCard.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as e:
        raise RateCardError(f"FAASCI_RATE_CARD is not a rate card: {e}".splitlines()[0],
                            field="FAASCI_RATE_CARD") from None  # fmt: skip
    if min(card.cpu_second, card.gib_second, card.wall_second) < 0:
        raise RateCardError("FAASCI_RATE_CARD: prices cannot be negative", field="FAASCI_RATE_CARD")
    return card


def gib_seconds(usage: dict) -> float:
    return usage.get("peak_rss_bytes", 0) / GIB * usage.get("wall_s", 0.0)


def price(usage: dict, card: RateCard) -> float:
    """The cost of one attempt's usage (runs.Attempt.usage)."""
    return (usage.get("cpu_s", 0.0) * card.cpu_second + gib_seconds(usage) * card.gib_second
            + usage.get("wall_s", 0.0) * card.wall_second)  # fmt: skip


# Recording (faasci.stage): the attempt's usage and its tags.


def environment_of(run) -> str:
    """The environment a run is for: the one its promote stage's GitOps configuration picks
    for its ref, else NO_ENVIRONMENT."""
    from . import gitops

    for spec in run.pipeline.stages.values():
        if getattr(spec, "gitops", None):
            try:
                return gitops.select(spec.gitops, run.ref) or NO_ENVIRONMENT
            except Exception:  # a tag, never a reason to fail an attempt
                return NO_ENVIRONMENT
    return NO_ENVIRONMENT


def usage_record(run, used: Usage) -> dict:
    """What runs.Attempt.usage holds: the usage, and the environment tag (service and stage
    are the run's and the attempt's own)."""
    return {**used.rounded().model_dump(), "environment": environment_of(run)}


# Reporting.


class Line(BaseModel):
    key: str  # the service, stage or environment
    attempts: int = 0
    cpu_s: float = 0.0
    gib_s: float = 0.0  # peak GiB x wall seconds
    wall_s: float = 0.0
    peak_rss_bytes: int = 0
    cost: float = 0.0

    def add(self, usage: dict, card: RateCard) -> None:
        self.attempts += 1
        self.cpu_s += usage.get("cpu_s", 0.0)
        self.gib_s += gib_seconds(usage)
        self.wall_s += usage.get("wall_s", 0.0)
        self.peak_rss_bytes = max(self.peak_rss_bytes, usage.get("peak_rss_bytes", 0))
        self.cost += price(usage, card)

    def rounded(self) -> Line:
        return self.model_copy(update={"cpu_s": round(self.cpu_s, 3), "gib_s": round(self.gib_s, 6),
                                       "wall_s": round(self.wall_s, 3),
                                       "cost": round(self.cost, 6)})  # fmt: skip


class Report(BaseModel):
    by: By
    since: datetime
    rate_card: RateCard
    lines: list[Line]  # the costliest first
    total: Line


def usages(runs: Iterable, since: datetime, until: datetime | None = None) -> Iterator[tuple]:
    """(tags, usage) of every attempt that started in [since, until) and has a usage."""
    for run in runs:
        for stage in run.stages:
            for attempt in stage.attempts:
                if not attempt.usage or attempt.started_at < since:
                    continue
                if until is not None and attempt.started_at >= until:
                    continue
                tags = {
                    "service": run.service,
                    "stage": stage.name,
                    "environment": attempt.usage.get("environment") or NO_ENVIRONMENT,
                }
                yield tags, attempt.usage


def report(runs: Iterable, by: By, since: datetime, card: RateCard) -> Report:
    """Usage and cost of the attempts since `since`, grouped `by` a tag."""
    if by not in BY:
        raise UserError(f"by must be one of {', '.join(BY)}", field="by")
    lines: dict[str, Line] = {}
    total = Line(key="total")
    for tags, usage in usages(runs, since):
        lines.setdefault(tags[by], Line(key=tags[by])).add(usage, card)
        total.add(usage, card)
    ordered = sorted(lines.values(), key=lambda line: (-line.cost, line.key))
    return Report(by=by, since=since, rate_card=card, lines=[x.rounded() for x in ordered],
                  total=total.rounded())  # fmt: skip


def month_start(at: datetime | None = None) -> datetime:
    at = at or datetime.now(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def next_month(start: datetime) -> datetime:
    return (start + timedelta(days=32)).replace(day=1)


def parse_since(value: str | None, now: datetime | None = None) -> datetime:
    """A date (2026-11-01) or an ISO 8601 time; None or empty: the start of this month (UTC)."""
    if not value:
        return month_start(now)
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"since {value!r} is not a date (YYYY-MM-DD) or an ISO 8601 time",
                        field="since") from None  # fmt: skip
    return at if at.tzinfo else at.replace(tzinfo=UTC)


PAGE = 500


def stored_runs(since: datetime, service: str | None = None) -> Iterator:
    """The runs of the store (one service's) that may have attempts since `since`: created
    from a day before it (a run's attempts follow its creation; runs last under a day)."""
    from .services import run_store

    first = (since - timedelta(days=1)).strftime("%Y%m%d-")
    before = ""
    while True:
        page, after = run_store().page(PAGE, since=first, before=before, service=service)
        yield from page
        if after is None:
            return
        before = after


def costs(by: str, since: str | None) -> dict:
    """GET /costs of the runs function: the report as JSON."""
    if by not in BY:
        raise UserError(f"by must be one of {', '.join(BY)}", field="by")
    start = parse_since(since)
    return report(stored_runs(start), by, start, rate_card()).model_dump(mode="json")


# Budgets.


def month_key(at: datetime) -> str:
    return at.strftime("%Y-%m")


def reached(spent: float, budget: float) -> list[float]:
    """The thresholds (fractions of the budget) `spent` has reached."""
    if budget <= 0:
        return list(THRESHOLDS)
    return [t for t in THRESHOLDS if spent >= t * budget - 1e-12]


def alert_key(service: str, month: str, threshold: float) -> str:
    return f"{service}.{month}.{round(threshold * 100)}"


def month_spend(service: str, start: datetime, card: RateCard) -> float:
    """A service's spend in the month from `start`, reckoned from the run store."""
    end = next_month(start)
    return sum(price(usage, card) for tags, usage in usages(stored_runs(start, service), start, end)
               if tags["service"] == service)  # fmt: skip


def add_spend(service: str, month: str, cost: float, reckon) -> float:
    """Add `cost` to the service's spend counter of `month`, compare-and-set; a missing
    counter starts from `reckon()` (which counts this cost already). The new total."""
    from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

    from .services import bus

    key = f"{service}.{month}"

    async def read():
        kv = await bus().bucket(SPEND_BUCKET, ttl=KEEP_S)
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None, 0
        return json.loads(entry.value)["spent"], entry.revision

    async def write(value: float, revision: int) -> bool:
        kv = await bus().bucket(SPEND_BUCKET, ttl=KEEP_S)
        data = json.dumps({"spent": value}).encode()
        try:
            if revision:
                await kv.update(key, data, last=revision)
            else:
                await kv.create(key, data)
        except KeyWrongLastSequenceError:
            return False
        return True

    while True:
        spent, revision = bus().call(read)
        total = reckon() if spent is None else spent + cost
        if bus().call(write, total, revision):
            return total


def after_attempt(run, stage: str, number: int) -> None:
    """Once an attempt's usage is recorded: its service's month-to-date spend, the budget
    gauge, and the alerts the spend has reached. Never fails the stage: logged."""
    try:
        _after_attempt(run, stage, number)
    except Exception as e:
        log.warning("run %s: budget accounting of %s failed: %s", run.id, stage, e)


def _after_attempt(run, stage: str, number: int) -> None:
    from . import limits, metrics, once

    attempt = run.stage(stage).attempts[number - 1]
    budget = limits.for_service(run.service).monthly_budget
    if not attempt.usage or budget is None:
        return
    card = rate_card()
    start = month_start(attempt.started_at)
    month = month_key(start)
    spent = add_spend(run.service, month, price(attempt.usage, card),
                      lambda: month_spend(run.service, start, card))  # fmt: skip
    metrics.budget_used(run.service, spent / budget if budget else 1.0)
    for threshold in reached(spent, budget):
        key = alert_key(run.service, month, threshold)
        if not once.claim(ALERTS_BUCKET, key, KEEP_S):
            continue
        alert = BudgetAlert(service=run.service, month=month, threshold=threshold, spent=spent,
                            budget=budget, currency=card.currency, run_id=run.id)  # fmt: skip
        try:
            from .stage import invoke_with_retries

            invoke_with_retries("notifier", {"budget": alert.model_dump()}, f"budget.{key}")
        except Exception:
            once.release(ALERTS_BUCKET, key, KEEP_S)  # the next attempt claims it again
            raise
        log.info("%s: %.0f%% of its %s budget of %s %s used: the %d%% alert is raised",
                 run.service, spent / budget * 100, month, budget, card.currency,
                 round(threshold * 100))  # fmt: skip


class BudgetAlert(BaseModel):
    """What the notifier posts when a service's spend reaches a threshold of its budget."""

    service: str
    month: str  # YYYY-MM
    threshold: float  # 0.8 or 1.0
    spent: float
    budget: float
    currency: str = "USD"
    run_id: str | None = None  # the run whose attempt crossed it


def budget_message(alert: BudgetAlert) -> dict:
    """The Slack message (Block Kit, with a text fallback)."""
    pct = round(alert.threshold * 100)
    used = alert.spent / alert.budget * 100 if alert.budget else 100.0
    text = (
        f"faas-ci budget: {alert.service} has used {used:.0f}% of its {alert.month} budget "
        f"({alert.spent:.4f} of {alert.budget:.4f} {alert.currency}; alert at {pct}%)"
    )
    header = "Budget reached" if alert.threshold >= 1 else f"Budget at {pct}%"
    return {
        "text": text,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text",
                                        "text": f"{header}: {alert.service}"[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}},
        ],
    }  # fmt: skip


def deliver_budget_alert(body: dict) -> dict:
    """The notifier's side: post the alert to Slack. Not delivered (Slack away or refusing):
    its claim is given up, so the service's next attempt raises it again."""
    from . import metrics, once, slack
    from .settings import settings

    try:
        alert = BudgetAlert.model_validate(body)
    except ValidationError as e:
        raise UserError(f"budget: {e.errors()[0]['msg']}", field="budget") from None
    key = alert_key(alert.service, alert.month, alert.threshold)
    config = slack.SlackConfig.from_settings(settings())
    if not config.configured:
        log.warning("budget alert %s: no Slack configured", key)
        return {"budget": key, "alert": "unconfigured"}
    try:
        metrics.alert_delivery(slack.send, config, budget_message(alert))
    except slack.SlackError as e:
        log.error("budget alert %s not delivered: %s", key, e)
        once.release(ALERTS_BUCKET, key, KEEP_S)
        return {"budget": key, "alert": "pending", "error": str(e)}
    log.info("budget alert %s sent", key)
    return {"budget": key, "alert": "sent"}


def costs_table(found: dict):
    """The report (as JSON) as a rich table, for `faasci costs`."""
    from rich.table import Table

    currency = found["rate_card"]["currency"]
    table = Table(title=f"costs since {found['since'][:10]} by {found['by']}")
    table.add_column(found["by"], overflow="fold")
    for name in ("attempts", "CPU s", "GiB·s", "wall s", "peak MiB", f"cost {currency}"):
        table.add_column(name, justify="right", no_wrap=True)
    for line in [*found["lines"], found["total"]]:
        if line is found["total"]:
            table.add_section()
        table.add_row(line["key"], str(line["attempts"]), f"{line['cpu_s']:.3f}",
                      f"{line['gib_s']:.4f}", f"{line['wall_s']:.1f}",
                      f"{line['peak_rss_bytes'] / 2**20:.0f}", f"{line['cost']:.6f}")  # fmt: skip
    return table
