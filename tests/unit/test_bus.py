"""Which NATS failures the bus waits out (a restart) and which it reports at once."""

import nats.errors
import nats.js.errors
import pytest

from faasci.bus import transient


@pytest.mark.parametrize("error", [
    TimeoutError(), nats.errors.TimeoutError(), nats.errors.NoRespondersError(),
    nats.errors.UnexpectedEOF(), nats.errors.ConnectionClosedError(), nats.errors.NoServersError(),
    ConnectionRefusedError(), nats.js.errors.ServiceUnavailableError(),
])  # fmt: skip
def test_restart_symptoms_are_transient(error):
    """What a restarting NATS server raises is worth another try."""
    assert transient(error)


@pytest.mark.parametrize("error", [
    nats.js.errors.KeyWrongLastSequenceError(), nats.js.errors.NotFoundError(),
    nats.js.errors.BadRequestError(), ValueError("bad"), KeyError("x"),
])  # fmt: skip
def test_answers_about_the_request_are_not(error):
    """JetStream's verdicts on the request, and programming errors, are reported at once."""
    assert not transient(error)
