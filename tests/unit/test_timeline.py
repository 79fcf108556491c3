"""faasci.timeline: bars drawn to scale from a run record, and the stage that dominated."""

from datetime import UTC, datetime, timedelta

from faasci import timeline

T0 = datetime(2026, 11, 27, 12, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def attempt(number, queued, started, finished, status="passed") -> dict:
    end = None if finished is None else at(finished)
    return {"number": number, "status": status, "queued_at": at(queued),
            "started_at": at(started), "finished_at": end}  # fmt: skip


RUN = {
    "created_at": at(0),
    "stages": [
        {"name": "lint", "attempts": [attempt(1, 0, 1, 11)]},
        {
            "name": "unit",
            "attempts": [attempt(1, 11, 12, 22, "failed"), attempt(2, 32, 40, 80)],
        },  # fmt: skip
        {"name": "build", "attempts": [attempt(1, 80, 80, 100)]},
        {"name": "deploy", "attempts": []},
    ],
}


def test_wait_and_run_time_of_each_attempt_from_the_record():
    """Queue wait = started_at - queued_at, run time = finished_at - started_at, from 0 at
    the run's creation; a stage without attempts draws nothing."""
    tl = timeline.build(RUN)
    assert [(b.label, b.wait_s, b.run_s) for b in tl.bars] == [
        ("lint #1", 1, 10), ("unit #1", 1, 10), ("unit #2", 8, 40), ("build #1", 0, 20),
    ]  # fmt: skip
    assert tl.span_s == 100


def test_the_stage_that_took_longest_dominates():
    """The dominant stage sums its attempts' waits and run times (a retried stage counts
    every attempt), and the summary says how much of the run that was."""
    tl = timeline.build(RUN)
    assert tl.dominant == "unit"
    assert (tl.dominant_wait_s, tl.dominant_run_s) == (9, 50)
    assert tl.summary().startswith("dominated by unit: 59.0s of 100.0s (59%")


def test_bars_are_drawn_to_scale():
    """At 100 columns for 100 s a column is a second: each bar's blank, wait (░) and run
    (█) parts are as long as their seconds."""
    tl = timeline.build(RUN)
    unit2 = timeline.bar_text(tl.bars[2], tl.span_s, 100).plain
    assert len(unit2) == 100
    assert unit2 == " " * 32 + "░" * 8 + "█" * 40 + " " * 20
    at_50 = timeline.bar_text(tl.bars[2], tl.span_s, 50).plain
    assert at_50 == " " * 16 + "░" * 4 + "█" * 20 + " " * 10


def test_a_very_short_run_still_gets_a_column():
    """A run far shorter than a column is drawn as one, so every attempt shows."""
    run = {"created_at": at(0), "stages": [
        {"name": "lint", "attempts": [attempt(1, 0, 0, 0.01)]},
        {"name": "unit", "attempts": [attempt(1, 0.01, 0.02, 100)]}]}  # fmt: skip
    tl = timeline.build(run)
    assert timeline.bar_text(tl.bars[0], tl.span_s, 40).plain == "█" + " " * 39
    assert timeline.bar_text(tl.bars[1], tl.span_s, 40).plain == "█" * 40


def test_a_running_attempt_runs_until_now():
    """An attempt without finished_at is drawn up to `now`."""
    run = {"created_at": at(0), "stages": [
        {"name": "unit", "attempts": [attempt(1, 0, 5, None, "running")]}]}  # fmt: skip
    tl = timeline.build(run, now=T0 + timedelta(seconds=25))
    assert tl.bars[0].run_s == 20 and tl.span_s == 25


def test_a_run_with_no_attempt_says_so():
    """Nothing started yet: no bars and no dominant stage."""
    tl = timeline.build({"created_at": at(0), "stages": [{"name": "lint", "attempts": []}]})
    assert tl.bars == [] and tl.dominant is None
    assert tl.summary() == "no attempt has started yet"


def test_the_rendering_fits_the_terminal_and_names_the_dominant_stage():
    """render: a header with the span, a line per attempt with its bar and figures, a legend
    and the summary, none wider than the terminal."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=90, color_system=None)
    console.print(timeline.render(timeline.build(RUN), 90))
    lines = console.file.getvalue().splitlines()
    assert all(len(line) <= 90 for line in lines)
    assert lines[0].startswith("attempt") and "100.0s" in lines[0]
    assert lines[3].startswith("unit #2") and "8.00s" in lines[3] and "40.0s" in lines[3]
    assert "░" in lines[3] and "█" in lines[3]
    assert lines[-1].startswith("dominated by unit")
