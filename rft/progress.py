"""Live progress of a command running on a terminal: the library's loops report through
`rft_core.progress`, and this display replaces its plain log lines while a command runs.

Each task is one line, then its figures on the next:

    sft           ━━━━━━━━━━━━━━━━━━━━━━━━━   50/250 steps  0:41 elapsed, 2:44 left (1.22/s)
      loss 0.531 val_accuracy 0.120; validating

Laid out for the terminal's width at every refresh: the bar gives way first (it shrinks, then goes),
the timing moves to the second line, and the figures wrap between words, so nothing is cut at 80
columns or at 120. Time left comes from the rate since the task's first update (a resumed loop
counts from where it resumed) and counts down between updates, so it neither jumps to `-:--:--`
nor sits still while a step is slow. Log lines printed while the display runs go above it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from rft_core.progress import format_latest, set_reporter

_MIN_BAR, _MAX_BAR = 10, 30
_NAME_WIDTH = 24  # names longer than this are not padded to align the bars
_INDENT = 2  # of a task's second line


def clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class Task:
    """What the display knows of one loop."""

    name: str
    total: int
    unit: str
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    first: tuple[int, float] | None = None  # (done, time) of the first update: the rate counts from there
    rate: float = 0.0  # units per second, since the first update
    updated: float = 0.0  # time of the last update
    latest: str = ""
    note: str | None = None
    finished: float | None = None

    def update(self, done: int, now: float) -> None:
        if self.first is None:
            self.first = (done, now)
        elif done > self.first[0] and now > self.first[1]:
            self.rate = (done - self.first[0]) / (now - self.first[1])
        self.done, self.updated = done, now

    def timing(self, now: float) -> str:
        """`0:41 elapsed, 2:44 left (1.22/s)`; `done in 3:25 (1.22/s)` at the end, `stopped after
        1:15 (0.0929/s)` when the loop ended before its last unit (Ctrl-C, an error)."""
        rate = f" ({self.rate:.3g}/s)" if self.rate else ""
        if self.finished is not None:
            ended = "done in" if self.done >= self.total else "stopped after"
            return f"{ended} {clock(self.finished - self.started)}{rate}"
        elapsed = f"{clock(now - self.started)} elapsed"
        if not self.rate:
            return f"{elapsed}, starting"
        left = max(0.0, (self.total - self.done) / self.rate - (now - self.updated))
        return f"{elapsed}, {clock(left)} left{rate}"


def bar(done: int, total: int, width: int) -> Text:
    filled = width if total <= 0 else round(width * min(done, total) / total)
    return Text("━" * filled, style="green") + Text("━" * (width - filled), style="grey35")


class LiveDisplay:
    """A `rft_core.progress` reporter drawn by rich's `Live` (`with display.live:`)."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4) -> None:
        self.tasks: list[Task] = []
        self.live = Live(self, console=console, refresh_per_second=refresh_per_second, transient=False)

    # -- the reporter's side

    def start(self, task: str, total: int, unit: str) -> Task:
        row = Task(task, total, unit)
        self.tasks.append(row)
        return row

    def update(self, handle: Task, done: int, latest: Mapping[str, float]) -> None:
        handle.update(done, time.monotonic())
        handle.latest = format_latest(latest)

    def note(self, handle: Task, text: str | None) -> None:
        handle.note = text

    def finish(self, handle: Task) -> None:
        handle.finished = time.monotonic()
        handle.note = None

    # -- the drawing

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        now = time.monotonic()
        names = min(_NAME_WIDTH, max((len(task.name) for task in self.tasks), default=0))
        for task in self.tasks:
            yield from self.lines(task, console, options.max_width, names, now)

    def lines(self, task: Task, console: Console, width: int, names: int, now: float) -> Iterator[Text]:
        """The task's lines at `width` columns, none longer: the bar shrinks and then goes, the
        timing moves to the second line, the figures wrap between words."""
        head = Text(task.name.ljust(names), style="bold")
        count = f"{task.done}/{task.total} {task.unit}"
        timing = task.timing(now)
        room = width - (len(head) + 2 + len(count) + 2 + len(timing)) - 2  # for the bar and its gap
        second: list[str] = []
        if room >= _MIN_BAR:
            first = head + "  " + bar(task.done, task.total, min(room, _MAX_BAR)) + f"  {count}  {timing}"
        elif room >= -2:
            first = head + f"  {count}  {timing}"
        else:
            first, second = head + f"  {count}", [timing]
        figures = "; ".join(part for part in (task.latest, task.note) if part)
        rest = "  ".join([*second, figures] if figures else second)
        # Wrapped between words; a word wider than the line folds. The second line is indented.
        yield from Text(first.plain, spans=first.spans, overflow="fold").wrap(console, width)
        if rest:
            for line in Text(rest, overflow="fold").wrap(console, max(1, width - _INDENT)):
                yield Text(" " * _INDENT) + line


def wants_bars(stream: Any = None) -> bool:
    """Bars on a terminal; plain log lines when output goes to a file, a pipe, CI or Prefect's logs."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def live_progress(enabled: bool | None = None, console: Console | None = None) -> Iterator[None]:
    """Show the library's progress as bars for the block when stdout is a terminal (or `enabled`)."""
    if not (wants_bars() if enabled is None else enabled):
        yield
        return
    display = LiveDisplay(console)
    previous = set_reporter(display)
    try:
        with display.live:
            yield
    finally:
        set_reporter(previous)
