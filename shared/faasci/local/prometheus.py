"""A real Prometheus scraping the local stack (`faasci up --observe`): Debian's `prometheus`
(./scripts/install), its configuration generated into the stack's home, its data under
data/prometheus, the alert rules of shared/observability loaded.

It scrapes what OpenFaaS's Prometheus scrapes in a cluster: the gateway's /metrics (its
queue's backlog here) and each function's /_/metrics (stack.yml's prometheus.io.*
annotations). The functions' ports are fixed by their order in stack.yml (provider.py's
function_ports), so a file_sd list written at start names them all before any of them is
up; Prometheus marks a function down until it answers. A function deployed later by image
alone is not in it (it serves no faas-ci metrics).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import requests
import yaml

from .. import stack as stack_file
from . import processes
from .config import LocalConfig

SCRAPE_S = 5  # locally, so a run's metrics are queryable seconds after it
RULES = Path(__file__).resolve().parents[2] / "observability" / "alert-rules.yml"


def binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise SystemExit("prometheus is not installed (Debian's package): run ./scripts/install")
    return found


def folder(cfg: LocalConfig) -> Path:
    return cfg.home / "prometheus"


def url(cfg: LocalConfig) -> str:
    return f"http://127.0.0.1:{cfg.prometheus_port}"


def targets(cfg: LocalConfig) -> list[dict]:
    """file_sd entries: one per function of stack.yml, labelled as OpenFaaS labels its pods."""
    from .provider import function_ports  # the provider's module is heavier than this one

    ports = function_ports(cfg, stack_file.load(cfg.stack_file))
    return [{"targets": [f"127.0.0.1:{port}"], "labels": {"faas_function": name}}
            for name, port in ports.items()]  # fmt: skip


def config(cfg: LocalConfig) -> dict:
    every = f"{SCRAPE_S}s"
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every,
                   "external_labels": {"monitor": "faasci-local"}},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "gateway",
             "static_configs": [{"targets": [f"127.0.0.1:{cfg.gateway_port}"]}]},
            {"job_name": "functions", "metrics_path": "/_/metrics",
             "file_sd_configs": [{"files": [str(folder(cfg) / "functions.json")],
                                  "refresh_interval": every}]},
            {"job_name": "prometheus",
             "static_configs": [{"targets": [f"127.0.0.1:{cfg.prometheus_port}"]}]},
        ],
    }  # fmt: skip


def write_config(cfg: LocalConfig) -> Path:
    """prometheus.yml and the functions' file_sd list, in the stack's home; the config's path."""
    folder(cfg).mkdir(parents=True, exist_ok=True)
    listed = folder(cfg) / "functions.json"
    # Written whole then renamed: Prometheus watches the file and must never read half of it.
    partial = listed.with_suffix(".json.tmp")
    partial.write_text(json.dumps(targets(cfg), indent=1))
    partial.replace(listed)
    path = folder(cfg) / "prometheus.yml"
    path.write_text(yaml.safe_dump(config(cfg), sort_keys=False))
    return path


def argv(cfg: LocalConfig, config_file: Path) -> list[str]:
    return [
        binary(),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={cfg.data / 'prometheus'}",
        "--storage.tsdb.retention.time=7d",
        f"--web.listen-address=127.0.0.1:{cfg.prometheus_port}",
        "--web.enable-lifecycle",  # POST /-/reload picks up an edited rules file
    ]


def ready(cfg: LocalConfig) -> bool:
    try:
        return requests.get(f"{url(cfg)}/-/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start(cfg: LocalConfig, env: dict[str, str]) -> bool:
    """Start Prometheus unless it runs: True when started. Its configuration is written
    afresh either way (the stack file may name other functions now)."""
    config_file = write_config(cfg)
    if processes.pid_of(cfg.run, "prometheus"):
        # Running already: it reads the configuration again (one not answering yet reads
        # the file as it starts).
        with contextlib.suppress(requests.RequestException):
            requests.post(f"{url(cfg)}/-/reload", timeout=5)
        return False
    (cfg.data / "prometheus").mkdir(parents=True, exist_ok=True)
    log = cfg.logs / "prometheus.log"
    processes.start(cfg.run, "prometheus", argv(cfg, config_file), log, env)
    deadline = time.monotonic() + 60
    # Ours must be the one answering: on a machine with systemd, Debian's package starts its
    # own prometheus.service on 9090, and ours would die on the taken port unnoticed.
    while not (alive := processes.pid_of(cfg.run, "prometheus")) or not ready(cfg):
        if not alive or time.monotonic() > deadline:
            processes.stop(cfg.run, "prometheus")
            raise SystemExit(f"Prometheus did not start on {url(cfg)} (is the port taken? "
                             f"FAASCI_PROMETHEUS_PORT moves it); see {log}")  # fmt: skip
        time.sleep(0.2)
    return True


def query(cfg: LocalConfig, promql: str) -> list[dict]:
    """An instant query through Prometheus's HTTP API: its result vector."""
    r = requests.get(f"{url(cfg)}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query {promql!r} failed: {body}")
    return body["data"]["result"]
