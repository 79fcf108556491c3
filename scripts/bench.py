"""Benchmarks that print JSON figures. `cache`: the example service's pipeline on a stack
of its own, once with an empty dependency cache (real installs from the package index)
and once warm; the figure is the dependency set-up of the first stage (set-up + save
when cold, restore when warm), with the pipelines' wall times beside it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_STACK = {
    "FAASCI_STACK": str(ROOT / "stack.yml"),
    "FAASCI_HOME": str(ROOT / ".faasci" / "bench"),
    "FAASCI_SECRETS_DIR": str(ROOT / ".faasci" / "bench" / "secrets"),
    "OPENFAAS_URL": "http://127.0.0.1:38080",
    "FAASCI_NATS_PORT": "34222",
    "FAASCI_S3_PORT": "38333",
}


def dependency_seconds(attempt: dict) -> float:
    cache = attempt["cache"] or {}
    return round(cache.get("restore_s", 0) + cache.get("setup_s", 0) + cache.get("save_s", 0), 3)


def run_pipeline(gateway, repo: str) -> dict:
    resp = gateway.call("runs", {"repo": repo}, timeout=300)
    resp.raise_for_status()
    run_id = resp.json()["id"]
    while True:
        run = gateway.call("runs", method="GET", path=run_id).json()
        if run["status"] in ("passed", "failed", "cancelled"):
            return run
        time.sleep(0.5)


def bench_cache() -> dict:
    os.environ.update(BENCH_STACK)
    from faasci.invoke import Gateway
    from faasci.local import control
    from faasci.local.config import LocalConfig

    cfg = LocalConfig.from_env()
    control.up(cfg, say=lambda *a: print(*a, file=sys.stderr))
    try:
        gateway = Gateway(cfg.gateway_url, timeout=120)
        purged = gateway.call("cache-invalidator", {"service": "sample-service"}, path="purge")
        purged.raise_for_status()
        repo = str(ROOT / "examples" / "sample-service")
        cold, warm = run_pipeline(gateway, repo), run_pipeline(gateway, repo)
    finally:
        control.down(cfg, say=lambda *a: print(*a, file=sys.stderr))
    for run in (cold, warm):
        if run["status"] != "passed":
            raise SystemExit(f"run {run['id']} {run['status']}: the benchmark needs passing runs")
    first_cold, first_warm = cold["stages"][0]["attempts"][0], warm["stages"][0]["attempts"][0]
    assert first_cold["cache"]["hit"] is False and first_warm["cache"]["hit"] is True
    cold_s, warm_s = dependency_seconds(first_cold), dependency_seconds(first_warm)
    return {
        "benchmark": "cache",
        "cold_s": cold_s,
        "warm_s": warm_s,
        "speedup": round(cold_s / warm_s, 1),
        "target_speedup": 3,
        "archive_bytes": first_cold["cache"]["saved_bytes"],
        "cold_pipeline_s": cold["duration_s"],
        "warm_pipeline_s": warm["duration_s"],
        "cold_dependencies_all_stages_s": round(
            sum(dependency_seconds(s["attempts"][0]) for s in cold["stages"]), 3),
        "warm_dependencies_all_stages_s": round(
            sum(dependency_seconds(s["attempts"][0]) for s in warm["stages"]), 3),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["cache"])
    args = parser.parse_args()
    print(json.dumps({"cache": bench_cache}[args.name](), indent=2))


if __name__ == "__main__":
    main()
