"""faasci.costs without a stack: the rate card, pricing, grouping, `since`, the budget's
thresholds and its Slack message."""

from datetime import UTC, datetime, timedelta

import pytest

from faasci import costs, pipeline, runs
from faasci.errors import UserError
from faasci.usage import Usage

PIPELINE = """\
service: {service}
stages:
  lint: {{run: [ruff check .]}}
  unit: {{run: [pytest]}}
  promote:
    gitops:
      repository: git://127.0.0.1:9418/envs.git
      environments:
        staging: {{refs: [main], file: staging/values.yaml}}
        production: {{refs: ["v*"], file: production/kustomization.yaml}}
"""
CARD = costs.RateCard(currency="EUR", cpu_second=0.01, gib_second=0.001, wall_second=0.0001)
T0 = datetime(2026, 11, 10, 12, tzinfo=UTC)


def make_run(service: str, ref: str = "main", **used: dict) -> runs.Run:
    """A run of `service` whose stages each have one attempt with the given usage."""
    p = pipeline.parse(PIPELINE.format(service=service), "svc")
    run = runs.new_run(p, repo="/r", ref=ref, commit="c" * 40, source="/r")
    for stage in run.stages:
        if stage.name in used:
            attempt = runs.Attempt(number=1, started_at=T0, status="passed")
            attempt.usage = costs.usage_record(run, Usage(**used[stage.name]))
            stage.attempts.append(attempt)
    return run


def test_an_attempt_is_priced_by_cpu_memory_time_and_wall_time():
    """cpu_s x cpu_second + peak GiB x wall_s x gib_second + wall_s x wall_second."""
    usage = {"cpu_s": 2.0, "peak_rss_bytes": 512 * 2**20, "wall_s": 10.0}
    assert costs.price(usage, CARD) == pytest.approx(2 * 0.01 + 0.5 * 10 * 0.001 + 10 * 0.0001)
    assert costs.price({}, CARD) == 0


def test_the_rate_card_comes_from_the_environment_with_documented_defaults():
    """FAASCI_RATE_CARD: partial JSON keeps the defaults; none at all is the default card."""
    assert costs.rate_card({}) == costs.RateCard()
    assert costs.RateCard().cpu_second == 0.000024 and costs.RateCard().currency == "USD"
    card = costs.rate_card({"FAASCI_RATE_CARD": '{"currency": "EUR", "cpu_second": 0.5}'})
    assert card.currency == "EUR" and card.cpu_second == 0.5
    assert card.gib_second == costs.RateCard().gib_second


@pytest.mark.parametrize("raw", ["not json", '{"cpu_secnd": 1}', '{"cpu_second": -1}',
                                 '{"cpu_second": "a lot"}'])  # fmt: skip
def test_a_bad_rate_card_is_an_error_naming_the_variable(raw):
    """A rate card that is not one is refused, naming FAASCI_RATE_CARD (never priced at 0)."""
    with pytest.raises(costs.RateCardError) as e:
        costs.rate_card({"FAASCI_RATE_CARD": raw})
    assert e.value.field == "FAASCI_RATE_CARD" and e.value.status == 500


def test_an_attempt_is_tagged_with_the_environment_its_ref_promotes_to():
    """The environment tag is the one the run's GitOps configuration picks for its ref."""
    assert costs.environment_of(make_run("a", ref="main")) == "staging"
    assert costs.environment_of(make_run("a", ref="v1.2.0")) == "production"
    assert costs.environment_of(make_run("a", ref="feature/x")) == costs.NO_ENVIRONMENT
    p = pipeline.parse("service: b\nstages:\n  unit: {run: [pytest]}\n", "svc")
    plain = runs.new_run(p, repo="/r", ref="main", commit="c" * 40, source="/r")
    assert costs.environment_of(plain) == costs.NO_ENVIRONMENT


def test_usage_is_grouped_by_service_stage_or_environment_costliest_first():
    """One report per grouping; each line sums its attempts, the total sums them all."""
    big = {"cpu_s": 4.0, "peak_rss_bytes": 2**30, "wall_s": 5.0}
    small = {"cpu_s": 1.0, "peak_rss_bytes": 2**29, "wall_s": 2.0}
    stored = [make_run("api", lint=small, unit=big), make_run("web", ref="v2", unit=small)]
    by_service = costs.report(stored, "service", T0 - timedelta(days=1), CARD)
    assert [line.key for line in by_service.lines] == ["api", "web"]
    api, web = by_service.lines
    assert api.attempts == 2 and api.cpu_s == 5.0 and api.wall_s == 7.0
    assert api.peak_rss_bytes == 2**30
    assert api.gib_s == pytest.approx(1 * 5 + 0.5 * 2)
    assert api.cost == pytest.approx(costs.price(big, CARD) + costs.price(small, CARD))
    assert by_service.total.cost == pytest.approx(api.cost + web.cost)
    assert by_service.total.attempts == 3
    by_stage = costs.report(stored, "stage", T0 - timedelta(days=1), CARD)
    assert {line.key: line.attempts for line in by_stage.lines} == {"unit": 2, "lint": 1}
    by_env = costs.report(stored, "environment", T0 - timedelta(days=1), CARD)
    assert {line.key: line.attempts for line in by_env.lines} == {"staging": 2, "production": 1}


def test_attempts_before_since_and_without_usage_are_left_out():
    """Only attempts started at or after `since` that recorded a usage count."""
    stored = [make_run("api", lint={"cpu_s": 1.0, "wall_s": 1.0})]
    stored[0].stages[1].attempts.append(runs.Attempt(number=1, started_at=T0))  # no usage
    assert costs.report(stored, "service", T0, CARD).total.attempts == 1
    assert costs.report(stored, "service", T0 + timedelta(seconds=1), CARD).lines == []


def test_a_bad_grouping_is_a_user_error_naming_by():
    """`by` must be service, stage or environment."""
    with pytest.raises(UserError) as e:
        costs.report([], "repo", T0, CARD)
    assert e.value.field == "by"


def test_since_is_a_date_an_iso_time_or_by_default_this_month():
    """`since`: YYYY-MM-DD, ISO 8601 (naive is UTC), or the start of the current month."""
    assert costs.parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert costs.parse_since("2026-11-05T10:30:00Z") == datetime(2026, 11, 5, 10, 30, tzinfo=UTC)
    assert costs.parse_since(None, now=T0) == datetime(2026, 11, 1, tzinfo=UTC)
    for bad in ("yesterday", "2026-13-01", "11/01/2026"):
        with pytest.raises(UserError) as e:
            costs.parse_since(bad)
        assert e.value.field == "since"


def test_months_run_to_the_next_months_start():
    """A month is [its first day, the next month's first day), across a year's end too."""
    assert costs.next_month(datetime(2026, 12, 1, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert costs.month_key(datetime(2026, 11, 30, tzinfo=UTC)) == "2026-11"


def test_thresholds_reached_at_80_and_100_percent():
    """79% reaches none; 80% the first; 100% and over both; a budget of 0 is spent at once."""
    assert costs.reached(7.9, 10) == []
    assert costs.reached(8.0, 10) == [0.8]
    assert costs.reached(9.99, 10) == [0.8]
    assert costs.reached(10.0, 10) == [0.8, 1.0]
    assert costs.reached(50, 10) == [0.8, 1.0]
    assert costs.reached(0, 0) == [0.8, 1.0]
    assert costs.alert_key("api", "2026-11", 0.8) == "api.2026-11.80"


def test_the_budget_message_says_who_how_much_and_which_threshold():
    """The Slack message names the service, the share used, the amounts and the threshold."""
    alert = costs.BudgetAlert(service="api", month="2026-11", threshold=0.8, spent=0.85,
                              budget=1.0, currency="EUR")  # fmt: skip
    message = costs.budget_message(alert)
    assert "api" in message["text"] and "85%" in message["text"] and "EUR" in message["text"]
    assert message["blocks"][0]["text"]["text"] == "Budget at 80%: api"
    reached = costs.budget_message(alert.model_copy(update={"threshold": 1.0, "spent": 1.2}))
    assert reached["blocks"][0]["text"]["text"] == "Budget reached: api"


def test_the_costs_table_shows_every_line_and_the_total():
    """`faasci costs`'s table: one row a key, then the total, with the currency."""
    import io

    from rich.console import Console

    stored = [make_run("api", lint={"cpu_s": 1.5, "wall_s": 2.0}), make_run("web", unit={})]
    found = costs.report(stored, "service", T0, CARD).model_dump(mode="json")
    console = Console(file=io.StringIO(), width=120)
    console.print(costs.costs_table(found))
    shown = console.file.getvalue()
    assert "api" in shown and "web" in shown and "total" in shown
    assert "1.500" in shown and "cost EUR" in shown
