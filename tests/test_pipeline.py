"""The pipeline flow end to end: real Prefect API (test harness), real MLflow (sqlite), tiny model.

Covers stage tracking, the registry gate through the flow, rerun after a failed stage (cache hits),
a changed section re-running only its stage and what follows, SIGKILL mid-RL then resume, and
reloading the registered model with identical logits; what a run shows a person: the training
curve (file, parent-run artifact, Prefect artifact link, `rft run` output), the rollout samples
table of the rl run, the registered version's description.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from rft.cli import app
from rft_core import tracking
from rft_core.config import RFTConfig

TINY = {
    "data": {"synthetic": {"n_train": 96, "n_val": 16, "max_steps": 2}},
    "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                       "vocab_size": 320, "pretrain_steps": 5}},
    "sft": {"batch_size": 8, "max_steps": 6, "checkpoint_interval": 3},
    "rl": {"iterations": 2, "prompts_per_iteration": 4, "samples_per_prompt": 2, "minibatch_size": 8,
           "max_new_tokens": 24, "eval_interval": 0, "checkpoint_interval": 1, "lr": 1e-3,
           "critic_warmup": 0},
    "eval": {"max_new_tokens": 24, "k": 2},
    "grader": {"spec": {"type": "numeric_match", "partial_credit": 0.1}},
}


def config(out: Path, **sections) -> RFTConfig:
    raw = {**TINY, **sections, "output_dir": str(out)}
    return RFTConfig.from_dict(raw)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def uninterrupted(prefect_api, tmp_path_factory):
    from flows.pipeline import rft_pipeline

    out = tmp_path_factory.mktemp("uninterrupted")
    cfg = config(out)
    return cfg, rft_pipeline(config=cfg)


def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def child_runs(client: MlflowClient, parent_run_id: str) -> dict[str, object]:
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {run.info.run_name: run for run in runs}


def test_pipeline_tracks_every_stage_and_promotes_the_first_model(uninterrupted):
    cfg, summary = uninterrupted
    client = MlflowClient(summary["tracking_uri"])
    children = child_runs(client, summary["mlflow_run_id"])
    assert set(children) == {"validate", "split", "sft", "rl", "evaluate"}
    assert all(run.info.status == "FINISHED" for run in children.values())
    sft_keys = set(children["sft"].data.metrics)
    assert {"sft/loss", "sft/lr", "sft/val_accuracy"} <= sft_keys
    rl_history = client.get_metric_history(children["rl"].info.run_id, "rl/reward_mean")
    assert [m.step for m in rl_history] == [1, 2]
    assert {"rl/kl", "rl/pg_loss", "rl/vf_loss", "rl/clipfrac", "rl/approx_kl", "rl/entropy",
            "rl/response_length", "rl/grader_errors", "rl/rollout_tokens_per_s"} <= set(children["rl"].data.metrics)
    assert {"eval/accuracy", "eval/reward_mean", "eval/pass_at_2", "eval/maj_at_2", "eval/sft/accuracy"} <= set(
        children["evaluate"].data.metrics
    )
    assert children["split"].inputs.dataset_inputs  # train/validation datasets with digests
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert "config.yaml" in artifacts
    eval_artifacts = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"samples_rl.json", "samples_sft.json", "report.md"} <= eval_artifacts
    assert summary["registered"] == {"name": "rft-model", "version": 1}
    assert summary["gate"]["promoted"] is True
    model = client.get_registered_model("rft-model")
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1", "challenger": "1"}
    version = client.get_model_version("rft-model", "1")
    assert version.tags["gate.decision"] == "promoted"
    assert float(version.tags["metric.eval/accuracy"]) == summary["metrics"]["rl"]["accuracy"]
    # Every stage timed, in the order it ran, in the summary and as the parent run's time/<stage>;
    # the tiny model's pretraining (inside the sft stage) apart, as what it is.
    assert list(summary["seconds"]) == ["validate", "split", "pretrain", "sft", "rl", "evaluate", "register", "promote"]
    assert all(seconds > 0 for seconds in summary["seconds"].values())
    parent = client.get_run(summary["mlflow_run_id"])
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("time/")} == {
        f"time/{stage}": seconds for stage, seconds in summary["seconds"].items()
    }
    assert not [k for k in parent.data.tags if k.startswith("rft.reused.")]  # nothing was cached


def assert_training_curve_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (800, 450) and len(data) > 10_000


def evaluation_artifacts() -> list[str]:
    """The markdown of every `rft-evaluation` artifact the Prefect API holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rft-evaluation"])))
    return [artifact.data for artifact in found]


def test_the_training_curve_is_drawn_logged_on_the_parent_run_and_linked_from_the_prefect_artifact(
    uninterrupted, capsys
):
    from rft.run import print_summary

    cfg, summary = uninterrupted
    run_id = summary["mlflow_run_id"]
    path = Path(summary["training_curve"])
    assert path == Path(cfg.output_dir).resolve() / "runs" / run_id / "training_curve.png"
    assert_training_curve_png(path)
    logged = {a.path: a.file_size for a in MlflowClient(summary["tracking_uri"]).list_artifacts(run_id)}
    assert logged["training_curve.png"] == path.stat().st_size
    report = next(markdown for markdown in evaluation_artifacts() if f"runs:/{run_id}/" in markdown)
    assert f"Training curve: [{path}]({path.as_uri()})" in report
    assert f"in MLflow `runs:/{run_id}/training_curve.png`: " in report
    print_summary(summary)
    assert f"Training curve: {path}\n" in capsys.readouterr().out


def test_the_rl_run_has_a_table_of_rollout_samples_from_several_iterations(uninterrupted):
    _, summary = uninterrupted
    client = MlflowClient(summary["tracking_uri"])
    rl = child_runs(client, summary["mlflow_run_id"])["rl"]
    table = client.load_table(rl.info.experiment_id, "rollout_samples.json", run_ids=[rl.info.run_id])
    assert {"iteration", "prompt", "completion", "reward", "error", "sub_rewards", "reference"} <= set(table.columns)
    # rl.iterations=2, eval_interval=0: the first and the last; 4 prompts x 2 samples each.
    assert table.groupby("iteration").size().to_dict() == {1: 8, 2: 8}
    assert table["prompt"].str.len().min() > 0 and table["reference"].notna().all()
    assert table["reward"].between(0, 1).all() and (table["error"] == "").all()
    assert all(json.loads(text) == {} for text in table["sub_rewards"])  # numeric_match has no sub-graders


def test_the_registered_version_says_what_it_is_and_what_the_gate_decided(uninterrupted):
    _, summary = uninterrupted
    client = MlflowClient(summary["tracking_uri"])
    version = client.get_model_version("rft-model", "1")
    text = version.description
    assert "| base model | the built-in tiny model (`tiny`: a Llama-style decoder, 2 layers of width 32" in text
    assert "built-in synthetic arithmetic task" in text
    assert f"| validation data digest | `{version.tags['data_digest']}` |" in text
    assert "warm-up SFT then PPO (2 iterations" in text
    metrics = summary["metrics"]
    for name, label in (("sft", "SFT"), ("rl", "PPO")):
        figures = metrics[name]
        row = f"| {label} | {figures['accuracy']:.4f} | {figures['reward_mean']:.4f} | {figures['sampled_reward_mean']:.4f} |"
        assert row in text
    rule = summary["gate"]["rule"]
    assert f"### Gate\n\n**promoted** to champion on `eval/accuracy` (rule `{rule}`): {summary['gate']['reason']}" in text
    assert "Not decided yet" not in text


def test_rerun_from_the_cli_reuses_every_stage_and_still_draws_and_prints_its_curve(uninterrupted, tmp_path):
    cfg, first = uninterrupted
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    result = CliRunner().invoke(app, ["run", "--config", str(config_file)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = [line for line in result.output.splitlines() if line.startswith("Training curve: ")]
    path = Path(printed[0].removeprefix("Training curve: "))
    run_id = path.parent.name
    assert run_id != first["mlflow_run_id"] and path != Path(first["training_curve"])
    assert_training_curve_png(path)
    client = MlflowClient(first["tracking_uri"])
    reused = {k for k in client.get_run(run_id).data.tags if k.startswith("rft.reused.")}
    assert reused == {f"rft.reused.{stage}" for stage in ("validate", "split", "sft", "rl", "evaluate")}
    assert "training_curve.png" in {a.path for a in client.list_artifacts(run_id)}
    assert any(f"runs:/{run_id}/training_curve.png" in markdown for markdown in evaluation_artifacts())


def test_registered_champion_reloads_with_identical_logits(uninterrupted):
    from rft_core.models import load_model, load_tokenizer

    cfg, summary = uninterrupted
    model, tokenizer = tracking.load_logged_model("models:/rft-model@champion", tracking_uri=summary["tracking_uri"])
    local = load_model(summary["model_dir"], cfg.model).eval()
    ids = torch.tensor([load_tokenizer(summary["model_dir"])("Ann has 3 pens. Bob has")["input_ids"]])
    assert torch.equal(model(ids).logits, local(ids).logits)


def test_rerun_after_rl_failure_reuses_earlier_stages_and_matches_an_uninterrupted_run(
    uninterrupted, tmp_path, monkeypatch
):
    from flows.pipeline import rft_pipeline

    _, reference = uninterrupted
    cfg = config(tmp_path)
    monkeypatch.setenv("RFT_FAIL_STAGE", "rl")
    failed = rft_pipeline(config=cfg, return_state=True)
    assert failed.is_failed()
    assert "failing the rl stage on purpose" in str(failed.result(raise_on_failure=False))
    sft_dir = next((tmp_path / "stages").glob("sft-*"))
    sft_mtime = (sft_dir / "model" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.delenv("RFT_FAIL_STAGE")

    state = rft_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    summary = state.result()
    states = task_states(state.state_details.flow_run_id)
    assert states["validate"] == states["split"] == states["sft"] == "Cached"
    assert states["rl"] == states["evaluate"] == "Completed"
    assert (sft_dir / "model" / "model.safetensors").stat().st_mtime_ns == sft_mtime
    assert summary["metrics"] == reference["metrics"]  # same config, same data: same numbers on CPU
    # The rerun's parent run points at the failed run's stage runs it reused.
    client = MlflowClient(summary["tracking_uri"])
    tags = client.get_run(summary["mlflow_run_id"]).data.tags
    reused = {k.removeprefix("rft.reused."): v for k, v in tags.items() if k.startswith("rft.reused.")}
    assert set(reused) == {"validate", "split", "sft"}
    for stage, run_id in reused.items():
        run = client.get_run(run_id).data.tags
        assert run["rft.stage"] == stage and run["mlflow.parentRunId"] != summary["mlflow_run_id"]


def test_changing_the_rl_section_reruns_rl_and_what_follows_only(uninterrupted, tmp_path):
    from flows.pipeline import rft_pipeline

    cfg = config(tmp_path)
    first = rft_pipeline(config=cfg, return_state=True)
    changed = cfg.model_copy(update={"rl": cfg.rl.model_copy(update={"lr": 5e-4})})
    state = rft_pipeline(config=changed, return_state=True)
    states = task_states(state.state_details.flow_run_id)
    assert states["validate"] == states["split"] == states["sft"] == "Cached"
    assert states["rl"] == states["evaluate"] == "Completed"
    again = rft_pipeline(config=changed, return_state=True, fresh=True)
    assert set(task_states(again.state_details.flow_run_id).values()) == {"Completed"}
    assert first.is_completed() and again.is_completed()


def test_gate_refuses_an_equal_model_then_promote_force_and_rollback_move_the_alias(uninterrupted, tmp_path):
    from flows.pipeline import rft_pipeline

    cfg, reference = uninterrupted
    uri = reference["tracking_uri"]
    again = rft_pipeline(config=cfg, fresh=True)  # same config, same store: an equal challenger
    assert again["gate"]["promoted"] is False
    assert "not better" in again["gate"]["reason"]
    version = again["registered"]["version"]
    client = MlflowClient(uri)
    assert client.get_model_version("rft-model", str(version)).tags["gate.decision"] == "refused"
    assert str(client.get_registered_model("rft-model").aliases["champion"]) == "1"

    runner = CliRunner()
    result = runner.invoke(app, ["promote", "rft-model", str(version), "--force", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert str(client.get_registered_model("rft-model").aliases["champion"]) == str(version)
    result = runner.invoke(app, ["rollback", "rft-model", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert str(client.get_registered_model("rft-model").aliases["champion"]) == "1"
    listing = runner.invoke(app, ["models", "rft-model", "--tracking-uri", uri, "--json"])
    assert listing.exit_code == 0 and '"champion"' in listing.output


@pytest.mark.slow
def test_sigkill_during_rl_then_rerun_resumes_from_the_last_checkpoint(uninterrupted, tmp_path, prefect_api):
    cfg, reference = uninterrupted
    slow_rl = {**TINY["rl"], "iterations": 6, "checkpoint_interval": 2}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY, "rl": slow_rl, "output_dir": str(tmp_path / "out")}))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rft", "run", "--config", str(cfg_file), "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    checkpoint = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted((tmp_path / "out" / "stages").glob("rl-*/checkpoints/step-2"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.2)
    assert checkpoint is not None, "the RL stage never wrote its first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming RL from" in rerun.stderr + rerun.stdout
    resumed_at = [line for line in (rerun.stderr + rerun.stdout).splitlines() if "resuming RL from" in line]
    assert "(iteration 2)" in resumed_at[0] or "(iteration 4)" in resumed_at[0]

    # The same config run without interruption gives the same final model.
    straight = subprocess.run(
        [*cmd[:-1], "--set", f"output_dir={tmp_path / 'straight'}", "--json"], env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    from safetensors.torch import load_file

    killed_dir = next((tmp_path / "out" / "stages").glob("rl-*")) / "model" / "model.safetensors"
    straight_dir = next((tmp_path / "straight" / "stages").glob("rl-*")) / "model" / "model.safetensors"
    a, b = load_file(str(killed_dir)), load_file(str(straight_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- nothing broken is registered


def registered_names(uri: str) -> set[str]:
    return {model.name for model in MlflowClient(uri).search_registered_models()}


def test_a_run_that_diverges_fails_at_the_iteration_and_registers_nothing(uninterrupted, tmp_path):
    from flows.pipeline import rft_pipeline

    cfg = config(tmp_path, rl={**TINY["rl"], "lr": 1e30, "iterations": 4}, registry={"model_name": "rft-diverged"})
    state = rft_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert message.startswith("RL iteration ") and "Lower rl.lr (now 1e+30)" in message
    states = task_states(state.state_details.flow_run_id)
    assert states["rl"] == "Failed" and "evaluate" not in states and "register" not in states
    uri = tracking.resolve_tracking_uri(cfg)
    assert "rft-diverged" not in registered_names(uri)
    rl_run = next(run for name, run in child_runs(MlflowClient(uri), _parent_of(uri, cfg)).items() if name == "rl")
    assert rl_run.info.status == "FAILED"


def _parent_of(uri: str, cfg: RFTConfig) -> str:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`rft.kind` = 'pipeline'", order_by=["start_time DESC"])
    return runs[0].info.run_id


def test_a_grader_that_always_fails_fails_the_run_before_anything_is_registered(uninterrupted, tmp_path):
    from flows.pipeline import rft_pipeline

    source = "def grade(sample, item):\n    raise ValueError('no grade today')\n"
    cfg = config(tmp_path, grader={"spec": {"type": "python", "source": source}, "timeout_s": 30},
                 registry={"model_name": "rft-ungraded"})
    state = rft_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "the grader failed on" in message and "no grade today" in message
    assert "rft-ungraded" not in registered_names(tracking.resolve_tracking_uri(cfg))


def test_stages_retry_only_failures_that_may_pass_by_themselves(prefect_api):
    from prefect import flow, task

    from tasks.stages import transient_failure

    calls: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient_failure)
    def fails_with(error: Exception) -> None:
        calls.append(type(error).__name__)
        raise error

    @flow
    def run_once(error: Exception):
        return fails_with(error, return_state=True)

    for error, attempts in (
        (FileNotFoundError("data/train.jsonl"), 1),
        (ValueError("registry.model_name 'a/b'"), 1),
        (ConnectionRefusedError("127.0.0.1:5000"), 3),
        (TimeoutError("the tracking server did not answer"), 3),
    ):
        calls.clear()
        run_once(error, return_state=True)
        assert len(calls) == attempts, (error, calls)
