"""The concurrency caps as stack.yml carries them to a cluster: every function agrees on the
defaults faasci.limits has, and each stage function's OpenFaaS scaling labels and
of-watchdog's max_inflight admit what the caps let run and wait."""

import re
from pathlib import Path

import pytest

from faasci import STAGES, caps, limits, stack

STACK = Path(__file__).resolve().parents[2] / "stack.yml"


@pytest.fixture(scope="module")
def loaded():
    return stack.load(STACK, env={})


def test_every_function_has_the_limits_defaults_of_faasci_limits(loaded):
    """FAASCI_CONCURRENCY, FAASCI_BURST and FAASCI_BURST_WINDOW_S default, in every function,
    to the Limits model's own defaults; the scope is one faasci.caps knows."""
    model = limits.Limits()
    for name, fn in loaded.functions.items():
        env = fn.environment
        assert limits.defaults(env) == model, name
        assert env["FAASCI_CAP_SCOPE"] in caps.SCOPES, name
    raw = STACK.read_text()
    for variable, default in (("FAASCI_CONCURRENCY", model.concurrency),
                              ("FAASCI_BURST", model.burst),
                              ("FAASCI_BURST_WINDOW_S", model.burst_window_s)):  # fmt: skip
        (found,) = re.findall(rf"\${{{variable}:-([0-9.]+)}}", raw)
        assert float(found) == default, variable


def test_stage_functions_admit_a_whole_burst_and_scale_by_requests_in_flight(loaded):
    """A stage replica admits a burst's worth of requests (running or waiting for a slot),
    serves as many at once as it admits, and OpenFaaS adds replicas per cap's worth."""
    model = limits.Limits()
    for name in STAGES:
        fn = loaded.functions[name]
        env, labels = fn.environment, fn.labels
        inflight = int(env["max_inflight"])
        assert inflight >= model.burst, name
        assert int(env["THREADS"]) == inflight, name
        assert labels["com.openfaas.scale.type"] == "capacity", name
        assert model.concurrency <= int(labels["com.openfaas.scale.target"]) <= inflight, name
        assert int(labels["com.openfaas.scale.max"]) * inflight >= model.burst, name
        assert int(labels["com.openfaas.scale.min"]) >= 1, name


def test_the_ledger_leases_match_the_stage_heartbeat():
    """A slot's lease and its renewal follow the stage attempt's (faasci.stage)."""
    from faasci import stage

    assert caps.LEASE_S == stage.LEASE_S and caps.REFRESH_S == stage.HEARTBEAT_S
