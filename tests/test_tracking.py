"""rft_core.tracking against a real MLflow sqlite store: runs, metrics, artifacts, tables, datasets,
the registry's promotion gate, its lock, rollback, and the registry CLI commands."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import typer
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from rft.registry import models_cmd, promote_cmd, rollback_cmd
from rft_core import tracking
from rft_core.config import RegistryConfig, RFTConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module (creating its tables takes seconds); tests use distinct names."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db"


@pytest.fixture(autouse=True)
def _use_store(store: str) -> None:
    tracking.configure(store)


@pytest.fixture(scope="module")
def model_uri(store: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A logged model the registry tests register as many versions (the gate never loads it)."""
    model_dir = tmp_path_factory.mktemp("fake_model")
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "tokenizer.json").write_text("{}")
    cfg = RFTConfig(experiment="registry-tests")
    run_id = tracking.start_pipeline_run(cfg, tracking_uri=store)
    return tracking.log_model(run_id, model_dir, tracking_uri=store)


def client(store: str) -> MlflowClient:
    return MlflowClient(tracking_uri=store, registry_uri=store)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- tracking URI


def test_tracking_uri_comes_from_config_then_env_then_local_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RFTConfig(output_dir=str(tmp_path / "out"))
    assert tracking.resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path}/out/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(cfg) == "http://127.0.0.1:5000"
    cfg.tracking.tracking_uri = "sqlite:////elsewhere/x.db"
    assert tracking.resolve_tracking_uri(cfg) == "sqlite:////elsewhere/x.db"
    assert (
        tracking.ui_command(f"sqlite:///{tmp_path}/mlflow.db")
        == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db"
    )
    assert tracking.ui_command("http://host:5000") == "http://host:5000"


def test_configuring_a_store_leaves_mlflow_tracking_uri_to_the_user(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = f"sqlite:///{tmp_path}/first/mlflow.db"
    tracking.configure(first)
    assert tracking.current_tracking_uri() == mlflow.get_tracking_uri() == mlflow.get_registry_uri() == first
    # MLflow exported it as MLFLOW_TRACKING_URI; the next pipeline would have taken it as the user's.
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    cfg = RFTConfig(output_dir=str(tmp_path / "next"))
    assert tracking.resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path}/next/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    tracking.configure(f"sqlite:///{tmp_path}/second/mlflow.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == store


def test_dead_server_is_reported_quickly_with_its_uri() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=uri.replace(".", r"\.")):
        tracking.start_pipeline_run(RFTConfig(), tracking_uri=uri)
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------- runs


def test_pipeline_run_has_config_artifact_flat_params_and_digest_tag(store: str) -> None:
    cfg = RFTConfig(experiment="runs-tests", run_name="demo")
    run_id = tracking.start_pipeline_run(cfg, tracking_uri=store)
    run = client(store).get_run(run_id)
    assert run.info.run_name == "demo"
    assert client(store).get_experiment(run.info.experiment_id).name == "runs-tests"
    assert run.data.tags["config_digest"] == cfg.digest()
    assert run.data.params["sft.lr"] == str(cfg.sft.lr)
    assert run.data.params["model.lora.r"] == str(cfg.model.lora.r)
    assert run.data.params["experiment"] == "runs-tests"
    logged = Path(client(store).download_artifacts(run_id, "config.yaml"))
    assert yaml.safe_load(logged.read_text()) == cfg.model_dump(mode="json")
    # Artifacts of a local store live next to the database, not in ./mlruns of the cwd.
    db_dir = Path(tracking.sqlite_path(store)).parent
    assert run.info.artifact_uri.startswith(str(db_dir / "mlartifacts"))


def test_stage_runs_are_children_and_a_retry_reuses_its_run(store: str) -> None:
    parent = tracking.start_pipeline_run(RFTConfig(experiment="runs-tests"), tracking_uri=store)
    sft = tracking.start_stage_run(parent, "sft", {"lr": 0.001})
    run = client(store).get_run(sft)
    assert run.info.run_name == "sft"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["config_digest"] == client(store).get_run(parent).data.tags["config_digest"]
    assert run.data.params["lr"] == "0.001"
    tracking.end_run(sft, "FAILED")
    assert client(store).get_run(sft).info.status == "FAILED"

    assert tracking.find_stage_run(parent, "sft") == sft
    assert tracking.find_stage_run(parent, "rl") is None
    retried = tracking.start_stage_run(parent, "sft", {"lr": 0.001})
    assert retried == sft
    assert client(store).get_run(sft).info.status == "RUNNING"
    assert client(store).get_run(sft).data.tags["rft.attempts"] == "2"
    tracking.end_run(sft)
    assert client(store).get_run(sft).info.status == "FINISHED"
    fresh = tracking.start_stage_run(parent, "sft", reuse=False)
    assert fresh != sft
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracking.end_run(fresh, "DONE")  # type: ignore[arg-type]


def test_pipeline_run_is_reopened_for_its_flow_run_and_ended_by_how_the_block_ends(store: str) -> None:
    cfg = RFTConfig(experiment="open-close-tests")
    with pytest.raises(RuntimeError, match="stage broke"), tracking.pipeline_run(
        cfg, tracking_uri=store, flow_run_id="flow-1"
    ) as parent:
        assert client(store).get_run(parent).info.status == "RUNNING"
        with pytest.raises(RuntimeError), tracking.stage_run(parent, "rl", {"lr": 0.5}) as rl:
            raise RuntimeError("stage broke")
        assert client(store).get_run(rl).info.status == "FAILED"
        raise RuntimeError("stage broke")
    run = client(store).get_run(parent)
    assert run.info.status == "FAILED"
    assert run.data.tags["prefect.flow_run_id"] == "flow-1"
    assert run.data.tags["rft.kind"] == "pipeline"
    assert run.data.tags["config_digest"] == cfg.digest()

    # The retried flow run continues the same parent run and the same stage run.
    with tracking.pipeline_run(cfg, tracking_uri=store, flow_run_id="flow-1") as retried:
        assert retried == parent and client(store).get_run(parent).info.status == "RUNNING"
        with tracking.stage_run(parent, "rl", {"lr": 0.5}) as rl_again:
            assert rl_again == rl
        assert client(store).get_run(rl).info.status == "FINISHED"
        assert client(store).get_run(rl).data.tags["rft.attempts"] == "2"
    assert client(store).get_run(parent).info.status == "FINISHED"

    # Another flow run, or none, gets a run of its own.
    with tracking.pipeline_run(cfg, tracking_uri=store, flow_run_id="flow-2") as other:
        assert other != parent
    with tracking.pipeline_run(cfg, tracking_uri=store, run_name="adhoc", tags={"rft.kind": "x"}) as adhoc:
        pass
    run = client(store).get_run(adhoc)
    assert adhoc not in (parent, other) and run.info.run_name == "adhoc"
    assert run.data.tags["rft.kind"] == "x" and "prefect.flow_run_id" not in run.data.tags


def test_config_tags_are_the_parent_run_tags_taken_from_the_config() -> None:
    cfg = RFTConfig()
    assert tracking.config_tags(cfg) == {"config_digest": cfg.digest(), "rft.grader.sandbox": "namespaces"}
    unisolated = RFTConfig.load(None, ["grader.sandbox=none"])
    assert tracking.config_tags(unisolated)["rft.grader.sandbox"] == "none"


def test_metrics_logger_namespaces_keys_and_keeps_steps(store: str) -> None:
    import numpy as np

    parent = tracking.start_pipeline_run(RFTConfig(experiment="runs-tests"), tracking_uri=store)
    rl = tracking.start_stage_run(parent, "rl")
    log = tracking.metrics_logger(rl, "rl")
    for step in range(3):
        log({"reward_mean": 0.1 * step, "kl": np.float32(0.5), "rl/clipfrac": 0.0, "maybe": None}, step)
    history = client(store).get_metric_history(rl, "rl/reward_mean")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert set(client(store).get_run(rl).data.metrics) == {"rl/reward_mean", "rl/kl", "rl/clipfrac"}
    with pytest.raises(TypeError, match="rl/text"):
        log({"text": "not a number"}, 3)


def test_artifacts_tables_and_tags(store: str, tmp_path: Path) -> None:
    parent = tracking.start_pipeline_run(RFTConfig(experiment="runs-tests"), tracking_uri=store)
    run_id = tracking.start_stage_run(parent, "evaluate")
    (tmp_path / "report.json").write_text('{"accuracy": 0.5}')
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("a")
    tracking.log_artifact(run_id, tmp_path / "report.json", "reports")
    tracking.log_artifact(run_id, tmp_path / "dir", "manifest")
    rows = [
        {"prompt": "1+1?", "completion": "2", "reward": 1.0},
        {"prompt": "2+2?", "completion": "5", "reward": 0.0},
    ]
    tracking.log_table(run_id, rows, "samples/eval.json")
    tracking.set_tags(run_id, {"data_digest": "abc", "n": 3})

    c = client(store)
    names = {f.path for f in c.list_artifacts(run_id, "reports")} | {
        f.path for f in c.list_artifacts(run_id, "manifest")
    }
    assert names == {"reports/report.json", "manifest/a.txt"}
    run = c.get_run(run_id)
    assert {"path": "samples/eval.json", "type": "table"} in json.loads(
        run.data.tags["mlflow.loggedArtifacts"]
    )
    table = json.loads(Path(c.download_artifacts(run_id, "samples/eval.json")).read_text())
    assert [dict(zip(table["columns"], row, strict=True)) for row in table["data"]] == rows
    assert len(c.load_table(run.info.experiment_id, "samples/eval.json", run_ids=[run_id])) == 2
    assert run.data.tags["data_digest"] == "abc" and run.data.tags["n"] == "3"
    with pytest.raises(FileNotFoundError):
        tracking.log_artifact(run_id, tmp_path / "missing.txt")


def test_table_logger_appends_to_one_table_and_a_retry_does_not_repeat_an_iteration(store: str) -> None:
    parent = tracking.start_pipeline_run(RFTConfig(experiment="runs-tests"), tracking_uri=store)
    run_id = tracking.start_stage_run(parent, "rl")

    def rows(iteration: int) -> list[dict[str, object]]:
        return [{"iteration": iteration, "completion": f"#### {i}", "reward": i / 2} for i in range(2)]

    log_rows = tracking.table_logger(run_id, "rollout_samples.json", tracking_uri=store)
    log_rows(rows(1))
    log_rows(rows(2))
    # A retried stage continues the run: its logger finds iterations 1 and 2 already there.
    retried = tracking.table_logger(run_id, "rollout_samples.json", tracking_uri=store)
    retried(rows(2))
    retried(rows(3))

    c = client(store)
    table = c.load_table(c.get_run(run_id).info.experiment_id, "rollout_samples.json", run_ids=[run_id])
    assert table.to_dict("records") == rows(1) + rows(2) + rows(3)
    assert {"path": "rollout_samples.json", "type": "table"} in json.loads(
        c.get_run(run_id).data.tags["mlflow.loggedArtifacts"]
    )


def test_artifact_link_is_the_server_page_or_the_ui_command(store: str) -> None:
    run_id = tracking.start_pipeline_run(RFTConfig(experiment="runs-tests"), tracking_uri=store)
    assert tracking.artifact_link(run_id, "training_curve.png", store) == (
        f"`mlflow ui --backend-store-uri {store}`, then run {run_id}, Artifacts, training_curve.png"
    )


def test_datasets_are_logged_as_inputs_with_digest_and_context(store: str, tmp_path: Path) -> None:
    parent = tracking.start_pipeline_run(RFTConfig(experiment="runs-tests"), tracking_uri=store)
    run_id = tracking.start_stage_run(parent, "split")
    frame = pd.DataFrame({"id": ["a", "b"], "prompt": ["1+1?", "2+2?"], "reference": ["2", "4"]})
    path = tmp_path / "val.jsonl"
    frame.to_json(path, orient="records", lines=True)
    long_digest = "f" * 64
    tracking.log_dataset(run_id, frame, "train", "d1" * 8, "train", source=tmp_path / "train.jsonl")
    tracking.log_dataset(run_id, path, "validation", long_digest, "validation")

    inputs = client(store).get_run(run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"train", "validation"}
    train, val = by_name["train"], by_name["validation"]
    assert train.dataset.digest == "d1" * 8
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "train"
    assert json.loads(train.dataset.profile)["num_rows"] == 2
    assert json.loads(train.dataset.source)["uri"].endswith("train.jsonl")
    assert val.dataset.digest == long_digest[:36]
    assert {t.key: t.value for t in val.tags} == {
        "mlflow.data.context": "validation",
        "rft.digest": long_digest,
    }
    assert json.loads(val.dataset.source)["uri"] == str(path)


# --------------------------------------------------------------------------- registry and gate


def register(model_uri: str, name: str, value: float | None, data: str = "val-1") -> int:
    metrics = {} if value is None else {"eval/accuracy": value}
    return tracking.register_model(model_uri, name, metrics=metrics, data_digest=data, config_digest="cfg")


def gate(
    name: str, version: int, *, greater_is_better: bool = True, min_improvement: float = 0.0, **kwargs: object
) -> tracking.GateDecision:
    rules = RegistryConfig(
        model_name=name,
        metric="eval/accuracy",
        greater_is_better=greater_is_better,
        min_improvement=min_improvement,
    )
    return tracking.promote(rules, version, **kwargs)  # type: ignore[arg-type]


def test_registration_tags_version_and_moves_challenger(store: str, model_uri: str) -> None:
    parent = tracking.start_pipeline_run(RFTConfig(experiment="registry-tests"), tracking_uri=store)
    stage = tracking.start_stage_run(parent, "rl")
    version = tracking.register_model(
        model_uri,
        "reg-tags",
        run_id=stage,
        metrics={"eval/accuracy": 0.25},
        data_digest="val-1",
        tags={"k": "v"},
    )
    mv = client(store).get_model_version("reg-tags", str(version))
    assert mv.tags["metric.eval/accuracy"] == "0.25"
    assert mv.tags["data_digest"] == "val-1"
    assert mv.tags["config_digest"] == client(store).get_run(parent).data.tags["config_digest"]
    assert mv.tags["k"] == "v"
    assert client(store).get_registered_model("reg-tags").aliases == {"challenger": version}
    second = register(model_uri, "reg-tags", 0.3)
    assert client(store).get_registered_model("reg-tags").aliases == {"challenger": second}


def test_gate_promotes_first_version_then_only_a_better_one(store: str, model_uri: str) -> None:
    name = "gate-basic"
    v1, v2, v3 = (register(model_uri, name, value) for value in (0.5, 0.52, 0.6))
    first = gate(name, v1)
    assert first.promoted and first.champion_version is None and "no champion" in first.reason
    refused = gate(name, v2, min_improvement=0.05)
    assert not refused.promoted
    assert (refused.challenger_value, refused.champion_version, refused.champion_value) == (0.52, v1, 0.5)
    assert "min_improvement" in refused.reason
    promoted = gate(name, v3, min_improvement=0.05)
    assert promoted.promoted and promoted.champion_version == v1
    assert tracking.champion_version(name) == v3

    tags = client(store).get_model_version(name, str(v2)).tags
    assert tags["gate.decision"] == "refused"
    assert tags["gate.reason"] == refused.reason
    assert tags["gate.champion_version"] == str(v1)
    assert tags["gate.champion_value"] == "0.5"
    assert tags["gate.rule"] == "not-better"
    assert client(store).get_model_version(name, str(v3)).tags["gate.decision"] == "promoted"
    assert gate(name, v3).reason == f"version {v3} is already the champion"


def test_gating_a_version_again_appends_to_its_history(store: str, model_uri: str) -> None:
    """A cached rerun of a pipeline gates its version again: the earlier decision stays on record."""
    name = "gate-history"
    v1, v2 = register(model_uri, name, 0.5), register(model_uri, name, 0.4)
    gate(name, v1)
    first = gate(name, v2)
    again = gate(name, v2, min_improvement=0.0)
    tags = client(store).get_model_version(name, str(v2)).tags
    history = json.loads(tags["gate.history"])
    assert [h["gate.reason"] for h in history] == [first.reason, again.reason]
    assert all(h["gate.time"] for h in history) and tags["gate.reason"] == again.reason


def health_version(model_uri: str, name: str, value: float, **tags: str) -> int:
    return tracking.register_model(
        model_uri, name, metrics={"eval/accuracy": value, "eval/grader_error_share": float(tags.pop("errors", 0.0))},
        data_digest="val-1", tags=tags,
    )


def test_the_gate_reads_a_versions_health_from_its_tags(store: str, model_uri: str) -> None:
    """With no champion yet: worse than its start, non-finite weights, graded mostly by errors are
    each refused, with the rule tagged; a healthy version is then promoted."""
    name = "gate-health"
    cases = {
        "worse-than-start": health_version(model_uri, name, 0.4, **{"start_metric.eval/accuracy": "0.83", "weights_finite": "true"}),
        "non-finite": health_version(model_uri, name, 0.9, weights_finite="false"),
        "grader-errors": health_version(model_uri, name, 0.0, errors="0.95", weights_finite="true"),
    }
    for rule, version in cases.items():
        decision = gate(name, version)
        assert not decision.promoted and decision.rule == rule, decision
        assert client(store).get_model_version(name, str(version)).tags["gate.rule"] == rule
        assert tracking.champion_version(name) is None
    healthy = health_version(model_uri, name, 0.9, **{"start_metric.eval/accuracy": "0.83", "weights_finite": "true"})
    assert gate(name, healthy).promoted and tracking.champion_version(name) == healthy
    assert not gate(name, cases["non-finite"], force=True).promoted


def described_config(**sections: object) -> RFTConfig:
    return RFTConfig.from_dict({"experiment": "registry-tests", **sections})


def test_a_registered_version_describes_its_model_task_data_figures_and_pending_gate(
    store: str, model_uri: str
) -> None:
    cfg = described_config()
    metrics = {
        "sft": {"accuracy": 0.125, "reward_mean": 0.2, "sampled_reward_mean": 0.15, "items": 16.0},
        "rl": {"accuracy": 0.25, "reward_mean": 0.3125, "sampled_reward_mean": 0.28, "items": 16.0},
    }
    description = tracking.version_description(cfg, data_digest="val-digest-1", metrics=metrics, split_digest="man-1")
    version = tracking.register_model(model_uri, "described", metrics={"eval/accuracy": 0.25},
                                      data_digest="val-digest-1", description=description)
    text = client(store).get_model_version("described", str(version)).description
    assert text == description
    assert "built-in tiny model (`tiny`: a Llama-style decoder" in text
    assert "built-in synthetic arithmetic task" in text and "grader `numeric_match`" in text
    assert "| validation data digest | `val-digest-1` |" in text and "`man-1`" in text
    assert "warm-up SFT then PPO (" in text
    assert "| model | greedy accuracy | mean reward (greedy) | mean reward (sampled) |" in text
    assert "| SFT | 0.1250 | 0.2000 | 0.1500 |" in text and "| PPO | 0.2500 | 0.3125 | 0.2800 |" in text
    assert "16 validation items" in text
    assert text.endswith("### Gate\n\nNot decided yet.")


def test_a_described_task_names_its_files_or_hub_model_and_a_run_without_sft_or_rl() -> None:
    cfg = described_config(
        model={"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}, data={"train_path": "data/train.jsonl"},
        sft={"enabled": False}, rl={"algorithm": "grpo"},
    )
    text = tracking.version_description(cfg, data_digest="d", metrics={"sft": {"accuracy": 0.5}, "rl": {"accuracy": 0.6}})
    assert "| base model | `Qwen/Qwen2.5-0.5B-Instruct` |" in text and "| task | `data/train.jsonl`;" in text
    assert "| base (no SFT) | 0.5000 |" in text and "| GRPO | 0.6000 |" in text
    assert "Reinforcement fine-tuned by rft: GRPO (" in text
    rank = described_config(data={"synthetic": {"task": "rank"}}, rl={"enabled": False})
    text = tracking.version_description(rank, data_digest="d", metrics={"sft": {"accuracy": 0.5}})
    assert "built-in synthetic rank task" in text and "rft: warm-up SFT." in text


def test_the_gate_writes_its_decision_into_the_description_each_time_it_decides(
    store: str, model_uri: str, cli: typer.Typer
) -> None:
    name = "described-gate"
    cfg = described_config()
    v1, v2 = (
        tracking.register_model(
            model_uri, name, metrics={"eval/accuracy": value}, data_digest="val-1",
            description=tracking.version_description(cfg, data_digest="val-1", metrics={"rl": {"accuracy": value}}),
        )
        for value in (0.5, 0.4)
    )
    gate(name, v1)
    refused = gate(name, v2)

    def description(version: int) -> str:
        return client(store).get_model_version(name, str(version)).description

    first = description(v1)
    assert "### Gate\n\n**promoted** to champion on `eval/accuracy` (rule `no-champion`): " in first
    assert "Not decided yet" not in first
    assert first.startswith("Reinforcement fine-tuned by rft")  # the rest of the description is kept
    second = description(v2)
    assert f"**refused** (champion unchanged) on `eval/accuracy` (rule `not-better`): {refused.reason}" in second
    assert f"This version: 0.4; champion before: v{v1} (0.5)." in second
    # `rft promote --force` goes through the same function: one gate section, the latest decision
    # first, the earlier ones kept below it (the audit trail), in the description and in gate.history.
    assert invoke(cli, "promote", name, str(v2), "--force", "--tracking-uri", store).exit_code == 0
    forced = description(v2)
    assert forced.count("### Gate") == 1
    latest, earlier = forced.split("### Gate")[1].split("Earlier decisions:")
    assert "**promoted** to champion on `eval/accuracy` (rule `forced`)" in latest and "refused" not in latest
    assert f"refused (not-better): {refused.reason}" in earlier
    assert forced.split("### Gate")[0] == second.split("### Gate")[0]
    history = json.loads(client(store).get_model_version(name, str(v2)).tags["gate.history"])
    assert [(h["gate.decision"], h["gate.rule"]) for h in history] == [("refused", "not-better"), ("promoted", "forced")]
    # A version registered without a description gets the gate section alone.
    v3 = register(model_uri, name, 0.9)
    gate(name, v3)
    assert description(v3).startswith("### Gate\n\n**promoted** to champion")


def test_gate_lower_is_better(store: str, model_uri: str) -> None:
    name = "gate-lower"
    v1, v2 = register(model_uri, name, 2.0), register(model_uri, name, 1.5)
    assert gate(name, v1, greater_is_better=False).promoted
    assert gate(name, v2, greater_is_better=False).promoted
    assert not gate(name, register(model_uri, name, 1.7), greater_is_better=False).promoted


def test_gate_scores_a_champion_from_other_data_with_the_evaluator_or_refuses(
    store: str, model_uri: str
) -> None:
    name = "gate-data"
    v1 = register(model_uri, name, 0.9, data="val-old")
    assert gate(name, v1).promoted
    v2 = register(model_uri, name, 0.6, data="val-new")

    refused = gate(name, v2)
    assert not refused.promoted and "no evaluator" in refused.reason and "val-old" in refused.reason
    assert tracking.champion_version(name) == v1

    scored: list[str] = []

    def evaluate(uri: str) -> dict[str, float]:
        scored.append(uri)
        return {"eval/accuracy": 0.4}  # the old champion is worse on the new data than its old tag says

    decision = gate(name, v2, evaluate=evaluate)
    assert scored == [f"models:/{name}/{v1}"]
    assert decision.promoted and decision.champion_value == 0.4
    assert tracking.champion_version(name) == v2
    assert client(store).get_model_version(name, str(v2)).tags["gate.champion_value"] == "0.4"


def test_force_promotes_a_worse_version_and_a_missing_metric_is_refused(store: str, model_uri: str) -> None:
    name = "gate-force"
    v1, v2, v3 = (
        register(model_uri, name, 0.8),
        register(model_uri, name, 0.1),
        register(model_uri, name, None),
    )
    gate(name, v1)
    assert not gate(name, v3).promoted
    assert "no 'eval/accuracy' tag" in gate(name, v3).reason
    forced = gate(name, v2, force=True)
    assert forced.promoted and "forced" in forced.reason and forced.champion_value == 0.8
    assert tracking.champion_version(name) == v2


def test_rollback_walks_back_the_champion_history(store: str, model_uri: str) -> None:
    name = "gate-rollback"
    v1, v2, v3 = (register(model_uri, name, value) for value in (0.1, 0.2, 0.3))
    with pytest.raises(tracking.RegistryError, match="no champion"):
        tracking.rollback(name)
    for version in (v1, v2, v3):
        assert gate(name, version).promoted
    assert tracking.rollback(name) == v2
    assert tracking.champion_version(name) == v2
    assert "rollback.demoted_at" in client(store).get_model_version(name, str(v3)).tags
    assert tracking.rollback(name) == v1
    with pytest.raises(tracking.RegistryError, match="no previous champion"):
        tracking.rollback(name)
    assert tracking.champion_version(name) == v1


def test_a_rollback_is_recorded_on_both_versions_and_each_reads_what_it_is_now(store: str, model_uri: str) -> None:
    name = "gate-status"
    v1, v2, v3, v4 = (register(model_uri, name, value) for value in (0.1, 0.2, 0.3, 0.25))
    for version in (v1, v2, v3):
        assert gate(name, version).promoted
    assert not gate(name, v4).promoted
    assert tracking.rollback(name) == v2
    versions = client(store)
    demoted = versions.get_model_version(name, str(v3))
    assert demoted.tags["gate.decision"] == "rolled back" and demoted.tags["gate.rule"] == "rollback"
    history = json.loads(demoted.tags["gate.history"])
    assert [entry["gate.decision"] for entry in history] == ["promoted", "rolled back"]
    assert f"champion moved back to v{v2}" in history[-1]["gate.reason"]
    assert "**rolled back**" in demoted.description and "Earlier decisions:" in demoted.description
    restored = versions.get_model_version(name, str(v2))
    assert [e["gate.decision"] for e in json.loads(restored.tags["gate.history"])] == ["promoted", "restored"]
    status = {row["version"]: (row["status"], row["status_detail"]) for row in tracking.list_versions(name)}
    assert status == {v1: ("replaced", f"by v{v2}"), v2: ("champion", None),
                      v3: ("rolled back", f"rolled back: champion moved back to v{v2}"),
                      v4: ("refused", "not-better")}
    # Rolled back again: v2 is the demoted one now, v1 champion again; v3 stays rolled back.
    assert tracking.rollback(name) == v1
    status = {row["version"]: row["status"] for row in tracking.list_versions(name)}
    assert status == {v1: "champion", v2: "rolled back", v3: "rolled back", v4: "refused"}
    # Promoted again through the gate, a rolled-back version reads champion.
    assert gate(name, v3).promoted
    assert {row["version"]: row["status"] for row in tracking.list_versions(name)}[v3] == "champion"


def test_racing_promotions_leave_the_better_version_champion(store: str, model_uri: str) -> None:
    name = "gate-race"
    v1 = register(model_uri, name, 0.5, data="val-old")
    gate(name, v1)
    worse, better = (
        register(model_uri, name, 0.6, data="val-new"),
        register(model_uri, name, 0.7, data="val-new"),
    )
    start = threading.Barrier(2)

    def slow_evaluate(uri: str) -> dict[str, float]:
        # Both threads decide against v1 at the same time and hold the decision a while: without
        # the lock and the re-read, whichever writes last (maybe the worse one) would be champion.
        time.sleep(0.3)
        return {"eval/accuracy": 0.5}

    decisions: dict[int, tracking.GateDecision] = {}
    errors: list[BaseException] = []

    def promote(version: int) -> None:
        start.wait()
        try:
            decisions[version] = gate(name, version, evaluate=slow_evaluate)
        except BaseException as exc:
            errors.append(exc)

    for order in ((better, worse), (worse, better)):
        client(store).set_registered_model_alias(name, "champion", str(v1))
        threads = [threading.Thread(target=promote, args=(v,)) for v in order]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert tracking.champion_version(name) == better
        assert decisions[better].promoted
        if decisions[worse].promoted:  # it won the lock first, then lost to the better one
            assert decisions[better].champion_version == worse
        else:
            assert decisions[worse].champion_version == better


def test_registry_lock_excludes_concurrent_holders_and_breaks_a_stale_one(store: str, model_uri: str) -> None:
    name = "lock-test"
    register(model_uri, name, 0.1)
    c = client(store)
    inside, overlaps, entries = [0], [0], [0]
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            for _ in range(5):
                with tracking.registry_lock(c, name):
                    inside[0] += 1
                    entries[0] += 1
                    overlaps[0] += inside[0] > 1
                    time.sleep(0.01)
                    inside[0] -= 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert entries == [15] and overlaps == [0]
    assert name + tracking.LOCK_SUFFIX not in {m.name for m in c.search_registered_models()}

    # A holder that died leaves its lock; after the lease it is taken over.
    c.create_registered_model(
        name + tracking.LOCK_SUFFIX, tags={"rft.lock.owner": "dead", "rft.lock.expires": "0"}
    )
    with tracking.registry_lock(c, name, timeout_s=5) as owner:
        assert c.get_registered_model(name + tracking.LOCK_SUFFIX).tags["rft.lock.owner"] == owner
    # A live one is waited for, then reported.
    c.create_registered_model(
        name + tracking.LOCK_SUFFIX,
        tags={"rft.lock.owner": "alive", "rft.lock.expires": str(time.time() + 60)},
    )
    with (
        pytest.raises(tracking.RegistryError, match="held by alive"),
        tracking.registry_lock(c, name, timeout_s=0.3),
    ):
        pass
    c.delete_registered_model(name + tracking.LOCK_SUFFIX)


@pytest.mark.parametrize("expires", ["soon", "", "nan", "inf", "-inf", "1e999", "2026-12-06T10:00:00", None])
def test_a_lock_whose_expiry_cannot_be_read_is_broken_one_lease_after_it_was_made(
    store: str, expires: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Hand-edited or foreign: within a lease of its creation it is waited for (its holder may be
    alive), then it is broken with a warning naming it; never a ValueError from parsing it."""
    name = "lock-expiry"
    lock = name + tracking.LOCK_SUFFIX
    c = client(store)
    tags = {"rft.lock.owner": "hand-edited"} | ({} if expires is None else {"rft.lock.expires": expires})
    c.create_registered_model(lock, tags=tags)
    with (
        pytest.raises(tracking.RegistryError, match="held by hand-edited"),
        tracking.registry_lock(c, name, lease_s=60, timeout_s=0.3),
    ):
        pass
    with caplog.at_level(logging.WARNING, logger="rft.tracking"), tracking.registry_lock(
        c, name, lease_s=0.0, timeout_s=5
    ) as owner:
        assert c.get_registered_model(lock).tags["rft.lock.owner"] == owner
    assert lock not in {m.name for m in c.search_registered_models()}
    warning = caplog.text
    assert f"breaking the promotion lock {lock!r} (held by hand-edited)" in warning
    assert ("no expiry tag" if expires is None else f"rft.lock.expires={expires!r} is not a time") in warning


def test_list_versions_reports_aliases_metrics_and_gate(store: str, model_uri: str) -> None:
    name = "list-test"
    v1, v2 = register(model_uri, name, 0.4), register(model_uri, name, 0.3)
    gate(name, v1)
    gate(name, v2)
    rows = tracking.list_versions(name)
    assert [r["version"] for r in rows] == [v1, v2]
    assert rows[0]["aliases"] == ["champion"] and rows[1]["aliases"] == ["challenger"]
    assert rows[0]["metrics"] == {"eval/accuracy": 0.4}
    assert rows[1]["gate_decision"] == "refused"
    assert rows[0]["data_digest"] == "val-1" and rows[0]["run_id"] and rows[0]["created"]
    with pytest.raises(tracking.RegistryError, match="no registered model named 'nope'"):
        tracking.list_versions("nope")
    with pytest.raises(tracking.RegistryError, match="has no version 99"):
        gate(name, 99)


# --------------------------------------------------------------------------- a damaged store


def damaged_store(kind: str, db: Path, good: bytes) -> None:
    """Put at `db` what a user may find there instead of a store."""
    if kind == "random bytes":
        db.write_bytes(random.Random(0).randbytes(5000))
    elif kind == "a text file":
        db.write_text("runs:\n  - id: 1\n" * 50)
    elif kind == "a truncated store":
        db.write_bytes(good[: len(good) // 3])
    elif kind == "a torn page":
        db.write_bytes(good[:8192] + random.Random(1).randbytes(4096) + good[12288:])
    elif kind == "a header only":
        db.write_bytes(good[:100])
    elif kind == "a directory":
        db.mkdir()
    elif kind == "a FIFO":
        os.mkfifo(db)


DAMAGED = {
    "random bytes": "is not an SQLite database",
    "a text file": "is not an SQLite database (its first bytes are b'runs:\\n  '",
    "a truncated store": "is a damaged SQLite database",
    "a torn page": "is a damaged SQLite database",
    "a header only": "is a damaged SQLite database",
    "a directory": "is a directory, not an SQLite database file",
    "a FIFO": "is a FIFO (named pipe), not an SQLite database file",
}


@pytest.fixture(scope="module")
def good_store_bytes(store: str) -> bytes:
    client(store).search_experiments()  # tables exist
    return Path(store.removeprefix("sqlite:///")).read_bytes()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(DAMAGED))
def test_a_damaged_store_is_one_line_naming_it_and_the_fix(
    kind: str, good_store_bytes: bytes, tmp_path: Path, cli: typer.Typer
) -> None:
    db = tmp_path / "rft_runs" / "mlflow.db"
    db.parent.mkdir()
    damaged_store(kind, db, good_store_bytes)
    uri = f"sqlite:///{db}"
    with pytest.raises(tracking.TrackingStoreUnusable) as caught:
        tracking.check_tracking_available(uri)
    message = str(caught.value)
    assert f"{db} {DAMAGED[kind]}" in message and "move it aside" in message and "\n" not in message
    # The commands that open the store: one line, exit 2, no traceback, nothing written over it.
    before = db.read_bytes() if db.is_file() else None
    for args in (["models", "x"], ["promote", "x", "1"], ["rollback", "x"]):
        result = CliRunner().invoke(cli, [*args, "--tracking-uri", uri])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert (db.read_bytes() if db.is_file() else None) == before


def test_rft_run_refuses_a_damaged_store_before_the_flow_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rft.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").write_bytes(random.Random(2).randbytes(3000))
    result = CliRunner().invoke(app, ["run", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.startswith(f"error: MLflow tracking store sqlite:///{tmp_path}/mlflow.db cannot be used")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no stage ran


def test_a_good_store_an_empty_file_and_no_file_yet_are_usable(good_store_bytes: bytes, tmp_path: Path) -> None:
    (tmp_path / "copy.db").write_bytes(good_store_bytes)
    (tmp_path / "empty.db").touch()
    for name in ("copy.db", "empty.db", "new/mlflow.db"):
        tracking.check_tracking_available(f"sqlite:///{tmp_path / name}")
    assert (tmp_path / "new").is_dir()


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("models")(models_cmd)
    return app


def invoke(app: typer.Typer, *args: str) -> object:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_cli_promote_rollback_and_models(store: str, model_uri: str, cli: typer.Typer) -> None:
    name = "cli-test"
    v1, v2, v3 = (
        register(model_uri, name, 0.5),
        register(model_uri, name, 0.7),
        register(model_uri, name, 0.6),
    )
    result = invoke(cli, "promote", name, str(v1), "--tracking-uri", store)
    assert result.exit_code == 0 and "promoted" in result.output
    assert invoke(cli, "promote", name, str(v2), "--tracking-uri", store).exit_code == 0
    refused = invoke(cli, "promote", name, str(v3), "--tracking-uri", store)
    assert refused.exit_code == 1 and "not promoted" in refused.output
    assert invoke(cli, "promote", name, str(v3), "--force", "--tracking-uri", store).exit_code == 0
    assert tracking.champion_version(name) == v3

    result = invoke(cli, "rollback", name, "--tracking-uri", store)
    assert result.exit_code == 0 and f"v{v3} -> v{v2}" in result.output

    result = invoke(cli, "models", name, "--tracking-uri", store, "--json")
    rows = json.loads(result.output)
    assert [r["aliases"] for r in rows] == [[], ["champion"], ["challenger"]]
    assert [r["status"] for r in rows] == ["replaced", "champion", "rolled back"]
    table = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["models", name, "--tracking-uri", store])
    assert table.exit_code == 0 and "champion" in table.output and "eval/accuracy" in table.output


@pytest.mark.parametrize("width", [60, 80, 120])
def test_cli_models_fits_the_width_with_whole_words_full_run_ids_and_links(
    store: str, model_uri: str, cli: typer.Typer, width: int
) -> None:
    name = f"cli-width-{width}"
    versions = [register(model_uri, name, value) for value in (0.5, 0.7, 0.6)]
    for version in versions[:2]:
        gate(name, version)
    assert not gate(name, versions[2]).promoted
    tracking.rollback(name)
    result = CliRunner(env={"COLUMNS": str(width)}).invoke(cli, ["models", name, "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    words = result.output.split()
    rows = tracking.list_versions(name)
    run_ids = {row["run_id"] for row in rows}
    assert all(len(run_id) == 32 for run_id in run_ids)
    for row in rows:
        # The whole run id, and the version's page in the UI, each on a line of its own.
        assert f"v{row['version']}  run {row['run_id']}" in lines
        page = f"  page http://127.0.0.1:5000/#/models/{name}/versions/{row['version']}"
        assert page in lines
    assert f"The pages open once the MLflow UI runs: {tracking.ui_command(store)}" in lines
    whole = [line for line in lines if " run " in line or "page http" in line or "MLflow UI runs" in line
             or line.startswith(f"{name}: ")]
    assert all(len(line) <= width for line in lines if line not in whole), result.output
    assert all(line == line.rstrip() for line in lines), [line for line in lines if line != line.rstrip()]
    # Nothing folded inside a word: every status word, alias and figure is there whole.
    for word in ("champion", "challenger", "rolled", "back", "refused", "eval/accuracy",
                 "eval/accuracy=0.5", "eval/accuracy=0.7", "eval/accuracy=0.6", "(not-better)"):
        assert word in words, (word, result.output)
    assert "…" not in result.output


def test_cli_reads_mlflow_tracking_uri_from_the_environment(
    store: str, model_uri: str, cli: typer.Typer, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(model_uri, "cli-env", 0.5)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    result = invoke(cli, "models", "cli-env", "--json")
    assert result.exit_code == 0 and json.loads(result.output)[0]["aliases"] == ["challenger"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("models", "no-such-model"), "no registered model named 'no-such-model'"),
        (("promote", "cli-test", "99"), "has no version 99"),
        (("rollback", "no-such-model"), "no registered model named 'no-such-model'"),
    ],
)
def test_cli_errors_exit_2_without_traceback(
    store: str, model_uri: str, cli: typer.Typer, args: tuple[str, ...], message: str
) -> None:
    register(model_uri, "cli-test", 0.1)
    result = CliRunner().invoke(cli, [*args, "--tracking-uri", store])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_unreachable_server_and_missing_store_exit_2(cli: typer.Typer, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli, ["models", "x", "--tracking-uri", uri])
    assert result.exit_code == 2 and f"{uri} is unreachable" in result.stderr
    missing = tmp_path / "none" / "mlflow.db"
    result = CliRunner().invoke(cli, ["models", "x", "--tracking-uri", f"sqlite:///{missing}"])
    assert result.exit_code == 2 and f"no MLflow store at {missing}" in result.stderr
    assert not missing.exists()


def _open_store_at_once(uri: str, barrier: object, name: str, results: object) -> None:
    """A process that uses the store as a job or the API server does, after all of them are ready."""
    try:
        barrier.wait(timeout=120)
        from rft_core.tracking.uri import mlflow_client

        client = mlflow_client(uri)
        client.create_experiment(name)
        client.search_registered_models(max_results=1)
        results.put((name, "ok"))
    except BaseException as exc:  # reported to the test, whatever it is
        results.put((name, f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow
@pytest.mark.parametrize("start", ["no-file", "empty-file", "created"])
def test_processes_that_open_one_sqlite_store_at_once_all_succeed(tmp_path: Path, start: str) -> None:
    """MLflow's schema migration is not safe against two processes migrating a fresh file at the
    same moment ("Online migration expected to match one row"): `configure` makes the schema under
    a lock, so the API server and its jobs, or jobs started together, all find a usable store."""
    import multiprocessing

    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    if start == "empty-file":
        db.parent.mkdir()
        db.touch()
    elif start == "created":
        MlflowClient(uri).search_experiments()
    context = multiprocessing.get_context("spawn")  # fresh processes, as the API's workers are
    barrier, results = context.Barrier(4), context.Queue()
    procs = [context.Process(target=_open_store_at_once, args=(uri, barrier, f"e{i}", results)) for i in range(4)]
    for proc in procs:
        proc.start()
    outcomes = dict(results.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == {f"e{i}": "ok" for i in range(4)}
    assert sorted(e.name for e in MlflowClient(uri).search_experiments()) == ["Default", "e0", "e1", "e2", "e3"]
