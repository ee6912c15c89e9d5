r"""LaTeX math read by sympy in a worker process under a deadline: what `numeric_match` uses for
answers that are not plain numbers (`2^{10}`, `3 \times 10^{4}`, `\frac{\sqrt{3}}{2}`, `x^2+1`).

latex2sympy2_extended parses and math-verify compares (the reader open-r1 and TRL's accuracy
reward use), but sympy can compute for minutes on a short answer (`(x+y+z)^{99}` against another
polynomial) and nothing can interrupt it from another thread: math-verify's own timeout is
`signal.alarm`, which works only in the main thread and cancels other alarms (Prefect's task
timeouts). So sympy runs in one long-lived worker process (`_math_child.py`): each request has
`MATH_TIMEOUT_S` to answer, and a worker that does not is killed and replaced; its address space
is capped at `MEMORY_MB`. sympy is never imported in the calling process. Answers are cached by
text (refusals too, so that a slow answer costs its deadline once).

>>> read_math(r"2^{10}")
Reading(kind='number', value=1024.0, reason='')
>>> read_math(r"x^2 + 1").kind, math_equal("x^2+1", "1 + x^2")
('math', True)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).with_name("_math_child.py")
# Each request's deadline. Reading a number takes milliseconds; math-verify's symbolic checks
# take up to about a second on real answers (its own default timeout is 5 s).
MATH_TIMEOUT_S = 5.0
# Starting the worker imports sympy (about a second; more on a loaded machine).
STARTUP_TIMEOUT_S = 60.0
MEMORY_MB = 1024
_MAX_REPLY_BYTES = 1 << 16


class Reading(NamedTuple):
    """What a text is as math: `number` (with its finite value), `math` (readable, not one real
    number: `x^2+1`, `(1, 2)`, `2i`), `infinite` (a number too large for a float, or infinity),
    `unreadable` (does not parse as a whole), or `refused` (no answer within the deadline)."""

    kind: str
    value: float | None = None
    reason: str = ""


class MathWorkerError(RuntimeError):
    """The worker did not start or broke the protocol."""


class MathWorker:
    """One `_math_child.py` process; `ask(request, timeout_s)` returns its reply or raises TimeoutError."""

    def __init__(self, memory_mb: int = MEMORY_MB, startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.owner = os.getpid()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", str(CHILD_SCRIPT), str(memory_mb * 1024 * 1024)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                close_fds=True, start_new_session=True,  # Ctrl-C reaches the parent, which ends it
            )
        except OSError as exc:
            raise MathWorkerError(f"could not start the math reader process: {exc}") from None
        self._buffer = b""
        try:
            if not self._receive(time.monotonic() + startup_timeout_s).get("ok"):
                raise MathWorkerError("the math reader process did not start")
        except TimeoutError:
            self.kill()
            raise MathWorkerError(f"the math reader process did not start within {startup_timeout_s:g} s") from None
        except MathWorkerError:
            self.kill()
            raise

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        line = json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(line)
            self.process.stdin.flush()
        except OSError:
            raise MathWorkerError("the math reader process is gone") from None
        return self._receive(time.monotonic() + timeout_s)

    def _receive(self, deadline: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if not select.select([fd], [], [], remaining)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self.process.wait(timeout=2.0)
                raise MathWorkerError(f"the math reader process ended (exit status {code})")
            self._buffer += chunk
            if len(self._buffer) > _MAX_REPLY_BYTES:
                raise MathWorkerError("the math reader process broke the protocol")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            raise MathWorkerError("the math reader process broke the protocol") from None
        if not isinstance(reply, dict):
            raise MathWorkerError("the math reader process broke the protocol")
        return reply

    def kill(self) -> None:
        if self.owner != os.getpid():
            return  # inherited through a fork: the process belongs to the parent
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5.0)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


_lock = threading.Lock()
_worker: MathWorker | None = None


def _current_worker() -> MathWorker:
    """The live worker of this process, started on first use (a forked child starts its own)."""
    global _worker
    if _worker is None or _worker.owner != os.getpid() or not _worker.alive:
        if _worker is not None:
            _worker.kill()
        _worker = MathWorker()
    return _worker


def _ask(request: dict[str, Any]) -> dict[str, Any] | None:
    """The worker's reply, or None when it did not answer within MATH_TIMEOUT_S (it is replaced)."""
    global _worker
    with _lock:
        for attempt in range(2):
            worker = _current_worker()
            try:
                return worker.ask(request, MATH_TIMEOUT_S)
            except TimeoutError:
                worker.kill()
                _worker = None
                return None
            except MathWorkerError:
                worker.kill()  # died under us (killed from outside): one fresh try
                _worker = None
                if attempt:
                    raise
    return None


def stop_worker() -> None:
    """End the worker process (it also ends by itself with this process)."""
    global _worker
    with _lock:
        if _worker is not None:
            _worker.kill()
            _worker = None


atexit.register(stop_worker)


@functools.lru_cache(maxsize=8192)
def read_math(latex: str) -> Reading:
    """What `latex` is as math, read whole by latex2sympy (see Reading); cached by text."""
    reply = _ask({"read": latex})
    if reply is None:
        logger.warning("numeric_match: reading %.80r took longer than %g s; the answer is refused", latex,
                       MATH_TIMEOUT_S)
        return Reading("refused", reason=f"reading it took longer than {MATH_TIMEOUT_S:g} s")
    kind = reply.get("kind")
    if kind == "number" and isinstance(reply.get("value"), (int, float)):
        return Reading("number", float(reply["value"]))
    if kind in ("math", "infinite"):
        return Reading(kind)
    return Reading("unreadable", reason=str(reply.get("error", "")))


@functools.lru_cache(maxsize=8192)
def math_equal(gold: str, pred: str) -> bool:
    """math-verify's equivalence of two readable texts (symbolic, sets, intervals, equations);
    False when either does not parse or no answer came within the deadline."""
    reply = _ask({"equal": [gold, pred]})
    if reply is None:
        logger.warning("numeric_match: comparing %.80r with %.80r took longer than %g s; counted as not equal",
                       pred, gold, MATH_TIMEOUT_S)
        return False
    return reply.get("equal") is True
