"""No lost hand-off: the gateway down for 60 s just as a stage finishes, on a real local
stack, and the run still ends passed with each stage's commands run once.

"The gateway down" is cut here between the functions and the gateway: the functions reach
it through a TCP proxy this test holds (FAASCI_FUNCTIONS_GATEWAY_URL), which resets every
connection for 60 s. Stopping the local gateway process itself would stop its functions
with it (they are its children and die with it), which is a different failure (a whole
node down, recovered by the lease); in a cluster the gateway is a deployment of its own,
and its outage is what the functions see here: every invocation they make is refused.
"""

import contextlib
import socket
import struct
import threading
import time
from collections import Counter
from datetime import datetime

import pytest
from conftest import ROOT, stack_ports, start_run, started

from faasci.invoke import Gateway
from faasci.local import oidc
from faasci.local.config import LocalConfig

# The ports of test_local_stack's second stack: these tests never run at the same time.
HANDOFF_STACK = stack_ports(29080, 25222, 29333)
OUTAGE_S = 60


class Proxy:
    """A TCP proxy to `target_port` that can be cut (every connection it takes is reset at
    once, open ones closed) and restored. It keeps its port throughout: unbound for a minute,
    the port could go to another process's outgoing connection and not come back."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock, self.open_sockets, self.refusing = threading.Lock(), set(), False
        threading.Thread(target=self._accept, daemon=True).start()

    def restore(self) -> None:
        self.refusing = False

    def cut(self) -> None:
        self.refusing = True
        with self.lock:
            for s in self.open_sockets:
                _close(s)
            self.open_sockets.clear()

    def close(self) -> None:
        self.cut()
        _close(self.listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:  # reset, as a refused connection fails: nothing reaches it
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open_sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                _close(s)
            with self.lock:
                self.open_sockets -= {a, b}


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
    s.close()


@pytest.fixture
def proxied_stack(tmp_path, monkeypatch):
    """A local stack of its own whose functions reach its gateway through a Proxy; yields
    (config, proxy, gateway client). Stopped afterwards whatever happened."""
    proxy = Proxy(int(HANDOFF_STACK["OPENFAAS_URL"].rsplit(":", 1)[1]))
    env = {**HANDOFF_STACK, "FAASCI_HOME": str(tmp_path / "home"),
           "FAASCI_STACK": str(ROOT / "stack.yml"),
           "FAASCI_FUNCTIONS_GATEWAY_URL": proxy.url}  # fmt: skip
    monkeypatch.delenv("FAASCI_SECRETS_DIR", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = LocalConfig.from_env()
    try:
        with started(cfg):
            gateway = Gateway(cfg.gateway_url, timeout=120,
                              token=lambda: oidc.token(cfg, "test-admin"))  # fmt: skip
            yield cfg, proxy, gateway
    finally:
        proxy.close()


def _record(gateway, run_id: str) -> dict:
    return gateway.call("runs", method="GET", path=run_id).json()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_gateway_down_60s_across_a_stage_end_the_run_still_passes(proxied_stack, make_repo,
                                                                   outside):  # fmt: skip
    """lint ends while the gateway is unreachable for 60 s: its hand-off to unit fails
    (unit stays queued for the whole outage), then the hand-off guard dispatches unit once
    the gateway is back; the run passes, each stage's commands ran once."""
    _cfg, proxy, gateway = proxied_stack
    markers, ending = outside / "markers", outside / "lint-ending"
    repo = make_repo({".faasci.yml": f"""\
service: handoff
stages:
  lint:
    run: ["echo $FAASCI_RUN_ID lint >> {markers}; touch {ending}; sleep 3"]
  unit:
    run: ["echo $FAASCI_RUN_ID unit >> {markers}"]
"""})  # fmt: skip
    began = time.monotonic()
    run_id = start_run(gateway, repo)
    _wait(ending.exists, 90, "lint's last command")
    proxy.cut()  # lint ends ~3 s from now, with the gateway unreachable
    cut_at = time.monotonic()

    def lint_recorded() -> bool:
        return _record(gateway, run_id)["stages"][0]["status"] != "running"

    _wait(lint_recorded, OUTAGE_S - 5, "lint's end to be recorded")
    time.sleep(max(0.0, cut_at + OUTAGE_S - 2 - time.monotonic()))
    during = _record(gateway, run_id)  # the hand-off really failed: unit never started
    assert during["status"] == "running"
    assert [(s["name"], s["status"]) for s in during["stages"]] == [("lint", "passed"),
                                                                   ("unit", "queued")]  # fmt: skip
    assert during["stages"][1]["attempts"] == []
    time.sleep(max(0.0, cut_at + OUTAGE_S - time.monotonic()))
    proxy.restore()
    restored_at = time.monotonic()

    run = _record(gateway, run_id)
    while run["status"] not in ("passed", "failed", "cancelled"):
        assert time.monotonic() - restored_at < 180, f"run still {run['status']}"
        time.sleep(0.5)
        run = _record(gateway, run_id)
    recovered_s = time.monotonic() - restored_at
    assert run["status"] == "passed", run
    assert [[a["status"] for a in s["attempts"]] for s in run["stages"]] == [["passed"], ["passed"]]
    executed = Counter(markers.read_text().splitlines())
    assert executed == {f"{run_id} lint": 1, f"{run_id} unit": 1}
    # unit started only after the outage (dispatched by the guard, not by the lost hand-off)
    lint_end = datetime.fromisoformat(run["stages"][0]["finished_at"])
    unit_start = datetime.fromisoformat(run["stages"][1]["started_at"])
    assert (unit_start - lint_end).total_seconds() > OUTAGE_S - 10
    print(f"run {run_id}: passed {recovered_s:.1f}s after the gateway came back "
          f"({time.monotonic() - began:.0f}s in all)")  # fmt: skip
