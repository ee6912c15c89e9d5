"""The `python` grader: user `source` defining `grade(sample, item) -> float`, run in a sandbox.

User code never runs in the training process. Each call goes to a worker process
(`_sandbox_child.py`) that, by default (`sandbox="namespaces"`), isolated itself with the
kernel before loading the source (`sandbox.py`: user, mount, network, PID and IPC namespaces, `/`
read-only, a fresh /proc, a private scratch /tmp, no capabilities, seccomp, rlimits), for the
grader and every process it starts.

The limits: `timeout_s` of wall time per call, end to end: the worker and every process in its
namespace are killed at the deadline, and loading the source in a new worker (its imports and
other module-level code) counts against the call that needed it. The first worker loads at build
time, so a source that does not load within `timeout_s` is a spec error there; once it takes
longer in a replacement worker, every later call fails at once with that reason instead of
spending `timeout_s` each. Also `memory_mb` of address space per process (RLIMIT_AS; the scratch
/tmp holds as much again), `MAX_PROCESSES` processes and threads, and `cpu_limit_s(timeout_s)` CPU
seconds per process (a worker is replaced before it reaches half of it). Starting and isolating a
worker, before any user code runs, has its own bound (STARTUP_TIMEOUT_S). A call that times out,
runs out of memory or processes, is refused by the kernel, raises, or returns something that is
not a number in [0, 1] gives an error result with the reason; a worker that timed out or died is
killed and replaced on the next call, so grading goes on. A worker exits by itself when the
training process dies.

Where the kernel will not isolate (no unprivileged user namespaces, not Linux), building the
grader fails with `SandboxUnavailable`, whose message names the fix, unless `sandbox="none"`:
the explicit opt-out that runs the worker with only a memory limit and an audit hook (a guard
against mistakes, not against hostile code), and logs `sandbox_warning` on every build.

Workers form a pool that grows to the number of concurrent callers: `grade_batch(...,
workers=4)` drives four worker processes from four threads; each is started (and isolated) once
and then reused for every call it serves.

>>> source = "def grade(sample, item):\\n    return float(sample['output_text'] == item['answer'])"
>>> with PythonGrader({"type": "python", "name": "exact", "source": source}) as grader:
...     grader.grade("42", {"answer": "42"}).reward
1.0
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rft_core.graders.base import Grader, GraderError, GraderSpecError, field_problems, spec_label
from rft_core.graders.sandbox import (
    SANDBOX_ENV,
    SANDBOX_MODES,
    platform_problem,
    sandbox_warning,
    unavailable_message,
)

logger = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).with_name("_sandbox_child.py")
STARTUP_TIMEOUT_S = 30.0
# Processes and threads in one sandbox (RLIMIT_NPROC): enough for a grader's subprocess or small
# pool, few enough that a fork bomb ends as an error; memory is per process, so this also bounds
# a sandbox's memory to MAX_PROCESSES x memory_mb.
MAX_PROCESSES = 32
# A reply longer than this is a broken worker, not a score: the pipeline must not buffer without end.
MAX_REPLY_BYTES = 1 << 20
# OpenAI's limit on a python grader's source.
MAX_SOURCE_BYTES = 256 * 1024


def cpu_limit_s(timeout_s: float) -> int:
    """CPU seconds each sandboxed process may use (RLIMIT_CPU): ample for many calls, and a bound
    on anything a grader leaves running."""
    return max(60, math.ceil(10 * timeout_s))


def check_spec(spec: Mapping[str, Any]) -> list[str]:
    """Problems of a python spec: the source must parse and define `grade(sample, item)` at top level.

    Nothing is executed; the source is only parsed.
    """
    problems = field_problems(spec, {"source": str}, {"image_tag": str})
    label = spec_label(spec)
    source = spec.get("source")
    if not isinstance(source, str):
        return problems
    size = len(source.encode("utf-8", errors="replace"))
    if size > MAX_SOURCE_BYTES:
        return [*problems, f"{label}: source is {size} bytes, over the limit of {MAX_SOURCE_BYTES} (OpenAI's)"]
    try:
        tree = ast.parse(source, filename="<grader>")
    except SyntaxError as exc:
        return [*problems, f"{label}: source does not parse: {exc.msg} (line {exc.lineno})"]
    except (RecursionError, MemoryError, ValueError) as exc:  # `-` * 100000, `a+a+...`, NUL bytes
        reason = "a null byte" if isinstance(exc, ValueError) else "expressions nested too deeply for Python's parser"
        return [*problems, f"{label}: source does not parse: {reason}"]
    definition = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "grade":
            definition = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom)):
            targets = _bound_names(node)
            if "grade" in targets:
                definition = node
    if definition is None:
        problems.append(f"{label}: source does not define grade(sample, item) at top level")
    elif isinstance(definition, ast.AsyncFunctionDef):
        problems.append(f"{label}: grade must be a plain function, not async")
    elif isinstance(definition, ast.FunctionDef):
        args = definition.args
        positional = len(args.posonlyargs) + len(args.args)
        required = positional - len(args.defaults)
        if (args.vararg is None and positional < 2) or required > 2:
            problems.append(f"{label}: grade must take two arguments (sample, item), it takes {positional}")
    return problems


def _bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign):
        return {node.target.id} if isinstance(node.target, ast.Name) else set()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return set()


class SandboxUnavailable(GraderSpecError):
    """Python graders cannot run here: the kernel would not isolate them (the message says the fix)."""


class WorkerDied(GraderError):
    """The worker process ended or broke the protocol; it must be replaced."""


class WorkerTimeout(GraderError):
    """The worker did not answer in time; it must be killed and replaced."""


class SourceLoadTimeout(WorkerTimeout):
    """The grader source (its module-level code: imports, set-up) did not load within the time limit."""


def load_timeout_message(timeout_s: float) -> str:
    return (f"timed out after {timeout_s:g} s loading the grader source (its module-level code, imports "
            "included, counts against the time limit grader.timeout_s)")


class SandboxWorker:
    """One worker process with `source` loaded; `call(sample, item)` returns grade()'s value.

    Starting the process and isolating it may take `startup_timeout_s` (no user code runs yet);
    loading the source then has `load_timeout_s` (SourceLoadTimeout past it), and `load_s` is
    the time it took. `retire` turns True when the worker should be replaced after the call that
    set it (its CPU time nears the limit, or it wrote more than one answer).
    """

    def __init__(
        self, source: str, *, memory_mb: int, mode: str = "namespaces", cpu_s: int = 60,
        load_timeout_s: float | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ):
        self.memory_mb = memory_mb
        self.mode = mode
        self.cpu_s = cpu_s
        self.retire = False
        settings = {"mode": mode, "memory_bytes": memory_mb * 1024 * 1024, "max_processes": MAX_PROCESSES,
                    "cpu_s": cpu_s}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", str(CHILD_SCRIPT), json.dumps(settings)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=dict(SANDBOX_ENV),  # nothing from the pipeline's environment
                close_fds=True,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the parent, which cleans up
            )
        except OSError as exc:
            raise WorkerDied(f"could not start the sandbox process: {exc}") from None
        self._buffer = b""
        try:
            ready = self._receive(time.monotonic() + startup_timeout_s)
        except GraderError:
            self.kill()
            raise
        if not ready.get("ready"):
            self.kill()
            if "unavailable" in ready:
                raise SandboxUnavailable(unavailable_message(str(ready["unavailable"])))
            raise WorkerDied("the worker broke the protocol")
        started = time.monotonic()
        limit = startup_timeout_s if load_timeout_s is None else load_timeout_s
        try:
            self._send({"source": source})
            reply = self._receive(started + limit)
        except WorkerTimeout:
            self.kill()
            raise SourceLoadTimeout(load_timeout_message(limit)) from None
        except GraderError:
            self.kill()
            raise
        self.load_s = time.monotonic() - started
        if not reply.get("ok"):
            self.kill()
            raise GraderSpecError(f"the grader source failed to load: {reply.get('error')}")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def call(
        self, sample: Mapping[str, Any], item: Mapping[str, Any], timeout_s: float, limit_s: float | None = None
    ) -> Any:
        """grade()'s value within `timeout_s` (the rest of the call's time limit `limit_s`, which
        the timeout message names)."""
        self._send({"sample": sample, "item": item})
        reply = self._receive(time.monotonic() + timeout_s, timeout_s=timeout_s if limit_s is None else limit_s)
        cpu = reply.get("cpu")
        if self._buffer or not isinstance(cpu, (int, float)) or cpu > self.cpu_s / 2:
            self.retire = True
        if not reply.get("ok"):
            raise GraderError(str(reply.get("error")))
        return reply.get("value")

    def _send(self, message: Mapping[str, Any]) -> None:
        line = json.dumps(message, default=_jsonable, ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(line)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied(self._death_reason()) from None

    def _receive(self, deadline: float, timeout_s: float | None = None) -> dict[str, Any]:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout(f"timed out after {timeout_s:g} s" if timeout_s else "worker did not start")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise WorkerDied(self._death_reason())
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES and b"\n" not in self._buffer:
                raise WorkerDied("the worker broke the protocol (an answer longer than 1 MiB)")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            raise WorkerDied("the worker broke the protocol (wrote to its protocol channel)") from None
        if not isinstance(reply, dict):
            raise WorkerDied("the worker broke the protocol")
        return reply

    def _death_reason(self) -> str:
        try:
            code = self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return "the worker process stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            if self.mode == "none":
                return f"the worker process was killed by {name} (memory limit {self.memory_mb} MiB?)"
            return (f"the worker process was killed by {name} "
                    f"(limits: {self.memory_mb} MiB of memory, {self.cpu_s} s of CPU per process)")
        return f"the worker process exited with code {code}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5.0)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _jsonable(value: Any) -> Any:
    """JSON for values data frames put in items: numpy scalars and arrays, then anything as str."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    return str(value)


def _kill_all(workers: set[SandboxWorker]) -> None:
    for worker in list(workers):
        worker.kill()
    workers.clear()


class PythonGrader(Grader):
    """OpenAI's python grader: `source` defining `grade(sample, item)`; `image_tag` is accepted and
    ignored (the sandbox uses this interpreter and its installed packages).

    `sandbox` is "namespaces" (kernel isolation; SandboxUnavailable where there is none) or
    "none" (no isolation, on explicit request only; warned about on every build).
    """

    type = "python"
    concurrent = True

    def __init__(
        self, spec: Mapping[str, Any], *, timeout_s: float = 10.0, memory_mb: int = 1024, sandbox: str = "namespaces",
    ):
        super().__init__(spec)
        self.source: str = spec["source"]
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        if sandbox not in SANDBOX_MODES:
            raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}, got {sandbox!r}")
        self.sandbox = sandbox
        problem = platform_problem() if sandbox == "namespaces" else None
        if problem:
            raise SandboxUnavailable(problem)
        warning = sandbox_warning(sandbox)
        if warning:
            logger.warning(warning)
        self._lock = threading.Lock()
        self._idle: list[SandboxWorker] = []
        self._workers: set[SandboxWorker] = set()
        self._closed = False
        # Set when the source once took longer than timeout_s to load in a new worker: every later
        # call fails at once with it, rather than spending timeout_s on each.
        self._load_failure: str | None = None
        # Kill the processes even if close() is never called.
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        # Start one worker now so that a source that fails to load, or loads too slowly, is a spec
        # error at build time.
        try:
            self._release(self._spawn())
        except SandboxUnavailable:
            raise
        except SourceLoadTimeout:
            raise GraderSpecError(
                f"python {self.name!r}: the grader source did not load within the {self.timeout_s:g} s time limit "
                "(grader.timeout_s, --timeout-s): its module-level code (imports, set-up) counts against it; "
                "make that faster or raise the limit"
            ) from None
        except GraderSpecError as exc:
            raise GraderSpecError(f"python {self.name!r}: {exc}") from None
        except GraderError as exc:
            raise GraderSpecError(f"python {self.name!r}: the sandbox process did not start: {exc}") from None

    @property
    def worker_count(self) -> int:
        """Live worker processes (idle or busy)."""
        with self._lock:
            return sum(1 for worker in self._workers if worker.alive)

    def _spawn(self) -> SandboxWorker:
        worker = SandboxWorker(self.source, memory_mb=self.memory_mb, mode=self.sandbox,
                               cpu_s=cpu_limit_s(self.timeout_s), load_timeout_s=self.timeout_s)
        with self._lock:
            self._workers.add(worker)
        return worker

    def _acquire(self) -> tuple[SandboxWorker, float]:
        """A worker with the source loaded, and the seconds of this call's time limit its loading took."""
        with self._lock:
            if self._closed:
                raise GraderError("the grader is closed")
            if self._load_failure:
                raise GraderError(self._load_failure)
            while self._idle:
                worker = self._idle.pop()
                if worker.alive:
                    return worker, 0.0
                self._workers.discard(worker)
        try:
            worker = self._spawn()
        except SourceLoadTimeout as exc:
            with self._lock:
                self._load_failure = (
                    f"the grader source took longer than the {self.timeout_s:g} s time limit to load in a new worker "
                    "(grader.timeout_s counts its module-level code: imports, set-up); not loading it again: "
                    "make that faster or raise the limit"
                )
            raise GraderError(str(exc)) from None
        except GraderSpecError as exc:  # the source loaded before; now it does not (e.g. memory)
            raise GraderError(str(exc)) from None
        return worker, worker.load_s

    def _release(self, worker: SandboxWorker) -> None:
        with self._lock:
            if self._closed:
                worker.kill()
            else:
                self._idle.append(worker)

    def _discard(self, worker: SandboxWorker) -> None:
        worker.kill()
        with self._lock:
            self._workers.discard(worker)

    def score(self, context: dict[str, Any]) -> float:
        # One time limit per call, end to end: loading the source in a new worker counts too.
        worker, loading_s = self._acquire()
        try:
            return worker.call(context["sample"], context["item"], max(self.timeout_s - loading_s, 0.0),
                               limit_s=self.timeout_s)
        except (WorkerTimeout, WorkerDied):
            worker.retire = True  # the next call starts a fresh process
            raise
        finally:
            if worker.retire:
                self._discard(worker)
            else:
                self._release(worker)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._idle.clear()
            workers = set(self._workers)
        for worker in workers:
            worker.kill()
        with self._lock:
            self._workers.clear()
