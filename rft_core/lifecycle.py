"""How a run stops, and which process owns what it leaves behind.

Stopping. A command wraps its work in `stop_on_signals()`. The first SIGINT (Ctrl-C) or SIGTERM
is a stop request: inside a training loop (`deferring_stops()`), the loop finishes its current
step, saves a checkpoint and raises `TrainingStopped`; anywhere else the signal interrupts at once
(`KeyboardInterrupt`), as Python's default does. A second signal always interrupts at once.
`TrainingStopped` is a `KeyboardInterrupt`, so everything that cleans up after an interrupt (the
MLflow runs are ended KILLED, the orchestrator records the crash) does so for a requested stop too.

Owners. A process that opens something meant to be closed (an MLflow run) records who it is
(`process_identity`: host, pid and the process's start time, which tells a reused pid apart); a
later process can then tell whether that owner is still alive (`owner_alive`) and close what a
killed one left open.

Children. `die_with_parent(command)` wraps a command so that Linux kills it when this process dies,
however it dies (`kill -9` included): the parent-death signal (prctl PR_SET_PDEATHSIG), set by a
small launcher that then execs the command (exec keeps the setting), so no code runs between fork
and exec in this possibly multi-threaded process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- stopping


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on request (Ctrl-C, SIGTERM) at a step boundary, after saving a checkpoint;
    rerunning the same command resumes from it."""

    def __init__(self, stage: str, step: int, total: int, checkpoint: str | Path | None):
        self.stage, self.step, self.total = stage, step, total
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        where = f"; checkpoint {self.checkpoint}" if self.checkpoint else ""
        super().__init__(f"{stage} stopped at step {step} of {total} on request{where}")

    def __str__(self) -> str:
        return str(self.args[0])


_requested: str | None = None  # the name of the signal that asked to stop
_deferring = 0  # how many training loops are running their steps (they honour a stop request)


def stop_requested() -> str | None:
    """The signal that asked this process to stop (e.g. "SIGINT"), or None."""
    return _requested


def request_stop(reason: str = "request") -> None:
    """Ask running training loops to stop at their next step boundary (what the first signal does)."""
    global _requested
    _requested = reason


def clear_stop_request() -> None:
    global _requested
    _requested = None


def _say(text: str) -> None:
    # os.write: nothing that takes a lock another frame of this thread may hold (logging, print).
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def _on_signal(signum: int, _frame: Any) -> None:
    name = signal.Signals(signum).name
    if _requested is None and _deferring > 0:
        request_stop(name)
        _say(
            f"\n{name}: stopping after the current training step, with a checkpoint "
            "(send it again to stop at once)\n"
        )
        return
    request_stop(name)
    raise KeyboardInterrupt(name)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """For the block, SIGINT and SIGTERM stop training at its next step boundary (see the module
    docstring); the previous handlers come back after. Only in the main thread (where Python runs
    signal handlers); elsewhere a no-op."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear_stop_request()


@contextlib.contextmanager
def deferring_stops() -> Iterator[None]:
    """A training loop's steps: inside, a stop request waits for the loop to reach a step
    boundary (`TrainingStopped`). A request that arrives after the loop's last check is honoured
    when the block ends."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _requested is not None:
        raise KeyboardInterrupt(_requested)


# --------------------------------------------------------------------------- owners


def _start_ticks(pid: int) -> str:
    """When process `pid` started (clock ticks after boot, from /proc), "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22; the command name (field 2) is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def process_identity(pid: int | None = None) -> dict[str, str]:
    """Who a process is, durably: host, pid, start time (a later process with the same pid has
    another start time)."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": str(pid), "started": _start_ticks(pid)}


def owner_alive(identity: dict[str, str]) -> bool | None:
    """Whether the process `identity` describes is still running: None when that cannot be known
    from here (another host, or no identity)."""
    if identity.get("host") != socket.gethostname() or not identity.get("pid", "").isdigit():
        return None
    pid = int(identity["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = identity.get("started")
    return not started or _start_ticks(pid) in ("", started)


# --------------------------------------------------------------------------- children

_PR_SET_PDEATHSIG = 1

# Runs as `python -c <this> SIGNAL PARENT_PID COMMAND...`: asks for SIGNAL when the parent dies,
# gives up if the parent already died (the request would never fire), then becomes COMMAND.
_LAUNCHER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, int(sys.argv[1]), 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
if os.getppid() != int(sys.argv[2]):
    sys.exit(1)
os.execvp(sys.argv[3], sys.argv[3:])
"""


def die_with_parent(command: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """`command`, made to receive `sig` when the process that starts it dies (Linux). Start it from
    the main thread: Linux sends the signal when the starting *thread* ends. Elsewhere (macOS) the
    command as it is: the caller must stop it itself."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _LAUNCHER, str(int(sig)), str(os.getpid()), *command]
