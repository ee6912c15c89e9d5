"""Progress of long loops: plain log lines by default, live bars only on a terminal."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from rft.progress import RichReporter, live_progress, wants_bars
from rft_core import progress as progress_module
from rft_core.progress import LogReporter, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_by_default_about_ten_per_task_with_rate_and_latest_figures(caplog):
    caplog.set_level(logging.INFO, logger="rft.progress")
    with progress("sft", 40, "steps") as bar:
        for step in range(1, 41):
            bar.update(step, loss=1.0 / step)
    lines = [r.getMessage() for r in caplog.records if r.name == "rft.progress"]
    assert 9 <= len(lines) <= 11
    assert lines[-1].startswith("sft 40/40 steps (")
    assert "/s, 0s left)" in lines[-1] and lines[-1].endswith("loss 0.025")


def test_a_resumed_loop_reports_from_where_it_starts(caplog):
    caplog.set_level(logging.INFO, logger="rft.progress")
    with progress("rl", 10, "iterations", start=6) as bar:
        for done in range(7, 11):
            bar.update(done, reward_mean=0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "rft.progress"]
    assert lines[0].startswith("rl 7/10 iterations") and lines[-1].startswith("rl 10/10 iterations")


def test_bars_only_on_a_terminal():
    assert not wants_bars(io.StringIO())
    assert wants_bars(Terminal())


def test_live_progress_installs_bars_for_the_block_and_restores_plain_lines():
    assert isinstance(progress_module._reporter, LogReporter)
    with live_progress(enabled=False):
        assert isinstance(progress_module._reporter, LogReporter)
    with live_progress(enabled=True):
        assert isinstance(progress_module._reporter, RichReporter)
    assert isinstance(progress_module._reporter, LogReporter)


def test_rich_bars_show_done_total_and_latest_figures():
    out = Terminal()
    reporter = RichReporter(Console(file=out, force_terminal=True, width=200))
    previous = progress_module.set_reporter(reporter)
    try:
        with reporter.display, progress("rl", 5, "iterations") as bar:
            for done in range(1, 6):
                bar.update(done, reward_mean=0.25, val_accuracy=0.5)
    finally:
        progress_module.set_reporter(previous)
    shown = out.getvalue()
    assert "5/5" in shown and "reward_mean 0.250 val_accuracy 0.500" in shown
