"""The Prefect API a command runs its flows against: the configured one, else a temporary server
the command starts, owns and stops.

Prefect's client starts a temporary server by itself when no API is configured, but as a plain
child in the command's process group: Ctrl-C in the terminal kills it along with the command, before
the flow has reported how it ended (every Prefect call then retries a refused connection, for
minutes), and `kill -9` of the command leaves it running. The server started here instead runs in
a session of its own (a terminal's Ctrl-C does not reach it), is sent SIGTERM by Linux when the
command dies however it dies (`lifecycle.die_with_parent`), and is stopped by the command itself
last: after the flow has ended, its runs are closed and Prefect's log and event queues are drained.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rft_core.lifecycle import die_with_parent

logger = logging.getLogger("rft.prefect")

# The slowest start seen on a loaded 2-core machine was about 45 s (Prefect's own default wait is 20).
MIN_STARTUP_S = 120.0
_PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind


class ServerError(RuntimeError):
    """The temporary Prefect server could not be started; the message says why."""


def configured_api_url() -> str | None:
    """The Prefect API this environment names (PREFECT_API_URL, or the active profile's), or None."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    """Whether a Prefect API answers at `api_url` (any HTTP answer counts)."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TemporaryServer:
    process: subprocess.Popen[bytes]
    api_url: str
    log: Path  # the server's stderr, shown when it fails


def _launch(port: int, log: Path) -> subprocess.Popen[bytes]:
    """The same server Prefect's client would start (uvicorn on Prefect's app, no UI), but in its
    own session and bound to this process's life."""
    import prefect
    from prefect.settings import get_current_settings

    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    with open(log, "wb") as err:
        return subprocess.Popen(
            die_with_parent(command), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=err, start_new_session=True,
        )


def start_temporary_server(timeout_s: float | None = None) -> TemporaryServer:
    """Start a temporary Prefect server on a free port of 127.0.0.1 and wait until it answers
    (`timeout_s`: at least MIN_STARTUP_S, or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS when
    larger). Call from the main thread (see `die_with_parent`)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    timeout_s = timeout_s or max(MIN_STARTUP_S, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    log = Path(tempfile.mkstemp(prefix="rft-prefect-server-", suffix=".log")[1])
    deadline = time.monotonic() + timeout_s
    for _ in range(5):
        port = _free_port()
        server = TemporaryServer(_launch(port, log), f"http://127.0.0.1:{port}/api", log)
        while not healthy(server.api_url):
            code = server.process.poll()
            if code is not None:
                break
            if time.monotonic() > deadline:
                stop_server(server)
                raise ServerError(f"the temporary Prefect server did not answer within {timeout_s:.0f} s{_tail(log)}")
            time.sleep(0.2)
        else:
            return server
        if code != _PORT_IN_USE:  # another process took the port between our check and its bind: retry
            raise ServerError(f"the temporary Prefect server exited with code {code}{_tail(log)}")
    raise ServerError(f"the temporary Prefect server found no free port{_tail(log)}")


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return (": " + " | ".join(text)) if text else ""


def stop_server(server: TemporaryServer, grace_s: float = 10.0) -> None:
    """SIGTERM to the server's session, SIGKILL after `grace_s`; its log file removed."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(server.process.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(OSError):
        server.log.unlink()


def drain_prefect_queues(timeout_s: float = 5.0) -> None:
    """Send what Prefect still holds in memory (logs, events) to the API, while it is up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API for the block: the configured one, else a temporary server owned by this
    process (see the module docstring) that is stopped when the block ends."""
    url = configured_api_url()
    if url:
        yield url
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    logger.info("starting a temporary Prefect server (it stops with this command)")
    server = start_temporary_server()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                drain_prefect_queues()
    finally:
        stop_server(server)
