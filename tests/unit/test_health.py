"""NATS away: the bus waits out a restart, fails fast once NATS is gone for longer, logs
each change once; and what /_/ready reports (faasci.health). A real nats-server of the
test's own (the venv's binary) is stopped and started again on the same port."""

import contextlib
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faasci import bus as bus_module
from faasci import health, services, settings
from faasci.bus import Bus, NatsUnreachable

NATS_SERVER = Path(sys.executable).parent / "nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(self, data: Path):
        self.port, self.data, self.proc = free_port(), data, None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen([*argv, "-sd", str(self.data)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", self.port)) != 0:
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


@pytest.fixture
def bus_to():
    """Make Buses; closed after the test."""
    made = []

    def make(url: str) -> Bus:
        made.append(Bus(url))
        return made[-1]

    yield make
    for bus in made:
        bus.close()


async def _put(bus: Bus, value: bytes) -> int:
    kv = await bus.bucket("health-test")
    return await kv.put("key", value)


def test_a_short_nats_restart_is_waited_out(nats_server, bus_to, caplog):
    """Killed and back within 2 s: a store write issued meanwhile succeeds, nothing fails."""
    bus = bus_to(nats_server.url)
    bus.call(_put, bus, b"before", patience=30)
    nats_server.kill()
    threading.Timer(2, nats_server.start).start()
    time.sleep(0.5)  # the connection is lost by now
    began = time.monotonic()
    bus.call(_put, bus, b"during", patience=30)
    assert time.monotonic() - began < bus_module.OUTAGE_WAIT_S
    assert "connection lost" in caplog.text


def test_a_nats_gone_for_longer_fails_fast_and_comes_back(nats_server, bus_to, caplog, monkeypatch):
    """Past OUTAGE_WAIT_S without NATS a call raises NatsUnreachable (the next one at once)
    instead of trying for minutes; once NATS is back, calls work again."""
    monkeypatch.setattr(bus_module, "OUTAGE_WAIT_S", 3)  # 15 s in production
    bus = bus_to(nats_server.url)
    bus.call(_put, bus, b"before", patience=30)
    nats_server.kill()
    began = time.monotonic()
    with pytest.raises(NatsUnreachable) as caught:
        bus.call(_put, bus, b"during", patience=120)
    assert 2 < time.monotonic() - began < 10
    assert caught.value.setting == "NATS_URL" and nats_server.url in str(caught.value)
    again = time.monotonic()
    with pytest.raises(NatsUnreachable):
        bus.call(_put, bus, b"during", patience=120)
    assert time.monotonic() - again < 0.5
    nats_server.start()
    assert bus.connected(wait=5)  # reconnected within a reconnect interval or two
    bus.call(_put, bus, b"after", patience=30)
    assert caplog.text.count("is unreachable") == 1  # logged once, not per attempt


def test_a_nats_never_reached_fails_after_connect_wait(bus_to, caplog):
    """A closed port: NatsUnreachable after CONNECT_WAIT_S, at once afterwards; one warning
    and no traceback while nats-py keeps trying twice a second."""
    caplog.set_level(logging.INFO)
    url = f"nats://127.0.0.1:{free_port()}"
    bus = bus_to(url)
    began = time.monotonic()
    with pytest.raises(NatsUnreachable):
        bus.call(bus.nc)
    assert bus_module.CONNECT_WAIT_S - 0.2 < time.monotonic() - began < 5
    time.sleep(2)
    again = time.monotonic()
    with pytest.raises(NatsUnreachable):
        bus.call(bus.nc)
    assert time.monotonic() - again < 0.5
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (")[0] for r in warnings] == [f"NATS at {url} is unreachable"]
    assert not any(r.exc_info for r in caplog.records)


@pytest.fixture
def function_settings(tmp_path):
    """The process's settings as a function's: secrets in a folder, NATS and S3 on ports
    that the test decides."""

    def use(nats_url: str, *secrets: str):
        folder = tmp_path / "secrets"
        folder.mkdir(exist_ok=True)
        for name in secrets:
            (folder / name).write_text("value\n")
        settings.configure(
            settings.Settings(nats_url=nats_url, s3_endpoint=f"http://127.0.0.1:{free_port()}",
                              secrets_dir=folder)
        )  # fmt: skip
        services.reset()
        health.reset()

    yield use
    with contextlib.suppress(Exception):
        services.bus().close()
    settings.configure(None)
    services.reset()
    health.reset()


def test_ready_names_what_is_missing_first_secrets_then_nats_then_s3(
    function_settings, nats_server, tmp_path
):
    """Each problem in turn, each naming what to fix: a secret, then S3 (NATS being up)."""
    function_settings(nats_server.url, "s3-access-key")
    ok, body = health.ready()
    assert not ok and body["setting"] == "s3-secret-key"
    (tmp_path / "secrets" / "s3-secret-key").write_text("value\n")
    assert health.ready() == (ok, body)  # kept for CACHE_S: probes are cheap
    time.sleep(health.CACHE_S + 0.1)
    began = time.monotonic()
    ok, body = health.ready()
    assert time.monotonic() - began < 3
    assert not ok and body["setting"] == "S3_ENDPOINT"  # NATS is up; S3's port is closed
    assert settings.settings().s3_endpoint in body["error"]


def test_ready_names_nats_url_when_nats_is_down(function_settings):
    """NATS on a closed port: 503 naming NATS_URL, in about a second."""
    url = f"nats://127.0.0.1:{free_port()}"
    function_settings(url, "s3-access-key", "s3-secret-key")
    began = time.monotonic()
    ok, body = health.ready()
    assert time.monotonic() - began < 2.5
    assert (ok, body["status"], body["setting"]) == (False, "unavailable", "NATS_URL")
    assert url in body["error"]


@pytest.mark.parametrize("setting, value", [("FAASCI_CAP_SCOPE", "false"),
                                            ("FAASCI_CONCURRENCY", "ten"),
                                            ("FAASCI_BURST", "0")])  # fmt: skip
def test_ready_names_a_cap_setting_that_does_not_read(function_settings, monkeypatch, setting,
                                                       value):  # fmt: skip
    """A cap setting every stage would fail on makes the function unready, naming it, before
    any service is asked (NATS on a closed port is never reached)."""
    function_settings(f"nats://127.0.0.1:{free_port()}", "s3-access-key", "s3-secret-key")
    monkeypatch.setenv(setting, value)
    began = time.monotonic()
    ok, body = health.ready()
    assert time.monotonic() - began < 0.5
    assert (ok, body["setting"]) == (False, setting) and repr(value) in body["error"]
