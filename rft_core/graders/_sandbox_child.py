"""The worker process behind the python grader: runs user `grade(sample, item)` calls.

Started by `python_grader.SandboxWorker` as `python -I _sandbox_child.py SETTINGS_JSON`; it
imports nothing from the rft package (the sandbox module is loaded by its file path). Before any
user code runs it moves the protocol to private file descriptors (user `print` goes to stderr,
user `input()` reads an empty stdin, so user code does not corrupt the protocol by accident), then,
by `mode`:

- `namespaces`: enters the kernel sandbox (`sandbox.enter`: new user, mount, network, PID and IPC
  namespaces, read-only root, scratch /tmp, no capabilities, seccomp, rlimits). After each call
  it kills every process the call left behind (`sandbox.end_call`).
- `none` (the explicit opt-out, a guard against mistakes, not isolation): caps its address space,
  starts a watchdog thread that exits when the parent process is gone, and installs an audit hook
  (hooks cannot be removed) that refuses sockets and name lookups, starting processes, signalling
  other processes, changing resource limits, loading native code through ctypes, and rebinding
  the hook's own code.

Protocol: one JSON object per line. The child first writes `{"ready": true}` once it is isolated
(before any user code), or `{"ok": false, "unavailable": ...}` when the kernel refused to isolate
it, and exits. Then the parent sends `{"source": ...}` (from here the grader's time limit runs:
module-level code such as imports counts against it); the child answers `{"ok": true}` once
`grade` is defined, or `{"ok": false, "error": ...}` when the source does not load, and exits.
Then, per call, the parent sends `{"sample": ..., "item": ...}` and the child answers
`{"ok": true, "value": float, "cpu": s}` or `{"ok": false, "error": ..., "cpu": s}`, where `cpu` is
the worker's CPU time so far (the parent replaces a worker well before its CPU limit). Range checks
happen in the parent.
"""

import importlib.util
import json
import numbers
import os
import resource
import sys
import threading
import time
import traceback

# Audit events refused inside the sandbox. Sockets and DNS: no network. Processes: a child
# process would not carry the audit hook. ctypes: native calls could bypass everything.
_BLOCKED_EVENTS = frozenset(
    {
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
        "socket.sethostname",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.startfile", "pty.spawn",
        "os.kill", "os.killpg", "signal.pthread_kill",
        "resource.setrlimit", "resource.prlimit",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function",
        "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.addressof", "ctypes.string_at",
        "ctypes.wstring_at", "ctypes.set_errno",
    }
)


def _install_audit_hook():
    blocked = _BLOCKED_EVENTS

    def hook(event, args, _blocked=blocked):
        if event in _blocked:
            raise PermissionError(f"{event} is not allowed in the python grader sandbox")
        # Rebinding the hook's code or defaults would disarm it.
        if event == "object.__setattr__" and args and args[0] is hook:
            raise PermissionError("the sandbox audit hook cannot be modified")

    sys.addaudithook(hook)


def _exit_with_parent(parent_pid):
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(0)


def _start_watchdog():
    threading.stack_size(256 * 1024)  # the thread's stack counts against the memory limit
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    threading.stack_size(0)


def _send(channel, message):
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def _load_sandbox():
    # By path, under a private name: `import sandbox` in a grader must not find this module.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox.py")
    spec = importlib.util.spec_from_file_location("_rft_grader_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _guard_without_isolation(memory_bytes):
    """The `none` mode: limits and an audit hook, in this process only."""
    _start_watchdog()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # numpy imports ctypes (which dlopens libpython) at import time: import it while allowed.
    import ctypes  # noqa: F401

    _install_audit_hook()


def _cpu_seconds():
    times = os.times()
    return times.user + times.system


def _describe(exc, memory_bytes):
    if isinstance(exc, MemoryError):
        return f"MemoryError: memory limit of {memory_bytes // (1024 * 1024)} MiB exceeded"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<grader>"]
    where = f" (line {frames[-1].lineno} of the grader source)" if frames else ""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return f"{text}{where}"


def _as_number(value):
    # Booleans and numpy scalars are numbers (NaN and infinities travel as JSON NaN/Infinity
    # and fail the parent's range check); anything else is reported as it is.
    if isinstance(value, numbers.Real):
        return {"ok": True, "value": float(value)}
    return {"ok": False, "error": f"grade() returned {type(value).__name__} {value!r:.80}, not a number"}


def main():
    settings = json.loads(sys.argv[1])
    memory_bytes = settings["memory_bytes"]
    # Private protocol channels; fds 0 and 1 become /dev/null and stderr for user code.
    proto_in_fd, proto_out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)

    end_call = None
    if settings["mode"] == "namespaces":
        sandbox = _load_sandbox()
        try:
            sandbox.enter(memory_bytes=memory_bytes, max_processes=settings["max_processes"],
                          cpu_s=settings["cpu_s"], protocol_fds=(proto_in_fd, proto_out_fd))
        except OSError as exc:  # a refused step, in whichever process of the two it happened
            reason = exc.strerror if isinstance(exc, sandbox.IsolationUnavailable) else str(exc)
            with os.fdopen(proto_out_fd, "w", encoding="utf-8") as channel:
                _send(channel, {"ok": False, "unavailable": reason})
            return
        end_call = sandbox.end_call
    else:
        _guard_without_isolation(memory_bytes)
    worker_pid = os.getpid()
    proto_in = os.fdopen(proto_in_fd, "r", encoding="utf-8")
    proto_out = os.fdopen(proto_out_fd, "w", encoding="utf-8")
    _send(proto_out, {"ready": True})

    first = json.loads(proto_in.readline() or "{}")
    namespace = {"__name__": "grader"}
    try:
        exec(compile(first.get("source", ""), "<grader>", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            raise NameError("the source does not define a function grade(sample, item)")
    except BaseException as exc:  # noqa: BLE001 - report whatever the source raised
        if os.getpid() != worker_pid:
            os._exit(0)  # a process the source forked: only the worker speaks the protocol
        _send(proto_out, {"ok": False, "error": _describe(exc, memory_bytes)})
        return
    if os.getpid() != worker_pid:
        os._exit(0)
    if end_call is not None:
        end_call()
    _send(proto_out, {"ok": True})

    for line in proto_in:
        request = json.loads(line)
        try:
            reply = _as_number(grade(request["sample"], request["item"]))
        except BaseException as exc:  # noqa: BLE001 - SystemExit and friends are grader errors too
            reply = {"ok": False, "error": _describe(exc, memory_bytes)}
        del request
        if os.getpid() != worker_pid:
            os._exit(0)
        if end_call is not None:
            end_call()
        reply["cpu"] = _cpu_seconds()
        try:
            _send(proto_out, reply)
        except MemoryError:
            _send(proto_out, {"ok": False, "error": _describe(MemoryError(), memory_bytes), "cpu": _cpu_seconds()})


if __name__ == "__main__":
    main()
