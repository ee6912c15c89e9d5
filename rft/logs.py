"""The log lines of the `rft` commands that run flows and stages (`rft run`, `rft train`).

One line per record, `HH:MM:SS <where>: <message>`, where `where` says what the line is about:
the stage (the Prefect task) for a task run's records, the flow for a flow run's, else the logger.
Prefect's own records are among them (`rft run` logs to this handler, not to Prefect's console
format), so `Finished in state Cached(type=COMPLETED)` reads `sft: Finished in state ...`.

The handler writes to whatever `sys.stderr` is when a record comes: while the progress display
runs, that is the display's proxy, which prints the line above the bars instead of through them.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(where)s: %(message)s"
DATEFMT = "%H:%M:%S"


class WhereFormatter(logging.Formatter):
    """`HH:MM:SS sft: message`: a Prefect task run's records name their task (the stage), a flow
    run's their flow, others their logger."""

    def __init__(self) -> None:
        super().__init__(FORMAT, DATEFMT)

    def format(self, record: logging.LogRecord) -> str:
        task = getattr(record, "task_name", None)
        flow = getattr(record, "flow_name", None)
        if task and task != "<unknown>":
            record.where = task
        elif flow and flow != "<unknown>":
            record.where = flow
        else:
            record.where = record.name
        return super().format(record)


class CurrentStderr(logging.StreamHandler):
    """A stream handler on the `sys.stderr` of the moment a record is emitted (a live display
    replaces it with a proxy for as long as it runs; a handler bound at start-up would write
    through the display)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it
        pass


def setup(level: int = logging.WARNING) -> None:
    """Log to stderr in this format: libraries from `level`, rft's own from INFO. Replaces the
    handlers already on the root logger (a second call is a no-op in effect)."""
    handler = CurrentStderr()
    handler.setFormatter(WhereFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, CurrentStderr):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("rft").setLevel(logging.INFO)
