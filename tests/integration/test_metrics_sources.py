"""Where the metrics come from and go to, with real components: the gateway's queue backlog
read from a real JetStream consumer, and the local Prometheus (faasci.local.prometheus)
started from its generated configuration, or refusing to pass for one it is not."""

import socket
import subprocess
import sys

import pytest
import requests
from conftest import ROOT

from faasci import metrics
from faasci import stack as stack_file
from faasci.local import processes, prometheus, queue
from faasci.local.config import LocalConfig
from faasci.local.provider import function_ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_backlog_counts_what_waits_in_the_queue(nats_bus):
    """Three queued invocations nobody has taken are three pending; the collector says so."""
    nats_bus.call(queue.ensure_queue, nats_bus)
    # The worker's durable consumer, as the gateway makes it, taking nothing yet.
    nats_bus.call(_durable, nats_bus)
    for n in range(3):
        message = queue.request_message("lint", "", "POST", "", {}, b"{}", f"call-{n}", None)
        nats_bus.call(queue.enqueue, nats_bus, message)
    assert nats_bus.call(queue.backlog, nats_bus) == (3, 0)
    collector = metrics.QueueBacklog(lambda: nats_bus.call(queue.backlog, nats_bus))
    values = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert values == {"faasci_queue_up": 1, "faasci_queue_pending_messages": 3,
                      "faasci_queue_in_progress_messages": 0}  # fmt: skip


async def _durable(bus) -> None:
    from nats.js.api import ConsumerConfig

    js = await bus.js()
    await js.add_consumer(queue.STREAM, ConsumerConfig(durable_name=queue.DURABLE,
                                                       ack_wait=queue.ACK_WAIT_S))  # fmt: skip


@pytest.fixture
def cfg(tmp_path) -> LocalConfig:
    """A stack configuration of this checkout's stack.yml, at home in tmp_path, whose
    Prometheus gets a free port; its Prometheus stopped afterwards."""
    home = tmp_path / "home"
    config = LocalConfig(stack_file=ROOT / "stack.yml", home=home,
                         gateway_url=f"http://127.0.0.1:{free_port()}", nats_port=free_port(),
                         s3_port=free_port(), secrets_dir=home / "secrets",
                         prometheus_port=free_port())  # fmt: skip
    yield config
    processes.stop(config.run, "prometheus")


def test_prometheus_starts_with_every_function_and_the_rules(cfg):
    """start() runs Prometheus on its port with the rules loaded and one file_sd target per
    function of stack.yml (at its provider port); a second start() finds it running."""
    assert prometheus.start(cfg, {"PATH": "/usr/bin:/bin"}) is True
    rules = requests.get(f"{prometheus.url(cfg)}/api/v1/rules", timeout=10).json()
    assert "FaasciPipelineErrorRate" in {r["name"] for g in rules["data"]["groups"]
                                         for r in g["rules"]}  # fmt: skip
    want = {f"127.0.0.1:{port}" for port in
            function_ports(cfg, stack_file.load(cfg.stack_file)).values()}  # fmt: skip

    def listed():
        targets = requests.get(f"{prometheus.url(cfg)}/api/v1/targets", timeout=10).json()
        return {t["labels"]["instance"] for t in targets["data"]["activeTargets"]
                if t["labels"]["job"] == "functions"}  # fmt: skip

    processes.wait_until(lambda: listed() == want, 30, "the functions as targets")
    assert prometheus.start(cfg, {"PATH": "/usr/bin:/bin"}) is False


def test_prometheus_on_a_taken_port_fails_loudly(cfg):
    """With its port taken by another server, start() stops and says why instead of passing
    for the other one."""
    other = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(cfg.prometheus_port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cfg.home.parent,
    )  # fmt: skip
    try:
        processes.wait_until(
            lambda: requests.get(prometheus.url(cfg), timeout=1), 10, "http.server"
        )
        with pytest.raises(SystemExit, match="is the port taken"):
            prometheus.start(cfg, {"PATH": "/usr/bin:/bin"})
        assert processes.pid_of(cfg.run, "prometheus") is None
    finally:
        other.kill()
        other.wait()
