"""cron-connector's part: invoke functions on their `schedule` annotation, in the form the
real connector uses (POST, empty body, X-Topic: cron-function, X-Connector:
cron-connector, synchronous)."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import requests
from croniter import croniter

log = logging.getLogger("faasci.cron")

CRON_HEADERS = {"X-Topic": "cron-function", "X-Connector": "cron-connector"}


class Scheduler:
    def __init__(self, schedules: dict[str, str], invoke, now=lambda: datetime.now(UTC)):
        """`schedules` maps function name to cron expression; `invoke(name)` calls it."""
        self.invoke, self.now = invoke, now
        start = now()
        self.next = {
            name: croniter(expr, start).get_next(datetime) for name, expr in schedules.items()
        }
        self.schedules = schedules

    def due(self) -> list[str]:
        """The functions whose time has come; each one's next time moves on."""
        now = self.now()
        fired = []
        for name, at in self.next.items():
            if at <= now:
                fired.append(name)
                self.next[name] = croniter(self.schedules[name], now).get_next(datetime)
        return fired

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(1):
            for name in self.due():
                log.info("cron: invoking %s", name)
                threading.Thread(target=self.invoke, args=(name,), daemon=True).start()


def invoke_through_gateway(gateway_url: str, name: str) -> int | None:
    """One scheduled invocation, as cron-connector makes it; the function's HTTP status."""
    try:
        resp = requests.post(f"{gateway_url}/function/{name}", data=b"", headers=CRON_HEADERS,
                             timeout=3600)  # fmt: skip
    except requests.RequestException as e:
        log.warning("cron: %s failed: %s", name, e)
        return None
    log.info("cron: %s answered %s", name, resp.status_code)
    return resp.status_code
