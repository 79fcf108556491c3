"""Functions' own logs as JSON lines (faasci.jsonlog): fields, bounds, masking."""

import io
import json
import logging

import pytest

from faasci import jsonlog, masking, tracing
from faasci.masking import Masker

SECRET = "jsonlog-secret-value-0123456789"


@pytest.fixture
def json_lines(monkeypatch):
    """jsonlog.configure on the root logger, writing to a buffer; the root's handlers and
    level restored after. Returns a function giving the lines written so far, parsed."""
    monkeypatch.setenv("FAASCI_FUNCTION", "unit")
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    stream = io.StringIO()
    jsonlog.configure(level="INFO", stream=stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_a_line_carries_the_runs_fields_and_the_current_span(json_lines):
    """Inside a bound attempt and a span: run_id, stage, attempt, service, trace and span ids."""
    log = logging.getLogger("faasci.stage")
    bound = jsonlog.bind(run_id="20261127-101010-abcdef", stage="unit", attempt=2, service="web")
    with bound, tracing.span("unit attempt 2") as span:
        log.info("run %s: %s started", "20261127-101010-abcdef", "unit")
    log.warning("outside")
    inside, outside = json_lines()
    found = span.get_span_context()
    assert inside == {
        "time": inside["time"],
        "level": "INFO",
        "logger": "faasci.stage",
        "message": "run 20261127-101010-abcdef: unit started",
        "function": "unit",
        "run_id": "20261127-101010-abcdef",
        "stage": "unit",
        "attempt": 2,
        "service": "web",
        "trace_id": format(found.trace_id, "032x"),
        "span_id": format(found.span_id, "016x"),
    }
    assert inside["time"].endswith("Z") and inside["time"][10] == "T"
    # Outside a run and a span: only what every line has.
    assert set(outside) == {"time", "level", "logger", "message", "function"}
    assert outside["level"] == "WARNING" and outside["message"] == "outside"


def test_a_line_is_bounded_and_stays_one_line(json_lines):
    """A huge message and a huge traceback are each cut with a marker; newlines stay escaped."""
    log = logging.getLogger("faasci.test")
    log.error("first\nsecond %s", "x" * 10_000)
    try:
        raise ValueError("y" * 10_000)
    except ValueError:
        log.exception("failed")
    cut, failed = json_lines()
    assert cut["message"].startswith("first\nsecond xxx")
    extra = len("first\nsecond ") + 10_000 - jsonlog.MAX_CHARS
    assert cut["message"].endswith(f"…[faas-ci: {extra} more characters cut]")
    assert len(cut["message"]) < jsonlog.MAX_CHARS + 60
    assert failed["message"] == "failed" and failed["exc"].startswith("Traceback")
    assert "more characters cut]" in failed["exc"] and len(failed["exc"]) < jsonlog.MAX_CHARS + 60


def test_secrets_are_masked_in_json_lines(json_lines):
    """configure keeps the masking filter: a running stage's secret never reaches a line."""
    log = logging.getLogger("faasci.test")
    handle = masking.register(Masker([SECRET]))
    try:
        log.warning("stage said %s", SECRET)
        try:
            raise RuntimeError(f"boom {SECRET}")
        except RuntimeError:
            log.exception("failed with %s", SECRET)
    finally:
        masking.unregister(handle)
    said, failed = json_lines()
    assert said["message"] == "stage said ***"
    assert failed["message"] == "failed with ***" and "boom ***" in failed["exc"]
    assert SECRET not in json.dumps([said, failed])


def test_bind_nests_and_is_undone():
    """An inner bind adds to the outer one; leaving a block restores what was bound."""
    with jsonlog.bind(run_id="r", stage="lint", attempt=1):
        with jsonlog.bind(stage="unit", attempt=None):
            assert jsonlog.bound() == {"run_id": "r", "stage": "unit", "attempt": 1}
        assert jsonlog.bound() == {"run_id": "r", "stage": "lint", "attempt": 1}
    assert jsonlog.bound() == {}
    with pytest.raises(TypeError, match="secret"), jsonlog.bind(secret="x"):
        pass
