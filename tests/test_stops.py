"""Stops leave nothing behind: `rft run` as a real subprocess (its own temporary Prefect server, a
real MLflow store), stopped mid-RL with Ctrl-C (SIGINT to its process group) or killed with
SIGKILL, then run again.

Ctrl-C: training stops at the next step with a checkpoint, the MLflow runs end KILLED, the command
exits promptly with the command that resumes, and no process it started survives. SIGKILL: no
process it started survives either (the server dies with it), and the next run ends the runs the
killed one left RUNNING, links them to itself and resumes from the checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from test_pipeline import TINY

from rft_core.checkpoint import checkpoint_problem

ROOT = Path(__file__).resolve().parent.parent
EXIT_BOUND_S = 60  # generous: a stop takes a few seconds; a hang takes minutes
# Enough iterations that the stop lands mid-RL whatever the machine's load.
RL = {**TINY["rl"], "iterations": 40, "checkpoint_interval": 5}


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, "rl": RL, "output_dir": str(tmp_path / "out")}))
    return path


def environment(tmp_path: Path) -> dict[str, str]:
    """No Prefect API configured: `rft run` starts (and must clean up) its own server, with its
    database in a Prefect home of this test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rft", *args], cwd=ROOT, env=env, stdout=open(log, "w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_for_rl_checkpoint(proc: subprocess.Popen, out: Path, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not list(out.glob("stages/rl-*/checkpoints/step-5")):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "RL never wrote its first checkpoint"
        time.sleep(0.2)


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (from /proc), with its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")).decode()
        except OSError:
            continue
        todo += children.get(child, [])
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_all_gone(pids: dict[int, str], within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [cmd for pid, cmd in pids.items() if alive(pid)], "left behind"


def runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


def rerun(args: list[str], env: dict[str, str], log: Path) -> str:
    proc = start(args, env, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    return log.read_text()


@pytest.mark.slow
def test_ctrl_c_mid_rl_stops_at_the_next_step_with_a_checkpoint_and_leaves_nothing_behind(tmp_path):
    cfg, env, out = write_config(tmp_path), environment(tmp_path), tmp_path / "out"
    log = tmp_path / "run.log"
    proc = start(["run", "--config", str(cfg)], env, log)
    wait_for_rl_checkpoint(proc, out, log)
    started = descendants(proc.pid)
    assert any("prefect.server" in cmd for cmd in started.values()), started  # its own server

    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    sent = time.monotonic()
    code = proc.wait(timeout=EXIT_BOUND_S)
    assert time.monotonic() - sent < EXIT_BOUND_S
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "Connection refused" not in text and "Traceback" not in text, text[-3000:]
    assert_all_gone(started)

    stopped = re.search(r"stopped: rl stopped at step (\d+) of 40 on request; checkpoint (\S+)", text)
    assert stopped, text[-3000:]
    step, checkpoint = int(stopped.group(1)), Path(stopped.group(2))
    assert 5 <= step < 40 and checkpoint.name == f"step-{step}" and checkpoint_problem(checkpoint) is None
    resume = re.search(r"Resume with: (.+)", text).group(1)
    assert shlex.split(resume) == ["rft", "run", "--config", str(cfg)]

    statuses = {(r.data.tags.get("rft.stage") or "pipeline"): r.info.status for r in runs(tmp_path)}
    assert statuses == {"validate": "FINISHED", "split": "FINISHED", "sft": "FINISHED", "rl": "KILLED",
                        "pipeline": "KILLED"}
    killed = [r for r in runs(tmp_path) if r.info.status == "KILLED"]
    assert all("stopped on request" in r.data.tags["rft.ended_because"] for r in killed)

    text = rerun(shlex.split(resume)[1:], env, tmp_path / "rerun.log")
    assert f"resuming RL from {checkpoint} (iteration {step})" in text
    assert not [r for r in runs(tmp_path) if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_kill_9_mid_rl_leaves_no_process_and_the_next_run_ends_and_links_the_abandoned_runs(tmp_path):
    cfg, env, out = write_config(tmp_path), environment(tmp_path), tmp_path / "out"
    log = tmp_path / "run.log"
    proc = start(["run", "--config", str(cfg)], env, log)
    wait_for_rl_checkpoint(proc, out, log)
    started = descendants(proc.pid)
    assert any("prefect.server" in cmd for cmd in started.values()), started

    os.kill(proc.pid, signal.SIGKILL)  # the command alone: nothing else is signalled
    proc.wait(timeout=EXIT_BOUND_S)
    assert_all_gone(started)  # its server went with it
    abandoned = {r.info.run_id: r for r in runs(tmp_path) if r.info.status == "RUNNING"}
    assert {r.data.tags.get("rft.stage", "pipeline") for r in abandoned.values()} == {"pipeline", "rl"}

    text = rerun(["run", "--config", str(cfg)], env, tmp_path / "rerun.log")
    assert re.search(r"resuming RL from \S+/step-\d+ \(iteration \d+\)", text), text[-3000:]
    after = {r.info.run_id: r for r in runs(tmp_path)}
    assert not [r for r in after.values() if r.info.status == "RUNNING"]
    new_parent = next(r for r in after.values() if r.data.tags.get("rft.kind") == "pipeline"
                      and r.info.run_id not in abandoned)
    old_parent = next(run_id for run_id, r in abandoned.items() if r.data.tags.get("rft.kind") == "pipeline")
    assert new_parent.info.status == "FINISHED"
    assert new_parent.data.tags["rft.replaces"] == old_parent
    for run_id in abandoned:
        tags = after[run_id].data.tags
        assert after[run_id].info.status == "KILLED"
        assert tags["rft.replaced_by"] == new_parent.info.run_id
        assert f"its process {proc.pid} on" in tags["rft.ended_because"]


# --------------------------------------------------------------------------- rft serve


def deployments_file(tmp_path: Path) -> Path:
    """Two deployments served from a process, hourly (nothing falls due during the test)."""
    entry = {"entrypoint": "flows/deployments.py:evaluate_from_file", "parameters": {"config_path": "none.yaml"},
             "schedules": [{"interval": 3600, "active": True}]}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({"deployments": [{"name": "alpha", **entry}, {"name": "beta", **entry}]}))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_deployments(api_url: str) -> dict[str, object]:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return {d.name: d for d in client.read_deployments()}


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, within_s: float = 240) -> None:
    deadline = time.monotonic() + within_s
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def wait_until_served(proc: subprocess.Popen, log: Path, api_url: str, name: str) -> None:
    """Until `rft serve` polls for runs of deployment `name`."""
    wait_for_log(proc, log, f"Serving {name}")
    deadline = time.monotonic() + 120
    while getattr(read_deployments(api_url).get(name), "last_polled", None) is None:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.mark.slow
def test_kill_9_of_rft_serve_takes_its_server_along_and_the_next_serve_pauses_what_it_left_active(tmp_path):
    prefect_file, port = deployments_file(tmp_path), free_port()
    env = {**environment(tmp_path), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    api_url = f"http://127.0.0.1:{port}/api"
    args = ["serve", "--prefect-file", str(prefect_file), "--port", str(port)]

    log = tmp_path / "serve.log"
    serve = start([*args, "-d", "alpha"], env, log)
    wait_until_served(serve, log, api_url, "alpha")
    started = descendants(serve.pid)
    assert any("server start" in cmd for cmd in started.values()), started
    os.kill(serve.pid, signal.SIGKILL)
    serve.wait(timeout=EXIT_BOUND_S)
    assert_all_gone(started)  # no Prefect server left on the port

    log = tmp_path / "serve-again.log"
    again = start([*args, "-d", "beta"], env, log)
    try:
        wait_until_served(again, log, api_url, "beta")
        assert "Deployment alpha was left active by an rft serve that did not stop cleanly: paused" in log.read_text()
        deployments = read_deployments(api_url)
        assert deployments["alpha"].paused and not deployments["beta"].paused
        started = descendants(again.pid)
    finally:
        again.send_signal(signal.SIGTERM)  # a clean stop: Prefect pauses what it served
        again.wait(timeout=EXIT_BOUND_S)
    assert_all_gone(started)


def test_tidying_cancels_overdue_runs_and_pauses_only_deployments_nobody_serves(tmp_path):
    from datetime import datetime, timedelta, timezone

    from prefect import get_client
    from prefect.states import Scheduled
    from prefect.testing.utilities import prefect_test_harness

    from flows.serve import read_deployments as file_deployments
    from flows.serve import tidy_abandoned, to_runner_deployment

    now = datetime.now(timezone.utc)
    entries = file_deployments(deployments_file(tmp_path))
    with prefect_test_harness(server_startup_timeout=120), get_client(sync_client=True) as client:
        ids = {entry["name"]: to_runner_deployment(entry).apply() for entry in entries}
        overdue = client.create_flow_run_from_deployment(ids["alpha"], state=Scheduled(scheduled_time=now - timedelta(hours=2)))
        later = client.create_flow_run_from_deployment(ids["alpha"], state=Scheduled(scheduled_time=now + timedelta(days=1)))
        client.get_scheduled_flow_runs_for_deployments([ids["beta"]])  # beta is polled: someone serves it

        said = []
        assert tidy_abandoned(["alpha", "beta"], own_server=False, say=said.append) == {"alpha": 1}
        assert client.read_deployment(ids["alpha"]).paused and not client.read_deployment(ids["beta"]).paused
        assert client.read_flow_run(overdue.id).state.name == "Cancelled"
        assert client.read_flow_run(later.id).state.name != "Cancelled"
        assert "alpha" in said[0]
        # Paused now: nothing left to tidy; a server this process had to start means nobody polls.
        assert tidy_abandoned(["alpha"], own_server=False, say=said.append) == {}
        assert tidy_abandoned(["beta"], own_server=True, say=said.append) == {"beta": 0}
