"""The python grader's sandbox: limits, no network, worker replacement, parallel pool."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rft_core.graders import GraderSpecError, build_grader, grade_batch, summarize, validate_grader_spec


def python_spec(body: str, name: str = "py") -> dict:
    return {"type": "python", "name": name, "source": body}


@pytest.fixture
def make_grader():
    built = []

    def make(source: str, **limits):
        grader = build_grader(python_spec(source), **{"timeout_s": 2.0, "memory_mb": 512, **limits})
        built.append(grader)
        return grader

    yield make
    for grader in built:
        grader.close()


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


def test_sockets_are_refused_even_to_localhost(make_grader):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    accepted = []

    def accept():
        with contextlib.suppress(OSError):  # the listener times out: nobody connected
            accepted.append(listener.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        grader = make_grader(
            "import socket\n"
            "def grade(sample, item):\n"
            "    if item.get('raw'):\n"
            "        socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    return 1.0\n"
        )
        raw = grader.grade("x", {"raw": True})
        result = grader.grade("x", {})
    finally:
        thread.join()
        listener.close()
    assert raw.reward is None and "socket.__new__ is not allowed in the python grader sandbox" in raw.errors[0]
    assert result.reward is None and "socket.getaddrinfo is not allowed" in result.errors[0]
    assert accepted == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("import urllib.request\n    urllib.request.urlopen('http://example.com')", "socket.getaddrinfo is not allowed"),
        ("import subprocess\n    subprocess.run(['true'])", "subprocess.Popen is not allowed"),
        ("import os\n    os.system('true')", "os.system is not allowed"),
        ("import ctypes\n    ctypes.CDLL('libc.so.6')", "ctypes.dlopen is not allowed"),
        ("import resource\n    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "resource.setrlimit is not allowed"),
        ("import os\n    os.kill(os.getppid(), 9)", "os.kill is not allowed"),
    ],
)
def test_escapes_from_the_sandbox_are_refused(make_grader, body, reason):
    result = make_grader(f"def grade(sample, item):\n    {body}\n    return 1.0\n").grade("x", {})
    assert result.reward is None and reason in result.errors[0]


def test_the_audit_hook_cannot_be_disarmed(make_grader):
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
    result = make_grader(source).grade("x", {})
    assert result.reward is None
    assert "the sandbox audit hook cannot be modified" in result.errors[0]


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


def test_print_does_not_break_the_protocol(make_grader):
    grader = make_grader("def grade(sample, item):\n    print('{\"ok\": true, \"value\": 1.0}')\n    return 0.5\n")
    assert grader.grade("x", {}).reward == 0.5


def test_secrets_in_the_environment_do_not_reach_user_code(make_grader, monkeypatch):
    monkeypatch.setenv("RFT_TEST_SECRET", "sk-secret")
    grader = make_grader("import os\ndef grade(sample, item):\n    return float('RFT_TEST_SECRET' not in os.environ)\n")
    assert grader.grade("x", {}).reward == 1.0


def test_sources_that_do_not_load_are_spec_errors_at_build_time():
    with pytest.raises(GraderSpecError, match="does not define grade"):
        build_grader(python_spec("def score(sample, item):\n    return 1.0\n"))
    with pytest.raises(GraderSpecError, match="ZeroDivisionError"):
        build_grader(python_spec("x = 1 / 0\ndef grade(sample, item):\n    return 1.0\n"))
    with pytest.raises(GraderSpecError, match="No module named 'not_a_module_xyz'"):
        build_grader(python_spec("import not_a_module_xyz\ndef grade(sample, item):\n    return 1.0\n"))
    # validation parses but never runs the source
    assert validate_grader_spec(python_spec("x = 1 / 0\ndef grade(sample, item):\n    return 1.0\n")) == []


def test_parallel_grading_matches_serial_in_order_and_is_faster():
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


def test_close_stops_every_worker_process():
    grader = build_grader(python_spec("def grade(sample, item):\n    return 1.0\n"))
    grade_batch(grader, ["a", "b", "c"], [{}, {}, {}], workers=3)
    processes = [worker.process for worker in grader._workers]
    assert processes
    grader.close()
    assert all(process.poll() is not None for process in processes)
    assert grader.grade("a", {}).errors == ["py: the grader is closed"]


def test_multi_with_a_timed_out_python_sub_grader_is_an_error_listing_it():
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


def test_a_stuck_worker_does_not_outlive_a_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "from rft_core.graders import build_grader\n"
        "grader = build_grader({'type': 'python', 'source': 'def grade(s, i):\\n    while True:\\n        pass\\n'},"
        " timeout_s=60)\n"
        "print(next(iter(grader._workers)).process.pid, flush=True)\n"
        "grader.grade('x', {})\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    time.sleep(0.3)  # the worker is now looping inside grade()
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")  # a zombie has exited; nobody may reap it in a container

    deadline = time.monotonic() + 5.0
    while running(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = running(worker_pid)
    if alive:
        os.kill(worker_pid, signal.SIGKILL)
    assert not alive
