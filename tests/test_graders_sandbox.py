"""The python grader's sandbox: real escape attempts, limits, worker replacement, parallel pool.

Every attack runs real grader code in a real worker and asserts what it reached; after each,
the next call of the same grader still works. Where this machine would not isolate (no user
namespaces), the attack tests are skipped with the refusal's reason and
`test_without_isolation_python_graders_are_refused_with_the_fix` checks the refusal instead.
Controls run the same attack with `sandbox="none"` to show that it is real.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rft_core.graders import GraderSpecError, build_grader, grade_batch, summarize, validate_grader_spec
from rft_core.graders.python_grader import (
    MAX_PROCESSES,
    PythonGrader,
    SandboxUnavailable,
    SandboxWorker,
    WorkerDied,
    cpu_limit_s,
)
from rft_core.graders.sandbox import SANDBOX_ENV, platform_problem, sandbox_warning

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-rft-test-4f1d"


def python_spec(body: str, name: str = "py") -> dict:
    return {"type": "python", "name": name, "source": body}


@pytest.fixture(scope="module")
def isolation() -> None:
    """Skip (with the refusal as the reason) where this machine will not isolate python graders."""
    try:
        build_grader(python_spec("def grade(sample, item):\n    return 1.0\n")).close()
    except SandboxUnavailable as exc:
        pytest.skip(f"no isolation on this machine, the refusal is tested instead: {exc}")


@pytest.fixture
def make_grader(isolation):
    built = []

    def make(source: str, **limits):
        grader = build_grader(python_spec(source), **{"timeout_s": 2.0, "memory_mb": 512, **limits})
        built.append(grader)
        return grader

    yield make
    for grader in built:
        grader.close()


@pytest.fixture
def make_unisolated():
    built = []

    def make(source: str, **limits):
        grader = PythonGrader(python_spec(source), sandbox="none", **{"timeout_s": 2.0, "memory_mb": 512, **limits})
        built.append(grader)
        return grader

    yield make
    for grader in built:
        grader.close()


class Listener:
    """A TCP listener on loopback; `connected()` says whether anybody completed a connection."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]

    def connected(self) -> bool:
        self.server.setblocking(False)  # a completed handshake waits in the backlog
        try:
            self.server.accept()[0].close()
        except BlockingIOError:
            return False
        return True


@pytest.fixture
def listener():
    listening = Listener()
    yield listening
    listening.server.close()


def still_works(grader) -> None:
    """The grader's next call scores normally (whatever the previous call did)."""
    result = grader.grade("fine", {"fine": True})
    assert result.errors == [] and result.reward is not None, result


# ----------------------------------------------------------------------------- refusal, modes

def _refusal_in_a_namespace_without_nested_user_namespaces() -> str:
    """Build a python grader in a process whose user namespace allows no nested one (the state of
    a machine with user namespaces disabled) and return what happened."""
    script = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "uid, gid = os.geteuid(), os.getegid()\n"
        "assert libc.unshare(0x10000000) == 0, os.strerror(ctypes.get_errno())\n"
        "open('/proc/self/setgroups', 'w').write('deny')\n"
        "open('/proc/self/uid_map', 'w').write(f'{uid} {uid} 1')\n"
        "open('/proc/self/gid_map', 'w').write(f'{gid} {gid} 1')\n"
        "open('/proc/sys/user/max_user_namespaces', 'w').write('0')\n"
        "from rft_core.graders import build_grader\n"
        "from rft_core.graders.python_grader import PythonGrader, SandboxUnavailable\n"
        "spec = {'type': 'python', 'source': 'def grade(s, i):\\n    return 0.5\\n'}\n"
        "try:\n"
        "    build_grader(spec)\n"
        "    print('BUILT')\n"
        "except SandboxUnavailable as exc:\n"
        "    print('REFUSED', exc)\n"
        "with PythonGrader(spec, sandbox='none') as grader:\n"
        "    print('NONE', grader.grade('x', {}).reward)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_without_isolation_python_graders_are_refused_with_the_fix():
    spec = python_spec("def grade(sample, item):\n    return 1.0\n")
    try:
        build_grader(spec).close()
    except SandboxUnavailable as exc:  # this machine has no user namespaces: the refusal itself
        message = str(exc)
    else:  # make a machine without them: a user namespace that allows no nested one
        output = _refusal_in_a_namespace_without_nested_user_namespaces()
        assert "BUILT" not in output
        assert "NONE 0.5" in output  # the explicit opt-out still grades
        message = output.split("REFUSED ", 1)[1]
    assert message.startswith("python graders need a sandbox and this machine would not create one (unshare")
    assert "user.max_user_namespaces" in message and "grader.sandbox: none" in message
    assert isinstance(SandboxUnavailable(message), GraderSpecError)  # the CLI reports it like a spec problem


def test_other_platforms_are_refused_with_the_fix(monkeypatch):
    assert platform_problem() is None if sys.platform.startswith("linux") else platform_problem()
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(SandboxUnavailable, match=r"isolated with Linux namespaces.*grader.sandbox: none"):
        PythonGrader(python_spec("def grade(sample, item):\n    return 1.0\n"))


def test_sandbox_none_is_warned_about_on_every_build_and_tagged(caplog, make_unisolated):
    with caplog.at_level(logging.WARNING, logger="rft_core.graders.python_grader"):
        make_unisolated("def grade(sample, item):\n    return 1.0\n")
        grader = make_unisolated("def grade(sample, item):\n    return 0.5\n")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [sandbox_warning("none")] * 2
    assert "WITHOUT isolation" in warnings[0]
    assert grader.grade("x", {}).reward == 0.5
    assert sandbox_warning("namespaces") is None
    with pytest.raises(ValueError, match="sandbox must be one of namespaces, none"):
        PythonGrader(python_spec("def grade(sample, item):\n    return 1.0\n"), sandbox="off")


# ----------------------------------------------------------------------------- escape attempts

# `_posixsubprocess.fork_exec` starts a process without any audit event; its arguments changed
# in 3.11 (process group, vfork) and 3.13 (vfork gone).
FORK_EXEC_SHELL = """
import os, sys, _posixsubprocess

def grade(sample, item):
    if item.get("fine"):
        return 1.0
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    script = f"echo ran; exec 3<>/dev/tcp/127.0.0.1/{item['port']} && echo connected"
    head = ([b"/bin/bash", b"-c", script.encode()], [b"/bin/bash"], True, (), None, None,
            -1, -1, -1, out_write, -1, -1, err_read, err_write, False, False)
    version = sys.version_info[:2]
    if version < (3, 11):
        tail = (None, None, None, -1, None)
    elif version < (3, 13):
        tail = (-1, None, None, None, -1, None, True)
    else:
        tail = (-1, None, None, None, -1, None)
    pid = _posixsubprocess.fork_exec(*head, *tail)
    os.close(out_write)
    os.close(err_write)
    output = b""
    while chunk := os.read(out_read, 1024):
        output += chunk
    os.waitpid(pid, 0)
    if b"ran" not in output:
        raise RuntimeError(f"the shell did not run: {output!r}")
    return 1.0 if b"connected" in output else 0.0
"""


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="needs /bin/bash")
def test_a_shell_started_through_fork_exec_cannot_reach_a_loopback_listener(make_grader, listener):
    grader = make_grader(FORK_EXEC_SHELL)
    assert grader.grade("x", {"port": listener.port}).to_dict() == {"reward": 0.0, "sub_rewards": {}, "errors": []}
    assert not listener.connected()
    still_works(grader)


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="needs /bin/bash")
def test_control_without_isolation_the_fork_exec_shell_connects(make_unisolated, listener):
    assert make_unisolated(FORK_EXEC_SHELL).grade("x", {"port": listener.port}).reward == 1.0
    assert listener.connected()


def test_sockets_reach_nothing_not_even_loopback(make_grader, listener):
    grader = make_grader(
        "import socket, urllib.request\n"
        "def grade(sample, item):\n"
        "    if item.get('fine'):\n"
        "        return 1.0\n"
        "    if item.get('dns'):\n"
        "        urllib.request.urlopen('http://example.com', timeout=2)\n"
        "    socket.create_connection(('127.0.0.1', item['port']), timeout=2)\n"
        "    return 1.0\n"
    )
    tcp = grader.grade("x", {"port": listener.port})
    dns = grader.grade("x", {"dns": True, "port": listener.port})
    assert tcp.reward is None and "OSError: [Errno 101] Network is unreachable" in tcp.errors[0]
    assert dns.reward is None and "URLError" in dns.errors[0]
    assert not listener.connected()
    still_works(grader)


def test_unix_sockets_of_the_host_cannot_be_connected_to(make_grader, tmp_path):
    path = tmp_path / "service.sock"  # like a Docker or database socket the pipeline's user may reach
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    server.setblocking(False)
    grader = make_grader(
        "import socket\n"
        "def grade(sample, item):\n"
        "    if item.get('fine'):\n"
        "        return 1.0\n"
        "    socket.socket(socket.AF_UNIX).connect(item['path'])\n"
        "    return 1.0\n"
    )
    try:
        result = grader.grade("x", {"path": str(path)})
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    assert result.reward is None and "Errno 1] Operation not permitted" in result.errors[0]
    still_works(grader)


ENVIRON_SPY = """
import os

def grade(sample, item):
    if sample["output_text"] == "who":
        return len([p for p in os.listdir("/proc") if p.isdigit()]) / 100
    visible = [p for p in os.listdir("/proc") if p.isdigit()]
    found = []
    for pid in {str(item["pid"]), str(os.getppid()), *visible}:
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                if item["secret"].encode() in file.read():
                    found.append(pid)
        except OSError:
            pass
    return 1.0 if found else 0.0
"""

PIPELINE = """
import json, os, sys
from rft_core.graders.python_grader import PythonGrader
spec = {"type": "python", "name": "spy", "source": sys.argv[1]}
with PythonGrader(spec, sandbox=sys.argv[2]) as grader:
    item = {"pid": os.getpid(), "secret": sys.argv[3]}
    print(json.dumps([grader.grade("spy", item).to_dict(), grader.grade("who", item).to_dict()]))
"""


def run_pipeline_with_a_secret(source: str, sandbox: str) -> list[dict]:
    """Grade in a separate 'pipeline' process whose environment, from its start, holds a secret."""
    env = {**os.environ, "RFT_TEST_SECRET": SECRET}
    done = subprocess.run([sys.executable, "-c", PIPELINE, source, sandbox, SECRET], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_no_process_environment_of_the_pipeline_is_visible(isolation):
    spy, who = run_pipeline_with_a_secret(ENVIRON_SPY, "namespaces")
    assert spy == {"reward": 0.0, "sub_rewards": {}, "errors": []}
    assert who["reward"] == 0.01  # the grader's process is the only one it sees


def test_control_without_isolation_the_parent_environment_leaks():
    spy, _ = run_pipeline_with_a_secret(ENVIRON_SPY, "none")
    assert spy["reward"] == 1.0


def test_the_environment_inside_is_the_fixed_sandbox_one(make_grader, monkeypatch):
    monkeypatch.setenv("RFT_TEST_SECRET", SECRET)
    grader = make_grader(
        "import json, os\n"
        "def grade(sample, item):\n"
        "    if item.get('fine'):\n"
        "        return 1.0\n"
        "    raise LookupError(json.dumps(dict(os.environ), sort_keys=True))\n"
    )
    error = grader.grade("x", {}).errors[0]
    assert json.loads(error.split("LookupError: ", 1)[1].rsplit(" (line", 1)[0]) == SANDBOX_ENV
    still_works(grader)


def test_only_the_scratch_directory_is_writable_and_it_stays_private(make_grader, tmp_path):
    # tmp_path lies in the machine's /tmp, which the grader does not see (its /tmp is the scratch)
    outside = [tmp_path / "escaped.txt", Path(sys.prefix) / "escaped.txt", REPO / "escaped.txt", Path("/escaped.txt")]
    grader = make_grader(
        "import os\n"
        "def grade(sample, item):\n"
        "    if item.get('fine'):\n"
        "        return 1.0\n"
        "    if item.get('read'):\n"
        "        return float(open('/tmp/scratch.txt').read())\n"
        "    if item.get('one'):\n"
        "        open(item['one'], 'w')\n"
        "    with open('/tmp/scratch.txt', 'w') as file:\n"
        "        file.write('0.25')\n"
        "    refused = 0\n"
        "    for path in item['paths']:\n"
        "        try:\n"
        "            with open(path, 'w') as file:\n"
        "                file.write('x')\n"
        "        except OSError:\n"
        "            refused += 1\n"
        "    return refused / len(item['paths'])\n"
    )
    assert grader.grade("x", {"paths": [str(p) for p in outside]}).reward == 1.0
    assert not any(path.exists() for path in outside)
    for path in outside[1:]:
        # Read-only mounts refuse with EROFS; a checkout under the machine's /tmp (hidden by the
        # scratch) appears as an empty directory the grader's user may not write: EACCES.
        error = grader.grade("x", {"one": str(path)}).errors[0]
        assert "[Errno 30] Read-only file system" in error or "[Errno 13] Permission denied" in error, error
    assert grader.grade("x", {"read": True}).reward == 0.25  # the worker keeps its scratch between calls
    assert not Path("/tmp/scratch.txt").exists()  # ... in its own /tmp, not the machine's
    still_works(grader)


def test_the_pipeline_cannot_be_signalled(make_grader):
    me = os.getpid()
    grader = make_grader(
        "import os, signal, subprocess\n"
        "def grade(sample, item):\n"
        "    if item.get('fine'):\n"
        "        return 1.0\n"
        "    failed = 0\n"
        "    for pid in (item['pid'], os.getppid(), -1):\n"
        "        try:\n"
        "            os.kill(pid, signal.SIGKILL)\n"
        "        except ProcessLookupError:\n"
        "            failed += 1\n"
        "    killer = subprocess.run(['kill', '-9', str(item['pid'])], capture_output=True)\n"
        "    return (failed + (killer.returncode != 0)) / 4\n"
    )
    result = grader.grade("x", {"pid": me})
    # os.getppid() is 0 inside: kill(0) signals the worker's own process group, which PID 1
    # of a namespace ignores for SIGKILL; every other attempt finds no such process.
    assert result.to_dict() == {"reward": 0.75, "sub_rewards": {}, "errors": []}
    assert os.getpid() == me
    still_works(grader)


def test_a_fork_bomb_is_an_error_result_and_leaves_nothing_behind(make_grader):
    grader = make_grader(
        "import os\n"
        "def grade(sample, item):\n"
        "    if item.get('count'):\n"
        "        return len([p for p in os.listdir('/proc') if p.isdigit()]) / 100\n"
        "    if item.get('fine'):\n"
        "        return 1.0\n"
        "    while True:\n"
        "        os.fork()\n",
        timeout_s=10.0,
    )
    start = time.monotonic()
    result = grader.grade("x", {})
    assert result.reward is None
    assert result.errors == ["py: BlockingIOError: [Errno 11] Resource temporarily unavailable (line 8 of the grader source)"]
    assert time.monotonic() - start < 5.0
    assert grader.grade("x", {"count": True}).reward == 0.01  # every forked process is gone
    still_works(grader)


def test_processes_a_call_starts_end_with_the_call(make_grader):
    grader = make_grader(
        "import os, subprocess\n"
        "def grade(sample, item):\n"
        "    if item.get('start'):\n"
        "        subprocess.Popen(['sleep', '60'])\n"
        "        return 0.5\n"
        "    return len([p for p in os.listdir('/proc') if p.isdigit()]) / 100\n"
    )
    assert grader.grade("x", {"start": True}).reward == 0.5
    assert grader.grade("x", {}).reward == 0.01


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # a nested user namespace would give the grader capabilities again (seccomp refuses it)
        ("import ctypes\n    assert ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0, ctypes.get_errno()",
         "AssertionError: 1"),
        ("import ctypes\n    assert ctypes.CDLL(None).mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0",
         "AssertionError"),
        ("import os\n    os.chroot('/tmp')", "PermissionError: [Errno 1] Operation not permitted"),
        ("import resource\n    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "ValueError: not allowed to raise"),
        ("import resource\n    resource.setrlimit(resource.RLIMIT_NPROC, (-1, -1))", "ValueError: not allowed to raise"),
        ("import os\n    os.setuid(0)", "PermissionError: [Errno 1] Operation not permitted"),
        ("open('/proc/sys/kernel/core_pattern', 'w').write('|/tmp/x')", "Errno"),
    ],
)
def test_privilege_escapes_are_refused_by_the_kernel(make_grader, body, reason):
    grader = make_grader(f"def grade(sample, item):\n    if item.get('fine'):\n        return 1.0\n    {body}\n    return 1.0\n")
    result = grader.grade("x", {})
    assert result.reward is None and reason in result.errors[0], result.errors
    still_works(grader)


def test_processes_are_limited(make_grader):
    grader = make_grader(
        "import threading, time\n"
        "def grade(sample, item):\n"
        "    started = 0\n"
        "    try:\n"
        "        for _ in range(200):\n"
        "            threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()\n"
        "            started += 1\n"
        "    except RuntimeError:\n"
        "        pass\n"
        "    return started / 200\n"
    )
    started = grader.grade("x", {}).reward * 200
    assert 0 < started < MAX_PROCESSES  # threads count: the worker and its supervisor hold a share


def test_cpu_time_is_limited_per_process_and_a_worker_retires_before_its_limit(isolation):
    burn = "import time\ndef grade(sample, item):\n    end = time.process_time() + item['s']\n    while time.process_time() < end:\n        pass\n    return 1.0\n"
    worker = SandboxWorker(burn, memory_mb=256, cpu_s=2)
    try:
        assert worker.call({}, {"s": 1.2}, timeout_s=10) == 1.0
        assert worker.retire  # past half of its CPU limit: the grader replaces it after this call
        with pytest.raises(WorkerDied, match=r"killed by SIGKILL \(limits: 256 MiB of memory, 2 s of CPU per process\)"):
            worker.call({}, {"s": 5}, timeout_s=10)  # the kernel ends it at 2 s, long before the timeout
    finally:
        worker.kill()
    assert cpu_limit_s(10.0) == 100 and cpu_limit_s(0.5) == 60


# ----------------------------------------------------------------------------- limits, protocol

def test_python_grader_sees_sample_and_item(make_grader):
    grader = make_grader(
        "def grade(sample, item):\n"
        "    assert sample['output_json'] == {'n': 3}\n"
        "    return sample['output_json']['n'] / item['max']\n"
    )
    assert grader.grade('{"n": 3}', {"max": 4}).to_dict() == {"reward": 0.75, "sub_rewards": {}, "errors": []}
    assert grader.grade("not json", {"max": 4}).errors == ["py: AssertionError (line 2 of the grader source)"]


def test_endless_loop_times_out_then_grading_goes_on_in_a_new_worker(make_grader):
    grader = make_grader(
        "def grade(sample, item):\n"
        "    if sample['output_text'] == 'loop':\n"
        "        while True:\n"
        "            pass\n"
        "    return 1.0\n",
        timeout_s=1.0,
    )
    first_pid = next(iter(grader._workers)).process.pid
    start = time.monotonic()
    result = grader.grade("loop", {})
    assert result.to_dict() == {"reward": None, "sub_rewards": {}, "errors": ["py: timed out after 1 s"]}
    assert 0.9 < time.monotonic() - start < 5.0
    assert grader.grade("fine", {}).reward == 1.0
    assert {w.process.pid for w in grader._workers} != {first_pid}  # the stuck worker was replaced


def test_allocating_8_gib_is_a_memory_error(make_grader):
    grader = make_grader("def grade(sample, item):\n    block = bytearray(8 * 1024 ** 3)\n    return 1.0\n")
    result = grader.grade("x", {})
    assert result.reward is None
    assert result.errors == ["py: MemoryError: memory limit of 512 MiB exceeded"]
    assert grader.grade("x", {}).errors == result.errors  # the same worker keeps answering


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("'0.5'", "grade() returned str '0.5', not a number"),
        ("None", "grade() returned NoneType None, not a number"),
        ("1.5", "score 1.5 is outside [0, 1]"),
        ("-0.1", "score -0.1 is outside [0, 1]"),
        ("float('nan')", "returned NaN"),
    ],
)
def test_bad_return_values_are_error_results_never_clipped(make_grader, value, reason):
    result = make_grader(f"def grade(sample, item):\n    return {value}\n").grade("x", {})
    assert result.to_dict() == {"reward": None, "sub_rewards": {}, "errors": [f"py: {reason}"]}


def test_booleans_and_numpy_scalars_count_as_numbers(make_grader):
    grader = make_grader(
        "import numpy as np\n"
        "def grade(sample, item):\n"
        "    return sample['output_text'] == 'yes' if item.get('bool') else np.float64(0.25)\n"
    )
    assert grader.grade("yes", {"bool": True}).reward == 1.0
    assert grader.grade("yes", {}).reward == 0.25


def test_exceptions_report_the_line_and_the_worker_survives(make_grader):
    grader = make_grader("def grade(sample, item):\n    x = 1\n    return item['missing']\n")
    result = grader.grade("x", {})
    assert result.errors == ["py: KeyError: 'missing' (line 3 of the grader source)"]
    assert grader.worker_count == 1


def test_a_crashed_worker_is_replaced(make_grader):
    grader = make_grader(
        "import os\n"
        "def grade(sample, item):\n"
        "    if sample['output_text'] == 'crash':\n"
        "        os._exit(3)\n"
        "    return 0.5\n"
    )
    assert grader.grade("crash", {}).errors == ["py: the worker process exited with code 3"]
    assert grader.grade("ok", {}).reward == 0.5


def test_a_worker_that_floods_its_channel_is_replaced(make_grader):
    grader = make_grader(
        "import os\n"
        "def grade(sample, item):\n"
        "    if sample['output_text'] == 'flood':\n"
        "        os.write(4, b'x' * (2 << 20))\n"  # the protocol's output descriptor
        "    return 0.5\n"
    )
    assert grader.grade("flood", {}).errors == ["py: the worker broke the protocol (an answer longer than 1 MiB)"]
    assert grader.grade("ok", {}).reward == 0.5


def test_print_does_not_break_the_protocol(make_grader):
    grader = make_grader("def grade(sample, item):\n    print('{\"ok\": true, \"value\": 1.0}')\n    return 0.5\n")
    assert grader.grade("x", {}).reward == 0.5


# Module-level code that never finishes: a sleep (a slow import) and a busy loop (a stuck one).
SLOW_IMPORTS = {
    "sleep": "import time\ntime.sleep(1000)\n",
    "loop": "while True:\n    pass\n",
}


def _sandbox_mode(request, sandbox: str) -> str:
    if sandbox == "namespaces":
        request.getfixturevalue("isolation")
    return sandbox


@pytest.mark.parametrize("sandbox", ["namespaces", "none"])
@pytest.mark.parametrize("slow", sorted(SLOW_IMPORTS))
def test_a_source_that_does_not_load_within_the_time_limit_is_a_spec_error_at_build(request, sandbox, slow):
    source = SLOW_IMPORTS[slow] + "def grade(sample, item):\n    return 1.0\n"
    started = time.monotonic()
    with pytest.raises(GraderSpecError) as raised:
        PythonGrader(python_spec(source), timeout_s=1.0, sandbox=_sandbox_mode(request, sandbox))
    elapsed = time.monotonic() - started
    assert str(raised.value) == (
        "python 'py': the grader source did not load within the 1 s time limit (grader.timeout_s, --timeout-s): "
        "its module-level code (imports, set-up) counts against it; make that faster or raise the limit"
    )
    assert elapsed < 20.0  # far from the 1000 s it would sleep: the load was cut at its time limit
    assert _sandbox_children() == []  # the stuck worker was killed, not left behind


@pytest.fixture
def shared_marker():
    """A path both this process and a sandboxed grader can see (the sandbox's /tmp is private):
    a grader that checks it at import loads fast until the test creates it."""
    base = Path("/var/tmp")
    if not (base.is_dir() and os.access(base, os.W_OK)):
        pytest.skip("needs a writable /var/tmp, which the sandbox sees read-only")
    folder = Path(tempfile.mkdtemp(prefix="rft-grader-test-", dir=base))
    folder.chmod(0o755)
    yield folder / "slow"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("sandbox", ["namespaces", "none"])
@pytest.mark.parametrize("slow", sorted(SLOW_IMPORTS))
def test_loading_in_a_replacement_worker_counts_against_the_call_then_fails_fast(request, shared_marker, sandbox,
                                                                                  slow):
    indented = "".join(f"    {line}\n" for line in SLOW_IMPORTS[slow].splitlines())
    source = (
        "import os\n"
        f"if os.path.exists({str(shared_marker)!r}):\n{indented}"
        "def grade(sample, item):\n"
        "    if sample['output_text'] == 'stuck':\n"
        "        while True:\n"
        "            pass\n"
        "    return 1.0\n"
    )
    grader = PythonGrader(python_spec(source), timeout_s=1.0, sandbox=_sandbox_mode(request, sandbox))
    try:
        assert grader.grade("fine", {}).reward == 1.0
        first = {worker.process.pid for worker in grader._workers}
        shared_marker.touch()  # from now on the source loads for ever
        assert grader.grade("stuck", {}).errors == ["py: timed out after 1 s"]
        assert grader.worker_count == 0  # the stuck worker was killed
        started = time.monotonic()
        result = grader.grade("fine", {})  # needs a new worker, whose source never loads
        assert result.reward is None
        assert result.errors == ["py: timed out after 1 s loading the grader source (its module-level code, imports "
                                 "included, counts against the time limit grader.timeout_s)"]
        results = [grader.grade("fine", {}) for _ in range(3)]  # fail at once, no new worker
        elapsed = time.monotonic() - started
        assert all(r.reward is None and "not loading it again" in r.errors[0] for r in results)
        assert grader.worker_count == 0 and first.isdisjoint(w.process.pid for w in grader._workers)
        assert elapsed < 20.0  # 4 calls: one time limit, not four, and never the 1000 s sleep
        assert _sandbox_children() == []
    finally:
        grader.close()


def _sandbox_children() -> list[int]:
    """Live worker processes this test process started (math readers of other tests aside)."""
    found = []
    for pid in _children(os.getpid()):
        with contextlib.suppress(OSError):
            if b"_sandbox_child.py" in Path(f"/proc/{pid}/cmdline").read_bytes() and _running(pid):
                found.append(pid)
    return found


def test_sources_that_do_not_load_are_spec_errors_at_build_time(isolation):
    with pytest.raises(GraderSpecError, match="does not define grade"):
        build_grader(python_spec("def score(sample, item):\n    return 1.0\n"))
    with pytest.raises(GraderSpecError, match="ZeroDivisionError"):
        build_grader(python_spec("x = 1 / 0\ndef grade(sample, item):\n    return 1.0\n"))
    with pytest.raises(GraderSpecError, match="No module named 'not_a_module_xyz'"):
        build_grader(python_spec("import not_a_module_xyz\ndef grade(sample, item):\n    return 1.0\n"))
    # validation parses but never runs the source
    assert validate_grader_spec(python_spec("x = 1 / 0\ndef grade(sample, item):\n    return 1.0\n")) == []


def test_parallel_grading_matches_serial_in_order_and_is_faster(isolation):
    source = (
        "import time\n"
        "def grade(sample, item):\n"
        "    time.sleep(item['sleep'])\n"
        "    if item['i'] % 5 == 3:\n"
        "        raise ValueError(f\"bad item {item['i']}\")\n"
        "    return item['i'] / 20\n"
    )
    items = [{"i": i, "sleep": 0.15 if i % 2 else 0.05} for i in range(12)]
    samples = [f"s{i}" for i in range(12)]
    with build_grader(python_spec(source)) as grader:
        start = time.monotonic()
        serial = grade_batch(grader, samples, items, workers=0)
        serial_s = time.monotonic() - start
        start = time.monotonic()
        parallel = grade_batch(grader, samples, items, workers=4)
        parallel_s = time.monotonic() - start
        assert grader.worker_count == 4
    assert [r.to_dict() for r in parallel] == [r.to_dict() for r in serial]
    assert [r.reward for r in serial[:5]] == [0.0, 0.05, 0.1, None, 0.2]
    assert serial[3].errors == ["py: ValueError: bad item 3 (line 5 of the grader source)"]
    assert summarize(serial)["errors"] == 2
    assert parallel_s < 0.6 * serial_s


def test_close_stops_every_worker_process(isolation):
    grader = build_grader(python_spec("def grade(sample, item):\n    return 1.0\n"))
    grade_batch(grader, ["a", "b", "c"], [{}, {}, {}], workers=3)
    processes = [worker.process for worker in grader._workers]
    assert processes
    grader.close()
    assert all(process.poll() is not None for process in processes)
    assert grader.grade("a", {}).errors == ["py: the grader is closed"]


def test_multi_with_a_timed_out_python_sub_grader_is_an_error_listing_it(isolation):
    spec = {
        "type": "multi", "name": "mix", "calculate_output": "0.5 * fast + 0.5 * slow",
        "graders": {
            "fast": {"type": "numeric_match"},
            "slow": python_spec("def grade(sample, item):\n    while True:\n        pass\n"),
        },
    }
    with build_grader(spec, timeout_s=0.5) as grader:
        result = grader.grade("#### 1", {"reference": 1})
    assert result.sub_rewards == {"fast": 1.0, "slow": None}
    assert result.errors == ["mix: sub-grader(s) failed: slow", "mix.slow: timed out after 0.5 s"]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; nobody may reap it in a container


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("sandbox", ["namespaces", "none"])
def test_a_stuck_worker_does_not_outlive_a_killed_parent(tmp_path, sandbox, request):
    if sandbox == "namespaces":
        request.getfixturevalue("isolation")
    script = tmp_path / "parent.py"
    script.write_text(
        "from rft_core.graders.python_grader import PythonGrader\n"
        "grader = PythonGrader({'type': 'python', 'source': 'def grade(s, i):\\n    while True:\\n        pass\\n'},"
        f" timeout_s=60, sandbox={sandbox!r})\n"
        "print(next(iter(grader._workers)).process.pid, flush=True)\n"
        "grader.grade('x', {})\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    worker_pid = int(parent.stdout.readline())
    time.sleep(0.3)  # the worker is now looping inside grade()
    workers = [worker_pid, *_children(worker_pid)]  # with namespaces: its supervisor and the sandbox
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5.0
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in workers if _running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []
    assert len(workers) == (2 if sandbox == "namespaces" else 1)


# ----------------------------------------------------------------------------- the opt-out's guard

@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("import urllib.request\n    urllib.request.urlopen('http://example.com')", "socket.getaddrinfo is not allowed"),
        ("import subprocess\n    subprocess.run(['true'])", "subprocess.Popen is not allowed"),
        ("import ctypes\n    ctypes.CDLL('libc.so.6')", "ctypes.dlopen is not allowed"),
        ("import os\n    os.kill(os.getppid(), 9)", "os.kill is not allowed"),
    ],
)
def test_without_isolation_the_audit_hook_still_refuses_common_mistakes(make_unisolated, body, reason):
    result = make_unisolated(f"def grade(sample, item):\n    {body}\n    return 1.0\n").grade("x", {})
    assert result.reward is None and reason in result.errors[0]


def test_the_audit_hook_cannot_be_disarmed(make_unisolated):
    source = (
        "import gc, sys\n"
        "def grade(sample, item):\n"
        "    hooks = [f for f in gc.get_objects() if getattr(f, '__name__', '') == 'hook']\n"
        "    for hook in hooks:\n"
        "        hook.__code__ = (lambda *a, **k: None).__code__\n"
        "    import socket\n"
        "    socket.socket()\n"
        "    return 1.0\n"
    )
    result = make_unisolated(source).grade("x", {})
    assert result.reward is None
    assert "the sandbox audit hook cannot be modified" in result.errors[0]


def test_the_config_sandbox_mode_reaches_python_graders_inside_multi(isolation):
    from rft_core.config import GraderConfig
    from rft_core.graders import configured_grader

    sub = {"type": "python", "source": "def grade(sample, item):\n    return 1.0"}
    spec = {"type": "multi", "graders": {"p": sub}, "calculate_output": "p"}
    for mode in ("none", "namespaces"):
        with configured_grader(GraderConfig(spec=spec, sandbox=mode, timeout_s=5)) as grader:
            assert grader.graders["p"].sandbox == mode
            assert grader.grade("x", {}).reward == 1.0
