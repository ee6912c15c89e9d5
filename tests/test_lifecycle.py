"""Stop requests and run owners, in one process: real signals sent to this process, real SFT and RL
on a tiny model, a real MLflow store (sqlite). The end-to-end stops of `rft run` and `rft serve`
are in test_stops.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from training_fixtures import tiny_config, tiny_task

from rft_core import tracking
from rft_core.checkpoint import checkpoint_dirs, checkpoint_problem
from rft_core.config import RFTConfig
from rft_core.graders import build_grader
from rft_core.lifecycle import (
    TrainingStopped,
    deferring_stops,
    owner_alive,
    process_identity,
    stop_on_signals,
    stop_requested,
)
from rft_core.rl.trainer import run_rl
from rft_core.sft import run_sft


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("task")
    cfg = tiny_config(tmp)
    train, val, model_dir = tiny_task(tmp, cfg)
    return cfg, train, val, model_dir


@pytest.fixture(scope="module")
def grader():
    with build_grader({"type": "numeric_match", "partial_credit": 0.1}) as g:
        yield g


def signal_at(step: int, sig: int, times: int = 1):
    """A `log` callable that sends `sig` to this process `times` times when training reports `step`
    (what Ctrl-C or a process manager does while that step runs)."""

    def log(metrics, at):
        if at == step and ("loss" in metrics or "reward_mean" in metrics):
            for _ in range(times):
                os.kill(os.getpid(), sig)

    return log


def weights(path):
    return load_file(str(path / "model.safetensors"))


# --------------------------------------------------------------------------- stopping training


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_sft_stops_after_that_step_with_a_checkpoint_and_the_rerun_ends_the_same(
    task, grader, tmp_path, sig
):
    cfg, train, val, model_dir = task
    cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"keep_best": False, "checkpoint_interval": 4})})
    run_sft(cfg, train, val, model_dir, tmp_path / "straight", grader=grader)
    with pytest.raises(TrainingStopped) as stopped, stop_on_signals():
        run_sft(cfg, train, val, model_dir, tmp_path / "stopped", grader=grader, log=signal_at(3, sig))
    assert (stopped.value.stage, stopped.value.step, stopped.value.total) == ("sft", 3, 6)
    checkpoint = tmp_path / "stopped" / "checkpoints" / "step-3"  # between the intervals: written for the stop
    assert stopped.value.checkpoint == str(checkpoint) and checkpoint_problem(checkpoint) is None
    assert stop_requested() is None  # the request ends with the command
    run_sft(cfg, train, val, model_dir, tmp_path / "stopped", grader=grader)
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "stopped" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_during_rl_stops_after_that_iteration_and_the_rerun_ends_the_same(task, grader, tmp_path):
    cfg, train, val, model_dir = task
    cfg = tiny_config(tmp_path, "rl.iterations=3", "rl.checkpoint_interval=0")
    run_rl(cfg, train, val, model_dir, tmp_path / "straight", grader=grader)
    with pytest.raises(TrainingStopped, match="rl stopped at step 2 of 3"), stop_on_signals():
        run_rl(cfg, train, val, model_dir, tmp_path / "stopped", grader=grader, log=signal_at(2, signal.SIGINT))
    assert [d.name for d in checkpoint_dirs(tmp_path / "stopped" / "checkpoints")] == ["step-2"]
    run_rl(cfg, train, val, model_dir, tmp_path / "stopped", grader=grader)
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "stopped" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once(task, grader, tmp_path):
    cfg, train, val, model_dir = task
    with pytest.raises(KeyboardInterrupt) as stopped, stop_on_signals():
        run_sft(cfg, train, val, model_dir, tmp_path, grader=grader, log=signal_at(3, signal.SIGINT, times=2))
    assert not isinstance(stopped.value, TrainingStopped)  # no wait for the end of the step
    assert not (tmp_path / "checkpoints" / "step-3").exists()


def test_outside_a_training_loop_a_signal_interrupts_at_once_and_inside_it_waits_for_the_loop():
    # Python's own SIGINT handler, as in a terminal: a shell's background job (`cmd &`) inherits
    # SIGINT ignored, and the handlers must be given back as they were found.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # never reached: interrupted
        # A request that arrives after a loop's last check is honoured when the loop's block ends.
        with pytest.raises(KeyboardInterrupt), stop_on_signals(), deferring_stops():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop_requested() == "SIGINT"  # still running: the loop decides when
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    finally:
        signal.signal(signal.SIGINT, inherited)


# --------------------------------------------------------------------------- owners


def dead_process() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_owner_is_alive_only_while_that_very_process_runs():
    me = process_identity()
    assert owner_alive(me) is True
    assert owner_alive(process_identity(dead_process())) is False
    assert owner_alive({**me, "started": "1"}) is False  # the pid, reused by a later process
    assert owner_alive({**me, "host": "elsewhere"}) is None  # cannot know
    assert owner_alive({}) is None


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_started_through_die_with_parent_dies_with_its_parent(tmp_path):
    # The parent: a Python process that starts a long sleep through the launcher, then is killed.
    pid_file = tmp_path / "pid"
    script = (
        "import subprocess, time\n"
        "from rft_core.lifecycle import die_with_parent\n"
        "child = subprocess.Popen(die_with_parent(['sleep', '300']))\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    wait_until(lambda: pid_file.exists() and pid_file.read_text().isdigit())
    child = int(pid_file.read_text())
    cmdline = Path(f"/proc/{child}/cmdline")
    wait_until(lambda: cmdline.read_bytes().split(b"\0")[0] == b"sleep")  # the launcher became the command
    parent.kill()  # kill -9: nothing of the parent runs after this
    parent.wait()
    wait_until(lambda: not running(child), within_s=30)


def test_a_new_pipeline_run_ends_the_runs_of_dead_owners_and_links_those_of_its_config(tmp_path):
    cfg = RFTConfig.from_dict({"output_dir": str(tmp_path)})
    other_config = RFTConfig.from_dict({"output_dir": str(tmp_path), "seed": 7})
    uri = tracking.default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    dead = process_identity(dead_process())
    owner = {"rft.owner.host": dead["host"], "rft.owner.pid": dead["pid"], "rft.owner.started": dead["started"]}

    def running(config, **tags):
        run_id = tracking.start_pipeline_run(config, tracking_uri=uri)
        tracking.set_tags(run_id, tags, tracking_uri=uri)
        return run_id

    abandoned = running(cfg, **owner)
    abandoned_stage = tracking.start_stage_run(abandoned, "rl", tracking_uri=uri)
    tracking.set_tags(abandoned_stage, owner, tracking_uri=uri)
    abandoned_other = running(other_config, **owner)
    live = running(cfg)  # owned by this process: alive
    remote = running(cfg, **{**owner, "rft.owner.host": socket.gethostname() + "-other"})
    untagged = running(cfg, **{"rft.owner.pid": ""})

    with tracking.pipeline_run(cfg, tracking_uri=uri) as new:
        status = {run_id: client.get_run(run_id).info.status for run_id in
                  (abandoned, abandoned_stage, abandoned_other, live, remote, untagged)}
        assert status == {abandoned: "KILLED", abandoned_stage: "KILLED", abandoned_other: "KILLED",
                          live: "RUNNING", remote: "RUNNING", untagged: "RUNNING"}
        tags = {run_id: client.get_run(run_id).data.tags for run_id in (abandoned, abandoned_stage, abandoned_other, new)}
        assert tags[new]["rft.replaces"] == abandoned
        assert tags[abandoned]["rft.replaced_by"] == tags[abandoned_stage]["rft.replaced_by"] == new
        assert "rft.replaced_by" not in tags[abandoned_other]  # another config: ended, not replaced
        assert f"its process {dead['pid']} on {dead['host']}" in tags[abandoned_other]["rft.ended_because"]
    assert client.get_run(new).info.status == "FINISHED"
