"""Progress of the long loops (pretraining, SFT steps, RL iterations, evaluation): one interface,
two displays.

A loop opens `progress(task, total, unit)` and calls `update(done, **latest)` as it goes (latest:
the figures worth watching, e.g. loss or reward). Work that the count does not show (a validation,
a checkpoint, the phase a loop is in) is named with `note(text)`, or `with doing(text):` for the
time it takes, so that a bar sitting at 49/50 says what it waits for. What shows is decided by whoever runs the loop,
not by the loop: by default plain log lines on the `rft.progress` logger, about ten per task
plus the last one, with rate and time left (what Prefect's logs, CI and files want); a command
running on a terminal installs a live display instead (`set_reporter`, see `rft/progress.py`).
The library never draws anything itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

logger = logging.getLogger("rft.progress")


class Reporter(Protocol):
    """A display of progress: `start` returns a handle that the other two take."""

    def start(self, task: str, total: int, unit: str) -> Any: ...

    def update(self, handle: Any, done: int, latest: Mapping[str, float]) -> None: ...

    def finish(self, handle: Any) -> None: ...

    # Optional: `note(handle, text)` names the work going on beside the count (None: nothing).


def format_latest(latest: Mapping[str, float]) -> str:
    """`loss 0.531 val_accuracy 0.120`: the figures in the order given, 3 significant decimals."""
    return " ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}" for key, value in latest.items())


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LogReporter:
    """Plain lines: `sft 40/400 steps (3.2/s, 1m52s left) loss 0.531`, about every tenth of a task,
    with the work or phase named beside the count when there is one (`; critic warm-up 1/10: ...`)."""

    def __init__(self, lines_per_task: int = 10):
        self.lines_per_task = lines_per_task

    def start(self, task: str, total: int, unit: str) -> dict[str, Any]:
        return {"task": task, "total": total, "unit": unit, "started": time.perf_counter(), "first": None,
                "next": 0}

    def update(self, handle: dict[str, Any], done: int, latest: Mapping[str, float]) -> None:
        now = time.perf_counter()
        if handle["first"] is None:
            handle["first"] = (done, now)  # a resumed loop starts past 0: rate from here on
            return
        if done < handle["next"] and done < handle["total"]:
            return
        handle["next"] = done + max(1, handle["total"] // self.lines_per_task)
        first_done, first_time = handle["first"]
        rate = (done - first_done) / max(now - first_time, 1e-9)
        left = (handle["total"] - done) / rate if rate > 0 else float("nan")
        timing = f"{rate:.2f}/s, {format_seconds(left)} left" if rate > 0 else "starting"
        extra = format_latest(latest)
        handle["done"] = done
        # The phase the figures come from (a critic warm-up's `kl 0.000` is not a policy that
        # stopped moving): the note standing when the count moved, on the same line.
        phase = handle.get("note")
        logger.info(
            "%s %d/%d %s (%s)%s%s", handle["task"], done, handle["total"], handle["unit"], timing,
            f" {extra}" if extra else "", f"; {phase}" if phase else "",
        )

    def note(self, handle: dict[str, Any], text: str | None) -> None:
        """A line when the work beside the count changes (`sft 50/50 steps: validating`): at the
        last unit (where a long wait is), or at most about `lines_per_task` times over the task."""
        done, total = handle.get("done", 0), handle["total"]
        every = max(1, total // self.lines_per_task)
        last = handle.get("noted_at")
        if text and text != handle.get("note") and (done >= total or last is None or done - last >= every):
            logger.info("%s %d/%d %s: %s", handle["task"], done, total, handle["unit"], text)
            handle["noted_at"] = done
        handle["note"] = text

    def finish(self, handle: dict[str, Any]) -> None:
        pass


_reporter: Reporter = LogReporter()


def set_reporter(reporter: Reporter | None) -> Reporter:
    """Install `reporter` (None: plain log lines) for every loop from now on; returns the previous one."""
    global _reporter
    previous, _reporter = _reporter, reporter or LogReporter()
    return previous


class Progress:
    """What a loop holds: `update(done, **latest)`, `note(text)`, `doing(text)`."""

    def __init__(self, reporter: Reporter, handle: Any):
        self._reporter, self._handle = reporter, handle
        self._note: str | None = None

    def update(self, done: int, **latest: float) -> None:
        self._reporter.update(self._handle, done, latest)

    def note(self, text: str | None) -> None:
        """Name the phase or work beside the count (None: nothing), e.g. `critic warm-up`."""
        self._note = text
        if hasattr(self._reporter, "note"):
            self._reporter.note(self._handle, text)

    @contextlib.contextmanager
    def doing(self, text: str) -> Iterator[None]:
        """Name the work of the block beside the count (`validating`), then the note before it."""
        before = self._note
        self.note(f"{before}; {text}" if before else text)
        try:
            yield
        finally:
            self.note(before)


class _Silent:
    def start(self, task: str, total: int, unit: str) -> None:
        return None

    def update(self, handle: None, done: int, latest: Mapping[str, float]) -> None:
        pass

    def finish(self, handle: None) -> None:
        pass


@contextlib.contextmanager
def progress(
    task: str, total: int, unit: str = "steps", *, start: int = 0, enabled: bool = True
) -> Iterator[Progress]:
    """Report a loop of `total` units under the name `task`; `start` units are already done.
    `enabled=False` reports nothing (e.g. every process but the main one)."""
    reporter = _reporter if enabled else _Silent()
    handle = reporter.start(task, total, unit)
    tracker = Progress(reporter, handle)
    tracker.update(start)
    try:
        yield tracker
    finally:
        reporter.finish(handle)
