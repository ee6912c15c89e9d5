"""Which failures a retry can cure: `transient(exc)`.

A connection refused or reset, a timeout, a server that asks to come back later, a locked sqlite
database may pass by themselves; the stages retry those (tasks/stages.py). A missing file, an
invalid value or a bug fails the same way every time: retrying it only delays the error.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

# MLflow's error codes for conditions that pass (its REST client raises these after its own retries).
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}


def transient(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a failure that may pass by itself: a
    connection refused or reset, a timeout, a server that asks to come back later, a locked
    sqlite database. Anything else (a missing file, an invalid value, a bug) fails the same way
    every time, and retrying it only delays the error."""
    for error in _chain(exc):
        if isinstance(error, ConnectionError | TimeoutError):
            return True
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
        name = type(error).__name__
        module = type(error).__module__
        if module.startswith(("requests", "urllib3", "httpx", "httpcore")) and any(
            word in name for word in ("Connection", "Timeout", "ConnectError", "ReadError", "Protocol")
        ):
            return True
        if name == "OperationalError" and "locked" in str(error).lower():
            return True
        if name == "MlflowException":
            if getattr(error, "error_code", None) in _TRANSIENT_MLFLOW_CODES:
                return True
            text = str(error)
            # Its REST client's words when a connection failed after its own retries.
            if "failed with exception" in text and any(w in text for w in ("Connection", "Max retries", "Timeout")):
                return True
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
