"""NATS as the local stack configures it (faasci.local.services): only the stack's user
with the `nats-token` secret connects, and not even it may remove the audit trail."""

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.js.errors import APIError

from faasci import audit
from faasci.bus import Bus, NatsUnreachable
from faasci.local import services
from faasci.settings import Settings


@dataclass
class Cfg:  # the parts of LocalConfig that nats_argv and write_nats_config read
    home: Path
    nats_port: int

    @property
    def run(self):
        return self.home / "run"

    @property
    def data(self):
        return self.home / "data"


@pytest.fixture
def secured_nats(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = Cfg(tmp_path, port)
    services.write_nats_config(cfg, "faasci", "the-token")
    argv = services.nats_argv(cfg)
    argv[0] = str(Path(sys.executable).parent / "nats-server")
    argv[argv.index("-m") + 1] = "0"  # no monitoring port
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert time.monotonic() < deadline, "nats-server did not start"
        time.sleep(0.05)
    yield cfg, f"nats://127.0.0.1:{port}"
    server.kill()
    server.wait()


def test_only_the_token_connects_and_the_trail_stays(secured_nats, tmp_path):
    cfg, url = secured_nats
    assert (cfg.run / "nats.conf").stat().st_mode & 0o777 == 0o600
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "nats-token").write_text("the-token\n")
    settings = Settings(nats_url=url, secrets_dir=tmp_path / "secrets")
    assert settings.nats_credentials() == {"user": "faasci", "password": "the-token"}
    assert Settings(secrets_dir=tmp_path / "none").nats_credentials() == {}

    for credentials in ({}, {"user": "faasci", "password": "wrong"}):
        outsider = Bus(url, **credentials)
        try:
            with pytest.raises(NatsUnreachable):
                outsider.call(outsider.js)
        finally:
            outsider.close()

    bus = Bus(url, **settings.nats_credentials())
    try:
        audit.record("run.start", actor="user:alice", run="20300101-000000-abcdef", bus=bus)

        async def delete_stream():
            await (await bus.js()).delete_stream(audit.STREAM)

        async def loosen():
            js = await bus.js()
            config = (await js.stream_info(audit.STREAM)).config
            config.deny_delete = False
            await js.update_stream(config)

        for attempt in (delete_stream, loosen):  # refused by NATS: the request never arrives
            with pytest.raises((APIError, TimeoutError)):
                bus.call(attempt, timeout=10)
        assert [e["actor"] for e in audit.entries(bus=bus)] == ["user:alice"]
    finally:
        bus.close()
