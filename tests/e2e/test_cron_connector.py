"""The real cron-connector (OPENFAAS_BIN) schedules the local stack's functions: on a stack
of its own holding one function annotated with an every-minute schedule, it fires within
70 s and then exactly once a minute, in the form the connector sends.

About two minutes long: it waits for two minute boundaries."""

import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import FAASCI, ROOT, stack_ports, stopped

from faasci.local.config import openfaas_tool

TICK_STACK = """\
version: 1.0
provider: {name: openfaas, gateway: http://127.0.0.1:8080}
functions:
  tick:
    lang: python3-ci
    handler: ./tick
    image: localhost/tick:test
    environment:
      TICK_LOG: ${TICK_LOG}
    annotations:
      topic: cron-function
      schedule: "* * * * *"
"""

TICK_HANDLER = '''\
import json, os, time


def handle(event, context):
    """Record each invocation: when, and the headers the connector sent."""
    with open(os.environ["TICK_LOG"], "a") as log:
        line = {"at": time.time(), "connector": event.headers.get("X-Connector"),
                "topic": event.headers.get("X-Topic"), "method": event.method}
        log.write(json.dumps(line) + "\\n")
    return {"ticked": True}
'''


@pytest.fixture
def tick_stack(tmp_path):
    """A stack of one every-minute function, started with `faasci up`; its tick log."""
    project = tmp_path / "project"
    (project / "tick").mkdir(parents=True)
    (project / "template").symlink_to(ROOT / "template")
    (project / "stack.yml").write_text(TICK_STACK)
    (project / "tick" / "handler.py").write_text(TICK_HANDLER)
    ticks = tmp_path / "ticks.jsonl"
    env = {**os.environ, **stack_ports(30080, 26222, 30333), "FAASCI_HOME": str(tmp_path / "home"),
           "FAASCI_STACK": str(project / "stack.yml"), "TICK_LOG": str(ticks)}  # fmt: skip
    env.pop("FAASCI_SECRETS_DIR", None)
    up = subprocess.run([FAASCI, "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        yield up, ticks
    finally:
        stopped(env)


def read_ticks(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_real_cron_connector_fires_an_every_minute_function_once_a_minute(tick_stack):
    """Within 70 s of `up` the function is invoked with X-Connector: cron-connector, then once
    in each following minute, never twice in one."""
    assert openfaas_tool("cron-connector"), "cron-connector missing: set OPENFAAS_BIN"
    up, ticks = tick_stack
    assert "OpenFaaS cron-connector" in up.stderr, up.stderr
    started = time.time()
    while not read_ticks(ticks):
        assert time.time() - started < 70, "the connector did not fire within 70 s"
        time.sleep(0.5)
    first = read_ticks(ticks)[0]
    assert first["connector"] == "cron-connector" and first["topic"] == "cron-function"
    assert first["method"] == "POST"

    # Through the next minute boundary and a little more: exactly one more invocation.
    next_minute = (int(first["at"]) // 60 + 1) * 60
    time.sleep(max(0, next_minute + 15 - time.time()))
    fired = read_ticks(ticks)
    minutes = [datetime.fromtimestamp(t["at"], UTC).strftime("%H:%M") for t in fired]
    assert len(fired) == 2 and len(set(minutes)) == 2, minutes
    assert all(datetime.fromtimestamp(t["at"], UTC).second < 10 for t in fired), minutes
