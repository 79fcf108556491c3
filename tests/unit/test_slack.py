"""Slack alerts: the Block Kit message, and delivery through slack-sdk to a local fake Slack."""

from __future__ import annotations

import json
import logging
import time

import pytest
from slack_fake import Reply, SlackFake, block_kit_problems, unused_port

from faasci import pipeline, runs, slack
from faasci.settings import Settings
from faasci.slack import SlackConfig, SlackRejected, SlackUnavailable, alert_message, send

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "https://git.example.com/shop/inventory.git"
LOGS = "https://ci.example.com/function/pipeline-log"
PIPELINE = {
    "service": "inventory",
    "stages": {
        "lint": {"run": ["ruff check ."]},
        "unit": {"run": ["pytest"], "retries": 2, "retry_on": ["exit", "timeout", "infra"]},
    },
}
OUTCOMES = [("timeout", None, "stage timed out after 600 s"), ("infra", None, "worker lost"),
            ("exit", 1, "pytest failed: 3 tests failed")]  # fmt: skip


def failed_run(error: str | None = None) -> runs.Run:
    """A run whose lint passed and whose unit stage failed all three of its attempts."""
    run = runs.new_run(pipeline.validate(PIPELINE), repo=REPO, ref="main", commit=COMMIT,
                       source=REPO)  # fmt: skip
    runs.claim(run, "lint", 1, "worker-a")
    runs.finish(run, "lint", 1, status="passed", exit_code=0)
    for number, (reason, code, message) in enumerate(OUTCOMES, 1):
        runs.claim(run, "unit", number, "worker-a")
        runs.finish(run, "unit", number, status="failed", exit_code=code, reason=reason,
                    error=error if error and number == 3 else message,
                    log=f"{LOGS}/{run.id}/unit/{number}")  # fmt: skip
    assert run.status == "failed"
    return run


@pytest.fixture
def fake():
    with SlackFake() as server:
        yield server


@pytest.fixture
def webhook(fake) -> SlackConfig:
    return SlackConfig(webhook_url=fake.webhook_url)


@pytest.fixture
def bot(fake) -> SlackConfig:
    return SlackConfig(token=fake.token, channel="#ci-alerts", api_url=fake.api_url)


@pytest.fixture
def message() -> dict:
    return alert_message(failed_run(), "unit", log_tail="collected 12 items\nFAILED test_a")


def all_text(message: dict) -> str:
    return json.dumps(message, ensure_ascii=False)


def section_texts(message: dict) -> list[str]:
    return [b["text"]["text"] for b in message["blocks"] if b["type"] == "section" and "text" in b]


# The message.


def test_alert_names_the_run_stage_attempts_and_log(message):
    """The alert carries service, repo, ref, short commit, stage, each attempt and the log link."""
    text = all_text(message)
    for expected in ("inventory", REPO, "main", COMMIT[:12], "unit", "#1 failed · timeout",
                     "#2 failed · infra", "#3 failed · exit · exit 1", "3 tests failed",
                     "FAILED test_a"):  # fmt: skip
        assert expected in text, expected
    assert COMMIT not in text  # the short commit only
    (actions,) = [b for b in message["blocks"] if b["type"] == "actions"]
    assert actions["elements"][0]["url"].endswith("/unit/3")  # the last attempt's log
    assert message["blocks"][0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": ":x: inventory: unit failed", "emoji": True},
    }
    assert message["text"].startswith("inventory: stage unit failed on main at 0123456789ab")
    assert not block_kit_problems(message["blocks"])


def test_alert_stays_within_block_kit_limits_with_huge_error_and_log():
    """A 100 kB error and log tail are cut to their ends, within every Block Kit limit."""
    error = "E" * 100_000 + " the real cause"
    log = "\n".join(f"line {n} <&> " + "x" * 200 for n in range(500)) + "\nlast line"
    message = alert_message(failed_run(error=error), "unit", log_tail=log)
    assert not block_kit_problems(message["blocks"])
    assert len(all_text(message)) < 8000  # Slack also caps the blocks' total (~13k characters)
    sections = {text.split("\n", 1)[0]: text for text in section_texts(message)}
    assert sections["*Error*"].endswith("the real cause")
    tail = sections["*Log tail*"]
    assert tail.endswith("last line\n```") and "line 499 &lt;&amp;&gt;" in tail
    assert "line 480 " not in tail  # only the last 15 lines
    assert "<&>" not in tail  # escaped for mrkdwn


def test_alert_cuts_escaped_text_between_escapes():
    """Text that escapes to five times its length is cut between whole escapes, to the limit."""
    message = alert_message(failed_run(error="&" * 100_000), "unit")
    (error,) = [t for t in section_texts(message) if t.startswith("*Error*")]
    body = error.removeprefix("*Error*\n…")
    assert body == "&amp;" * (len(body) // 5) and len(body) > slack.ERROR_CHARS - 10


def test_alert_without_attempts_or_log():
    """A stage that failed before any attempt still makes a valid alert, without a button."""
    run = runs.new_run(pipeline.validate(PIPELINE), repo=REPO, ref="main", commit=COMMIT,
                       source=REPO)  # fmt: skip
    message = alert_message(run, "unit")
    assert not block_kit_problems(message["blocks"])
    assert not [b for b in message["blocks"] if b["type"] == "actions"]
    assert "after 0 attempts" in message["text"]


# Configuration.


def test_config_from_secrets_and_env(tmp_path):
    """The webhook and the token come from secret files, the channel and API URL from env."""
    settings = Settings(secrets_dir=tmp_path)
    assert not SlackConfig.from_settings(settings, env={}).configured
    (tmp_path / "slack-bot-token").write_text("xoxb-secret-token\n")
    assert not SlackConfig.from_settings(settings, env={}).configured  # no channel
    env = {"SLACK_CHANNEL": "#ci", "SLACK_API_URL": "http://127.0.0.1:9/api/"}
    config = SlackConfig.from_settings(settings, env=env)
    assert (config.via, config.token, config.channel) == ("api", "xoxb-secret-token", "#ci")
    assert config.api_url == "http://127.0.0.1:9/api/"
    (tmp_path / "slack-webhook-url").write_text("https://hooks.slack.com/services/T/B/sekrit\n")
    config = SlackConfig.from_settings(settings, env=env)
    assert config.via == "webhook" and config.webhook_url.endswith("/sekrit")
    assert SlackConfig.from_settings(Settings(secrets_dir=tmp_path), env={}).api_url == (
        "https://slack.com/api/"
    )


def test_repr_never_shows_the_secrets():
    """repr and str of a config name how it delivers, never the URL or the token."""
    for config in (
        SlackConfig(webhook_url="https://hooks.slack.com/services/T/B/sekrit"),
        SlackConfig(token="xoxb-sekrit", channel="#ci"),
    ):
        assert "sekrit" not in repr(config) and "sekrit" not in str(config)
    assert repr(SlackConfig(token="xoxb-sekrit", channel="#ci")).startswith("SlackConfig(via='api'")


def test_unconfigured_or_bad_url_is_rejected(fake):
    """Sending without credentials, or to a non-http URL, is refused without leaking it."""
    with pytest.raises(SlackRejected, match="not configured"):
        send(SlackConfig(), {"text": "x"})
    with pytest.raises(SlackRejected) as refused:
        send(SlackConfig(webhook_url="ftp://hooks.example/services/sekrit"), {"text": "x"})
    assert "sekrit" not in str(refused.value)
    assert fake.requests == []


# Delivery.


def test_webhook_delivers_the_message_as_json(fake, webhook, message):
    """A webhook send POSTs the message as JSON with text and blocks; Slack answers `ok`."""
    assert send(webhook, message) == "webhook"
    (request,) = fake.requests
    assert request.path == fake.webhook_path and request.status == 200
    assert request.headers["content-type"].startswith("application/json")
    assert json.loads(request.body) == {"text": message["text"], "blocks": message["blocks"]}
    assert fake.delivered == [{"text": message["text"], "blocks": message["blocks"]}]


def test_bot_token_posts_to_the_channel(fake, bot, message):
    """chat.postMessage gets the bearer token, the channel, text and blocks; returns the ts."""
    ts = send(bot, message)
    (request,) = fake.requests
    assert request.path == "/api/chat.postMessage"
    assert request.headers["authorization"] == f"Bearer {fake.token}"
    assert request.headers["content-type"].startswith("application/json")
    assert request.payload == {"channel": "#ci-alerts", **message}
    assert "token" not in request.payload  # in the header only
    assert fake.delivered == [{"channel": "#ci-alerts", **message, "ts": ts}]
    seconds, micros = ts.split(".")
    assert seconds.isdigit() and micros.isdigit()


@pytest.mark.parametrize("via", ["webhook", "bot"])
def test_rate_limit_then_server_error_then_success_delivers_once(fake, via, request, message):
    """429 (Retry-After honoured), then 500, then 200: one send, exactly one message."""
    config = request.getfixturevalue(via)
    fake.script(Reply(429, retry_after=1), Reply(500))
    started = time.monotonic()
    send(config, message)
    assert time.monotonic() - started < 10
    assert [r.status for r in fake.requests] == [429, 500, 200]
    assert fake.requests[1].at - fake.requests[0].at >= 1.0  # waited out Retry-After
    assert len(fake.delivered) == 1


def test_every_5xx_is_retried(fake, webhook, message):
    """502 and 504 are retried too, not only the 500 and 503 slack-sdk's handler knows."""
    fake.script(Reply(502), Reply(504))
    send(webhook, message)
    assert [r.status for r in fake.requests] == [502, 504, 200]
    assert len(fake.delivered) == 1


def test_slack_that_keeps_failing_is_unavailable(fake, bot, message):
    """Four 503s exhaust the retries: SlackUnavailable, nothing delivered, the next send works."""
    fake.script(*[Reply(503)] * 4)
    with pytest.raises(SlackUnavailable, match="503"):
        send(bot, message)
    assert len(fake.requests) == 1 + slack.RETRIES
    assert fake.delivered == []
    send(bot, message)
    assert len(fake.delivered) == 1


@pytest.mark.parametrize("via", ["webhook", "bot"])
def test_long_retry_after_is_left_to_the_caller(fake, via, request, message):
    """A Retry-After beyond the wait budget is not slept on: SlackUnavailable carries it."""
    config = request.getfixturevalue(via)
    fake.script(Reply(429, retry_after=120))
    started = time.monotonic()
    with pytest.raises(SlackUnavailable) as unavailable:
        send(config, message)
    assert time.monotonic() - started < 2
    assert unavailable.value.retry_after == 120
    assert len(fake.requests) == 1 and fake.delivered == []


@pytest.mark.parametrize("via", ["webhook", "bot"])
def test_slack_down_is_unavailable_quickly(via, message):
    """A closed port: SlackUnavailable within a few seconds, after bounded retries."""
    url = f"http://127.0.0.1:{unused_port()}"
    config = {
        "webhook": SlackConfig(webhook_url=f"{url}/services/T0/B0/sekrit"),
        "bot": SlackConfig(token="xoxb-sekrit", channel="#ci", api_url=f"{url}/api/"),
    }[via]
    started = time.monotonic()
    with pytest.raises(SlackUnavailable, match="could not be reached") as unavailable:
        send(config, message)
    assert time.monotonic() - started < 5
    assert unavailable.value.retry_after is None
    assert "sekrit" not in str(unavailable.value)


def test_invalid_auth_is_rejected(fake, message):
    """A token Slack does not know: {"ok": false, "error": "invalid_auth"} -> SlackRejected."""
    config = SlackConfig(token="xoxb-not-the-token", channel="#ci-alerts", api_url=fake.api_url)
    with pytest.raises(SlackRejected, match="invalid_auth") as refused:
        send(config, message)
    assert "xoxb-not-the-token" not in str(refused.value)
    assert len(fake.requests) == 1 and fake.delivered == []


def test_unknown_channel_is_rejected(fake, message):
    """A channel Slack does not know: channel_not_found -> SlackRejected, no retry."""
    config = SlackConfig(token=fake.token, channel="#nowhere", api_url=fake.api_url)
    with pytest.raises(SlackRejected, match="channel_not_found"):
        send(config, message)
    assert len(fake.requests) == 1 and fake.delivered == []


def test_webhook_refusals_are_rejected(fake, webhook, message):
    """Webhook 400 invalid_payload and 410 channel_is_archived -> SlackRejected, no retry."""
    fake.script(Reply(400, "invalid_payload"), Reply(410, "channel_is_archived"))
    with pytest.raises(SlackRejected, match="400 invalid_payload"):
        send(webhook, message)
    with pytest.raises(SlackRejected, match="410 channel_is_archived"):
        send(webhook, message)
    assert len(fake.requests) == 2 and fake.delivered == []


def test_unknown_webhook_is_rejected(fake, message):
    """A webhook URL Slack does not know: 404 no_service, without the URL in the error."""
    url = fake.url + "/services/T0FAKE000/B0FAKE000/revokedrevoked"
    with pytest.raises(SlackRejected, match="404 no_service") as refused:
        send(SlackConfig(webhook_url=url), message)
    assert "revokedrevoked" not in str(refused.value)


def test_invalid_blocks_are_rejected(fake, bot):
    """Blocks over Slack's limits are refused by Slack (invalid_blocks): SlackRejected."""
    header = {"type": "header", "text": {"type": "plain_text", "text": "x" * 151}}
    with pytest.raises(SlackRejected, match="invalid_blocks"):
        send(bot, {"text": "x", "blocks": [header]})


def test_secrets_never_reach_the_logs(fake, caplog, message):
    """At DEBUG, with retries and failures, neither the webhook URL nor the token is logged."""
    caplog.set_level(logging.DEBUG)
    webhook = SlackConfig(webhook_url=fake.webhook_url)
    bot = SlackConfig(token=fake.token, channel="#ci-alerts", api_url=fake.api_url)
    for config in (webhook, bot):
        fake.script(Reply(429, retry_after=0), Reply(500))
        send(config, message)
    with pytest.raises(SlackRejected):
        send(SlackConfig(webhook_url=fake.webhook_url + "x"), message)
    secret_path = "/services/T0/B0/sekritpath"
    down = SlackConfig(webhook_url=f"http://127.0.0.1:{unused_port()}{secret_path}")
    with pytest.raises(SlackUnavailable):
        send(down, message)
    assert caplog.records  # slack-sdk did log (its errors)
    for secret in (fake.webhook_path, fake.token, secret_path):
        assert secret not in caplog.text
