"""One trace per run on the real stack (started with --observe): the run's trace id in the
JSON log lines of every stage function that ran it, and one trace in Jaeger with a span
per stage attempt, retries included."""

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import FAASCI, ROOT, wait_for_run

from faasci import tracing
from faasci.local import control, jaeger

ATTEMPTS = {("lint", 1), ("unit", 1), ("unit", 2), ("integration", 1)}
PIPELINE = """\
service: traced
stages:
  lint: {run: ["echo lint"]}
  unit:
    run: ['echo "unit attempt $FAASCI_ATTEMPT"', 'test "$FAASCI_ATTEMPT" -ge 2']
    retries: 1
    retry_on: [exit]
    backoff: {initial_s: 0.2}
  integration: {run: ["echo integration"]}
"""


def json_lines(path: Path) -> list[dict]:
    """The JSON objects of a function's log (every line the function's logging wrote)."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def trace_when_complete(stack, trace_id: str, timeout: float = 60) -> list[dict]:
    """Jaeger's traces under `trace_id` once every attempt's span and the runs function's
    GET are in (spans arrive in batches, a second or so after they end)."""
    deadline = time.monotonic() + timeout
    while True:
        traces = jaeger.trace(stack, trace_id)
        named = {s["operationName"] for t in traces for s in t["spans"]}
        if {f"{stage} attempt {n}" for stage, n in ATTEMPTS} | {"GET runs"} <= named:
            return traces
        assert time.monotonic() < deadline, f"spans of {trace_id} in Jaeger: {sorted(named)}"
        time.sleep(0.5)


def tags(span: dict) -> dict:
    return {t["key"]: t["value"] for t in span["tags"]}


def test_a_run_is_one_trace_in_the_logs_and_in_jaeger(stack, gateway, make_repo):
    """Every stage function's JSON log lines of the run carry its trace id; Jaeger holds one
    trace: the run's root span, a child span per stage attempt (the retry too), their
    commands, and the hand-offs that travelled through the gateway's queue and NATS."""
    repo = make_repo({".faasci.yml": PIPELINE})
    started = gateway.call("runs", {"repo": str(repo)})
    assert started.status_code == 201, started.text
    run = wait_for_run(gateway, started.json()["id"])
    assert run["status"] == "passed", run
    assert [len(s["attempts"]) for s in run["stages"]] == [1, 2, 1]

    env = {**os.environ, **stack.env()}
    shown = subprocess.run([FAASCI, "show", run["id"], "--json"], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=60, check=True)  # fmt: skip
    trace_id = tracing.trace_id_of(json.loads(shown.stdout)["traceparent"])
    assert trace_id and trace_id == tracing.trace_id_of(run["traceparent"])
    printed = subprocess.run([FAASCI, "show", run["id"]], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=60, check=True).stdout  # fmt: skip
    assert f"trace: {trace_id}\n  {stack.jaeger_url}/trace/{trace_id}\n" in printed

    # A synchronous call carrying the run's traceparent joins its trace too.
    got = gateway.call("runs", method="GET", path=run["id"],
                       headers={"traceparent": run["traceparent"]})  # fmt: skip
    assert got.status_code == 200

    for stage in ("lint", "unit", "integration"):
        lines = [x for x in json_lines(stack.logs / f"{stage}.log") if x.get("run_id") == run["id"]]
        assert lines, f"no JSON log line of run {run['id']} in {stage}.log"
        assert {x["trace_id"] for x in lines} == {trace_id}, lines
        assert all(x["function"] == stage and x["stage"] == stage for x in lines), lines
        assert all(x["service"] == "traced" and x["span_id"] for x in lines), lines
        assert {x["attempt"] for x in lines} == {n for s, n in ATTEMPTS if s == stage}
        assert {"time", "level", "logger", "message"} <= set(lines[0])
        assert any(x["message"].endswith(f"{stage} attempt 1 started") for x in lines), lines

    assert control.status(stack)["parts"]["jaeger"]["healthy"]  # `faasci status` shows it
    # Jaeger keeps its own spans to itself (none sent to OTLP's default port, 4317)
    assert ":4317" not in (stack.logs / "jaeger.log").read_text()
    traces = trace_when_complete(stack, trace_id)
    assert len(traces) == 1
    (trace,) = traces
    spans = {s["spanID"]: s for s in trace["spans"]}
    (root,) = [s for s in spans.values() if s["operationName"] == "run traced"]
    assert not [r for r in root["references"] if r["refType"] == "CHILD_OF"]  # a new trace
    assert tags(root)["faasci.run_id"] == run["id"]
    attempts = {s["operationName"]: s for s in spans.values() if " attempt " in s["operationName"]}
    assert set(attempts) == {f"{stage} attempt {n}" for stage, n in ATTEMPTS}
    for name, span in attempts.items():
        stage, _, number = name.partition(" attempt ")
        assert tags(span)["faasci.stage"] == stage and tags(span)["faasci.attempt"] == int(number)
        assert tags(span)["faasci.run_id"] == run["id"]
        assert tags(span)["faasci.status"] == ("failed" if name == "unit attempt 1" else "passed")
        assert span["references"][0]["spanID"] == root["spanID"]  # read from the record
        assert trace["processes"][span["processID"]]["serviceName"] == stage
        commands = [s for s in spans.values() if s["operationName"] == "command"
                    and s["references"][0]["spanID"] == span["spanID"]]  # fmt: skip
        assert len(commands) == (2 if stage == "unit" else 1)  # unit: echo, then test

    def served(function: str, method: str = "POST") -> list[dict]:
        return [s for s in spans.values() if s["operationName"] == f"{method} {function}"]

    # The hand-off from lint to unit went through the queue (NATS) with lint's traceparent.
    lint = attempts["lint attempt 1"]["spanID"]
    assert [s["references"][0]["spanID"] for s in served("unit")].count(lint) == 1
    assert [s["references"][0]["spanID"] for s in served("runs", "GET")] == [root["spanID"]]
