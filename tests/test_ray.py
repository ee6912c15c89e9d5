"""The pipeline's SFT and PPO stages on several processes through Ray Train (the `compute` section),
on a real engine: a Ray instance the stage starts on this machine, and a real two-node Ray cluster
on loopback started and stopped here (`ray_fixtures`). Real Prefect (test harness; a real server
and worker for the deployed flow), real MLflow, tiny models.

What they prove: two processes (on one machine, or one on each of two nodes) end with the weights
and metrics of one process (the tolerance of tests/test_distributed.py), with the same stage keys
and one MLflow stage run each; a stop request (SIGINT or SIGTERM to the driver's process group) stops
every process at one step with a checkpoint and the rerun resumes to the same weights; a rank that
raises or is killed fails the stage naming it, leaves no process behind, and `prefect flow-run
retry` resumes and completes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed: the compute section's tests need it (pip install 'rft[ray]')")

import torch  # noqa: E402
import yaml  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from ray_fixtures import ROOT, RayCluster, ray_children, start_cluster, wait_gone  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from rft_core.config import RFTConfig  # noqa: E402

# Among the slower checks (`bash bench/slow_checks.sh`, which CI runs after the suite): real Ray clusters
# and several training processes take minutes that would push the suite past its 20 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1500)]

# SFT: 4 steps of 8 sequences (4 per process on two); PPO: 12 iterations of 4 prompts x 2 samples,
# a checkpoint after each (a stop or a killed rank loses at most one).
CONFIG = {
    "data": {"synthetic": {"n_train": 64, "n_val": 16, "max_steps": 2}},
    "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                       "vocab_size": 320, "pretrain_steps": 3, "pretrain_batch_size": 4}},
    "sft": {"batch_size": 8, "max_steps": 4, "checkpoint_interval": 2, "eval_interval": 0, "keep_best": False},
    "rl": {"iterations": 12, "prompts_per_iteration": 4, "samples_per_prompt": 2, "minibatch_size": 8,
           "ppo_epochs": 1, "max_new_tokens": 16, "eval_interval": 0, "checkpoint_interval": 1,
           "keep_best": False, "lr": 1e-3, "critic_warmup": 0},
    "eval": {"max_items": 8, "max_new_tokens": 16},
    "grader": {"spec": {"type": "numeric_match", "partial_credit": 0.1}},
    "tracking": {"log_models": False},  # nothing to register: the pipeline ends after evaluate
}


def config_dict(out: Path, compute: dict | None = None, **sections: dict) -> dict:
    raw = copy.deepcopy(CONFIG)
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    raw["output_dir"] = str(out)
    raw["experiment"] = f"rft-ray-{out.name}"
    if compute:
        raw["compute"] = compute
    return raw


def config(out: Path, compute: dict | None = None, **sections: dict) -> RFTConfig:
    return RFTConfig.from_dict(config_dict(out, compute, **sections))


def stage_dir(out: Path, stage: str) -> Path:
    (found,) = (out / "stages").glob(f"{stage}-*")
    return found


def weights(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir(out, stage) / "model" / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def result(out: Path, stage: str) -> dict:
    return json.loads((stage_dir(out, stage) / "result.json").read_text())


def assert_same_sft(one: Path, other: Path) -> None:
    """`other`'s SFT ended where `one`'s did, in a stage directory of the same key."""
    assert stage_dir(one, "sft").name == stage_dir(other, "sft").name  # the same cache keys
    base = load_file(str(next((one / "cache").glob("tiny-*")) / "model.safetensors"))
    moved = max_difference(weights(one, "sft"), base)
    assert moved > 1e-4
    assert max_difference(weights(one, "sft"), weights(other, "sft")) < moved * 1e-3
    assert result(one, "sft")["metrics"]["val_loss"] == pytest.approx(result(other, "sft")["metrics"]["val_loss"], rel=1e-5)


def assert_same_training(one: Path, other: Path) -> None:
    """`other`'s SFT and PPO ended where `one`'s did (tests/test_distributed.py's tolerances), from
    stage directories of the same keys."""
    assert_same_sft(one, other)
    assert stage_dir(one, "rl").name == stage_dir(other, "rl").name
    moved = max_difference(weights(one, "rl"), weights(one, "sft"))
    assert moved > 1e-5
    assert max_difference(weights(one, "rl"), weights(other, "rl")) < moved * 1e-3
    heads = [torch.load(stage_dir(out, "rl") / "value_head.pt") for out in (one, other)]
    assert heads[0]["weight"].abs().max() > 1e-5  # the critic trained
    assert torch.allclose(heads[0]["weight"], heads[1]["weight"], atol=1e-6)
    assert result(one, "rl")["metrics"] == pytest.approx(result(other, "rl")["metrics"])


def assert_same_evaluation(summary: dict, one: dict) -> None:
    assert set(summary["metrics"]) == set(one["metrics"]) == {"sft", "rl"}
    for model, metrics in one["metrics"].items():
        assert summary["metrics"][model] == pytest.approx(metrics)


def stage_runs(summary: dict) -> dict[str, list]:
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.info.run_name, []).append(run)
    return found


def assert_tracked_once(summary: dict, processes: int, machines: int) -> None:
    """One sft and one rl run, FINISHED, with the compute settings as parameters, where each rank
    ran as a tag, and every metric logged once per step (by the main process only)."""
    runs = stage_runs(summary)
    client = MlflowClient(summary["tracking_uri"])
    assert len(runs["sft"]) == 1 and len(runs["rl"]) == 1, runs
    for stage, steps in (("sft", [1, 2, 3, 4]), ("rl", list(range(1, 13)))):
        (run,) = runs[stage]
        assert run.info.status == "FINISHED"
        assert run.data.params["compute.machines"] == str(machines)
        ranks = json.loads(run.data.tags["rft.compute.ranks"])
        assert sorted(ranks) == [str(r) for r in range(processes * machines)]
        assert len({info["node"] for info in ranks.values()}) == machines
        assert run.data.tags["rft.compute.machines"] == str(machines)
        key = "sft/loss" if stage == "sft" else "rl/reward_mean"
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == steps


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def one_process(prefect_api, tmp_path_factory) -> tuple[Path, dict]:
    """The pipeline in this process (compute's default): what the others must equal."""
    from flows.pipeline import rft_pipeline

    out = tmp_path_factory.mktemp("one")
    return out, rft_pipeline(config=config(out))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    started = start_cluster(dict(os.environ), logs)
    try:
        yield started
    finally:
        left = started.stop()
        assert not left, f"Ray processes still running after the cluster was stopped: {left}"


# --------------------------------------------------------------------------- one machine


def test_two_processes_on_this_machine_train_the_pipeline_as_one_process_does(one_process, tmp_path):
    from flows.pipeline import rft_pipeline

    one, one_summary = one_process
    two = tmp_path / "two"
    summary = rft_pipeline(config=config(two, {"processes": 2}))
    assert_same_training(one, two)
    assert_same_evaluation(summary, one_summary)
    assert_tracked_once(summary, processes=2, machines=1)
    assert stage_runs(summary)["sft"][0].data.params["compute.processes"] == "2"
    # The Ray instance started for each stage is gone with everything it started.
    assert not ray_children(os.getpid())


@pytest.mark.parametrize(
    ("sig", "resume"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c-to-the-group", "sigterm-to-the-group"],
)
def test_a_stop_request_stops_every_process_at_one_step_and_the_rerun_resumes_to_the_same_weights(
    one_process, tmp_path, sig, resume
):
    # The signal goes to the driver's whole process group, as Ctrl-C at a terminal sends SIGINT and
    # a Prefect worker cancelling a flow run sends SIGTERM: the local Ray instance's processes are in
    # that group and must outlive it until every rank has stopped at its step with a checkpoint.
    one, _ = one_process
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path / "out", {"processes": 2})))
    init = stage_dir(one, "sft") / "model"
    command = [sys.executable, "-m", "rft", "train", "rl", "--config", str(path), "--init-model", str(init),
               "--out", str(tmp_path / "rl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "stopped.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"rl ([3-9]|1[01])/12 iterations", log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        proc.kill()
    text = log.read_text()
    match = re.search(r"stopped: rl stopped at step (\d+) of 12 on request; checkpoint (\S+)", text)
    assert match, text[-3000:]
    step = int(match.group(1))
    assert step < 12 and Path(match.group(2)).is_dir()
    assert not (tmp_path / "rl" / "model").exists()  # stopped, not finished
    ranks = re.findall(r"rank (\d): pid (\d+)", text)
    assert {r for r, _ in ranks} == {"0", "1"}
    assert not wait_gone({int(pid) for _, pid in ranks}, timeout_s=30)  # no rank left behind
    assert f"{sig.name}: stopping after the current training step" in text
    assert "Traceback" not in text
    if not resume:  # the rerun is the same for either signal: once is enough
        return

    # The same command resumes from the checkpoint, and ends with the straight one-process weights.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming RL from {match.group(2)}" in done.stderr
    resumed = load_file(str(tmp_path / "rl" / "model" / "model.safetensors"))
    moved = max_difference(weights(one, "rl"), weights(one, "sft"))
    assert max_difference(weights(one, "rl"), resumed) < moved * 1e-3


def test_a_killed_driver_leaves_no_process_of_its_ray_instance_behind(one_process, tmp_path):
    # kill -9 of the process that started the stage's Ray instance (rft train here; a flow run under
    # a worker the same): Ray's ranks die with its raylet, and rft's reaper ends the rest of it.
    from ray_fixtures import descendants, stats

    one, _ = one_process
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path / "out", {"processes": 2}, rl={"iterations": 200})))
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rft", "train", "rl", "--config", str(path),
             "--init-model", str(stage_dir(one, "sft") / "model")],
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"rl [1-9]\d*/200 iterations", log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        started = descendants({proc.pid})  # Ray's processes (gcs, raylet, agents, ranks), its reaper
        ranks = {int(pid) for pid in re.findall(r"rank \d: pid (\d+)", log.read_text())}
        assert ranks <= started and len(ranks) == 2
    finally:
        proc.kill()
        proc.wait()
    left = wait_gone(started, timeout_s=60)
    assert not left, {pid: stats().get(pid) for pid in left}


FAILING_GRADER = {"type": "python", "source": "def grade(sample, item):\n    raise ValueError('no grade')\n"}


@pytest.mark.parametrize(
    ("sections", "error"),
    [
        # Every sample a grader error: the RL iteration refuses to train on it (grader.max_error_share).
        ({"grader": {"spec": FAILING_GRADER}}, r"GraderFailing: RL iteration 1: the grader failed on 8 of 8 samples"),
        # Non-finite weights after the first step (training.Processes.step; every rank agrees on it).
        ({"rl": {"lr": 1e30}}, r"TrainingDiverged: RL iteration 1: non-finite weights after an optimizer step at "
                               r"lr 1e\+30 .*Lower rl\.lr \(now 1e\+30\) and run again"),
    ],
    ids=["grader-failing", "non-finite"],
)
def test_a_rank_that_raises_fails_the_stage_with_its_error_and_rank(one_process, tmp_path, sections, error):
    # Both processes stop on the same guard at the same step; rank 0 is named with its error, rank 1
    # said to have failed the same way, and no resume is offered (the same command would fail again).
    one, _ = one_process
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path / "out", {"processes": 2}, **sections)))
    init = stage_dir(one, "sft") / "model"
    done = subprocess.run(
        [sys.executable, "-m", "rft", "train", "rl", "--config", str(path), "--init-model", str(init)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert re.match(r"error: rl failed on rank 0 of 2 \(pid \d+ on \S+\): " + error, lines[0]), lines[0]
    assert lines[0].endswith("; rank 1 failed the same way"), lines[0]
    assert "Traceback" not in done.stderr.split(lines[0])[-1]
    ranks = {int(pid) for pid in re.findall(r"rank \d: pid (\d+)", done.stderr)}
    assert len(ranks) == 2 and not wait_gone(ranks, timeout_s=30)  # no rank left behind


# --------------------------------------------------------------------------- a Ray cluster


# --------------------------------------------------------------------------- the deployed flow


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, cluster: RayCluster):
    """A Prefect server, an MLflow server, the rft-pipeline deployment of deployments/prefect.yaml
    and a process worker whose flow runs can reach the Ray cluster."""
    from test_operations import POOL, PREFECT_FILE, Ops, free_port

    tmp = tmp_path_factory.mktemp("deployed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    ops = Ops(tmp, free_port(), free_port(), env)
    env.update({
        "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": ops.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
        "MLFLOW_TRACKING_URI": ops.mlflow_uri, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "2", "PYTHONPATH": str(ROOT),
        **{k: v for k, v in cluster.env.items() if k.startswith("RAY_")},
    })
    try:
        ops.start_mlflow()
        ops.start_prefect()
        ops.cli("prefect", "work-pool", "create", POOL, "--type", "process")
        ops.cli("prefect", "deploy", "--prefect-file", PREFECT_FILE, "--name", "rft-pipeline", timeout=300)
        ops.cli("prefect", "deployment", "schedule", "pause", "--all")
        ops.start_worker()
        yield ops
    finally:
        leftovers = ops.stop_all()
        assert not leftovers, f"still running after teardown: {leftovers}"


def test_the_deployed_flow_survives_a_rank_killed_mid_rl_and_its_retry_resumes_to_the_one_process_result(
    one_process, cluster: RayCluster, deployed, tmp_path
):
    from test_operations import PIPELINE, stage_states

    ops = deployed
    one, _ = one_process
    out = tmp_path / "deployed"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_dict(out)))
    compute = {"processes": 1, "machines": 2, "address": cluster.address}
    flow_run_id = ops.run_deployment(PIPELINE, config_path=str(path), overrides=[], compute=compute)

    # Once RL has checkpointed an iteration, kill -9 the process of rank 1 (a node's OOM killer, say).
    client = ops.mlflow()
    deadline = time.monotonic() + 600
    ranks, rl_run = None, None
    while True:
        assert time.monotonic() < deadline, ops.services["worker"].tail(80)
        run = ops.flow_run(flow_run_id)
        assert not (run.state and run.state.is_final()), f"{run.state_name}: {run.state.message}"
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string="tags.`rft.stage` = 'rl'",
        )
        rl_run = next((r for r in runs if "rft.compute.ranks" in r.data.tags), None)
        checkpoints = list((out / "stages").glob("rl-*/checkpoints/step-*"))
        if rl_run is not None and checkpoints:
            ranks = json.loads(rl_run.data.tags["rft.compute.ranks"])
            break
        time.sleep(0.5)
    os.kill(ranks["1"]["pid"], signal.SIGKILL)
    run = ops.wait(flow_run_id, timeout_s=300)
    assert run.state.is_failed(), run.state
    assert re.search(r"rl failed on rank 1 of 2 \(pid \d+ on \S+\): its process died", run.state.message), run.state.message
    first = stage_states(ops.task_runs(flow_run_id), attempt=1)
    assert first["sft"] == "Completed" and first["rl"] == "Failed", first
    # Nothing left running: both ranks, Ray Train's processes of the stage, the flow run's process.
    assert not wait_gone({info["pid"] for info in ranks.values()}, timeout_s=60)
    deadline = time.monotonic() + 60
    while cluster.workers() and time.monotonic() < deadline:
        time.sleep(1)
    assert not cluster.workers(), cluster.workers()
    # The rank's error is in the task's log and on the MLflow run.
    assert any("rl failed on rank 1 of 2" in message for message in flow_logs(ops, flow_run_id))
    failed = client.get_run(rl_run.info.run_id)
    assert failed.info.status == "FAILED"
    assert "rank 1 of 2" in failed.data.tags["rft.ended_because"]

    # Retried in place: sft is cached, rl resumes from its last checkpoint and ends where one process does.
    out_text = ops.cli("prefect", "flow-run", "retry", str(flow_run_id)).stdout
    assert "scheduled for retry" in out_text
    ops.wait_completed(flow_run_id, timeout_s=600)
    second = stage_states(ops.task_runs(flow_run_id), attempt=2)
    assert second["sft"] == "Cached" and second["rl"] == "Completed", second
    logs = flow_logs(ops, flow_run_id)
    assert any(message.startswith("resuming RL from ") for message in logs), logs[-40:]
    assert any(re.match(r"rl \d+/12 iterations", message) for message in logs)  # progress, in the task log
    assert max_difference(weights(one, "rl"), weights(out, "rl")) < max_difference(
        weights(one, "rl"), weights(one, "sft")) * 1e-3
    rl_run = client.get_run(rl_run.info.run_id)
    assert rl_run.info.status == "FINISHED" and rl_run.data.tags["rft.attempts"] == "2"
    # Iterations after the last checkpoint ran twice (before the kill, after the resume): each step is there.
    steps = [m.step for m in client.get_metric_history(rl_run.info.run_id, "rl/reward_mean")]
    assert sorted(set(steps)) == list(range(1, 13))

    # SFT ran uninterrupted, one process on each node, and ended where one process does: one
    # FINISHED run, its metrics logged once per step (by rank 0), where each rank ran on it.
    assert_same_sft(one, out)
    (sft_run,) = client.search_runs([rl_run.info.experiment_id], filter_string="tags.`rft.stage` = 'sft'")
    assert sft_run.info.status == "FINISHED" and sft_run.data.params["compute.machines"] == "2"
    placed = json.loads(sft_run.data.tags["rft.compute.ranks"])
    assert sorted(placed) == ["0", "1"] and len({info["node"] for info in placed.values()}) == 2
    assert [m.step for m in client.get_metric_history(sft_run.info.run_id, "sft/loss")] == [1, 2, 3, 4]
    assert any(re.match(r"rl: 2 processes on 2 machine\(s\): rank 0: pid \d+ ", message) for message in logs)


def flow_logs(ops, flow_run_id: uuid.UUID) -> list[str]:
    """Every log line of the flow run (both attempts), oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    messages: list[str] = []
    with ops.client() as client:
        while True:
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    limit=200, offset=len(messages))
            messages += [log.message for log in page]
            if len(page) < 200:
                return messages
