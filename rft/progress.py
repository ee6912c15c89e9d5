"""Live progress bars for a command running on a terminal (rich): the library's loops report through
`rft_core.progress`, and this display replaces its plain log lines while a command runs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rft_core.progress import format_latest, set_reporter


class RichReporter:
    """One bar per task: name, bar, done/total, rate, elapsed, time left, the latest figures."""

    def __init__(self, console: Any = None) -> None:
        self.display = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[latest]}"),
            transient=False,
            console=console,
        )

    def start(self, task: str, total: int, unit: str) -> TaskID:
        return self.display.add_task(task, total=total, unit=unit, rate="", latest="")

    def update(self, handle: TaskID, done: int, latest: Mapping[str, float]) -> None:
        speed = self.display.tasks[self.display.task_ids.index(handle)].speed
        rate = f"{speed:.2f}/s" if speed else ""
        self.display.update(handle, completed=done, rate=rate, latest=format_latest(latest))

    def finish(self, handle: TaskID) -> None:
        self.display.stop_task(handle)


def wants_bars(stream: Any = None) -> bool:
    """Bars on a terminal; plain log lines when output goes to a file, a pipe, CI or Prefect's logs."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def live_progress(enabled: bool | None = None) -> Iterator[None]:
    """Show the library's progress as bars for the block when stdout is a terminal (or `enabled`)."""
    if not (wants_bars() if enabled is None else enabled):
        yield
        return
    reporter = RichReporter()
    previous = set_reporter(reporter)
    try:
        with reporter.display:
            yield
    finally:
        set_reporter(previous)
