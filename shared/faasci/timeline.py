"""A run's timeline: each stage attempt's wait in the queue and its run time, as bars drawn
to scale in the terminal (`faasci show <run> --timeline`), and the stage that dominated.

Pure: `build` reads a run record (as the runs function answers it, JSON) and `render` draws
it with rich; nothing here talks to the stack.

An attempt's wait is started_at - queued_at (runs.Attempt.queued_at: when it became owed:
the run's creation, the previous stage's end, or its retry's due time); its run time is
finished_at - started_at (still running: up to `now`). Time 0 is the run's creation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Group
from rich.text import Text

WAIT_CHAR, RUN_CHAR = "░", "█"
STYLE = {"passed": "green", "failed": "red", "running": "yellow", "cancelled": "magenta"}


@dataclass(frozen=True)
class Bar:
    """One attempt, in seconds from the run's creation."""

    stage: str
    attempt: int
    status: str
    queued: float  # when it became owed
    started: float
    ended: float

    @property
    def wait_s(self) -> float:
        return max(0.0, self.started - self.queued)

    @property
    def run_s(self) -> float:
        return max(0.0, self.ended - self.started)

    @property
    def label(self) -> str:
        return f"{self.stage} #{self.attempt}"


@dataclass(frozen=True)
class Timeline:
    bars: list[Bar]
    span_s: float  # from the run's creation to the last attempt's end
    dominant: str | None  # the stage whose attempts took the most time (waiting + running)
    dominant_wait_s: float = 0.0
    dominant_run_s: float = 0.0

    @property
    def dominant_s(self) -> float:
        return self.dominant_wait_s + self.dominant_run_s

    def summary(self) -> str:
        if self.dominant is None:
            return "no attempt has started yet"
        share = self.dominant_s / self.span_s * 100 if self.span_s else 100.0
        return (f"dominated by {self.dominant}: {_s(self.dominant_s)} of {_s(self.span_s)} "
                f"({share:.0f}%; {_s(self.dominant_run_s)} running, "
                f"{_s(self.dominant_wait_s)} queued)")  # fmt: skip


def _at(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def build(run: dict, now: datetime | None = None) -> Timeline:
    """The timeline of a run record (dict, as JSON)."""
    now = now or datetime.now(UTC)
    origin = _at(run.get("created_at"))
    bars: list[Bar] = []
    for stage in run.get("stages") or []:
        for attempt in stage.get("attempts") or []:
            started = _at(attempt.get("started_at"))
            if started is None:
                continue
            origin = origin or started
            queued = _at(attempt.get("queued_at")) or started
            ended = max(_at(attempt.get("finished_at")) or now, started)
            # A retry owed from a due time later than its start (clock skew): no wait.
            queued = min(queued, started)
            seconds = [(at - origin).total_seconds() for at in (queued, started, ended)]
            bars.append(Bar(stage["name"], attempt["number"], attempt.get("status", "running"),
                            *seconds))  # fmt: skip
    span = max([b.ended for b in bars] + [0.0])
    totals: dict[str, list[float]] = {}
    for bar in bars:
        wait_run = totals.setdefault(bar.stage, [0.0, 0.0])
        wait_run[0] += bar.wait_s
        wait_run[1] += bar.run_s
    if not totals:
        return Timeline(bars, span, None)
    dominant = max(totals, key=lambda name: sum(totals[name]))
    return Timeline(bars, span, dominant, *totals[dominant])


def columns(start: float, end: float, span: float, width: int) -> tuple[int, int]:
    """The columns [first, last) of an interval drawn to scale in `width` columns."""
    if span <= 0:
        return 0, 0
    first = min(width, round(start / span * width))
    last = min(width, round(end / span * width))
    return first, last


def bar_text(bar: Bar, span: float, width: int) -> Text:
    """The attempt's wait (░) then run time (█), placed to scale; a run time too short for
    a column still gets one, so every attempt shows."""
    q, s = columns(bar.queued, bar.started, span, width)
    _, e = columns(bar.started, bar.ended, span, width)
    e = max(e, s + 1) if width else e
    if e > width:  # the one column given to a short run at the very end
        s, e = width - 1, width
        q = min(q, s)
    text = Text(" " * q)
    text.append(WAIT_CHAR * (s - q), style="dim")
    text.append(RUN_CHAR * (e - s), style=STYLE.get(bar.status, ""))
    text.append(" " * (width - e))
    return text


def render(timeline: Timeline, width: int = 100) -> Group:
    """The timeline as rich renderables fitting `width` columns."""
    label_w = max([len(b.label) for b in timeline.bars] + [7])
    numbers_w = 18  # " wait 12.3s run 45.6s" shortened: two 8-wide columns and spaces
    bar_w = max(10, width - label_w - numbers_w - 3)
    half = bar_w // 2
    head = f"{'attempt':<{label_w}} {'0s':<{half}}{_s(timeline.span_s):>{bar_w - half}}"
    lines = [Text(f"{head} {'queued':>8} {'ran':>8}", style="bold")]
    for bar in timeline.bars:
        line = Text(f"{bar.label:<{label_w}} ")
        line.append_text(bar_text(bar, timeline.span_s, bar_w))
        line.append(f" {_s(bar.wait_s):>8} {_s(bar.run_s):>8}")
        lines.append(line)
    scale = timeline.span_s / bar_w
    lines.append(Text(f"{WAIT_CHAR} queued  {RUN_CHAR} running  (to scale: {scale:.3g}s a column)",
                      style="dim"))  # fmt: skip
    lines.append(Text(timeline.summary(), style="bold"))
    return Group(*lines)


def _s(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 600:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"
