"""The pipeline run's picture (`stages.training_curve`): drawn from the stages' result.json, with or
without SFT or RL, the SFT marker at the step RL started from, logged on the MLflow parent run."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from mlflow import MlflowClient

from rft_core import stages, tracking
from rft_core.config import RFTConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SFT_HISTORY = [
    {"step": 2, "val_accuracy": 0.1, "val_sampled_reward": 0.05},
    {"step": 4, "val_accuracy": 0.25, "val_sampled_reward": 0.12},  # the best: RL starts here
    {"step": 6, "val_accuracy": 0.2, "val_sampled_reward": 0.1},
]
RL_HISTORY = [
    {"step": 0, "val_accuracy": 0.25, "val_sampled_reward": 0.12},
    {"step": 2, "val_accuracy": 0.3, "val_sampled_reward": 0.2},
]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (after checking it is one)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def trained(cfg: RFTConfig, stage: str, key: str, history: list[dict], chosen: dict) -> stages.ModelRecord:
    """A record of a finished training stage: its directory, model and result.json as the stage leaves them."""
    work = stages.stage_dir(cfg, stage, key)
    (work / "model").mkdir()
    (work / "result.json").write_text(json.dumps({"metrics": chosen, "history": history}))
    return stages.ModelRecord(key, stage, str(work / "model"), {k: float(v) for k, v in chosen.items()})


@pytest.fixture
def cfg(tmp_path: Path) -> RFTConfig:
    return RFTConfig(output_dir=str(tmp_path / "out"), experiment="curve-tests")


def test_the_curve_is_drawn_from_both_stages_with_the_sft_step_rl_started_from(cfg, monkeypatch):
    sft = trained(cfg, "sft", "s1", SFT_HISTORY, {**SFT_HISTORY[1], "step": 4.0})
    rl = trained(cfg, "rl", "r1", RL_HISTORY, RL_HISTORY[-1])
    drawn = {}
    from rft_core import curves

    real = curves.plot_training

    def spy(sft_history, rl_history, path, **kwargs):
        drawn.update(sft=sft_history, rl=rl_history, **kwargs)
        return real(sft_history, rl_history, path, **kwargs)

    monkeypatch.setattr(curves, "plot_training", spy)
    path = Path(stages.training_curve(cfg, {"sft": sft, "rl": rl}))
    assert drawn["sft"] == SFT_HISTORY and drawn["rl"] == RL_HISTORY
    assert drawn["sft_chosen_step"] == 4  # SFT's chosen step (metrics.step), not its last (6)
    assert path == Path(cfg.output_dir).resolve() / "runs" / "untracked" / "training_curve.png"
    assert png_size(path) == (800, 450) and path.stat().st_size > 10_000


def test_without_sft_the_base_model_has_no_history_and_rl_alone_is_drawn(cfg, tmp_path):
    base = stages.ModelRecord("s0", "sft", str(tmp_path / "cache" / "tiny-abc"))  # SFT off: the base model
    rl = trained(cfg, "rl", "r2", RL_HISTORY, RL_HISTORY[-1])
    assert stages.stage_result(cfg, base) == {}
    path = Path(stages.training_curve(cfg, {"sft": base, "rl": rl}))
    assert png_size(path) == (800, 450)


def test_without_rl_sft_alone_is_drawn(cfg):
    sft = trained(cfg, "sft", "s3", SFT_HISTORY, {**SFT_HISTORY[-1], "step": 6.0})
    assert png_size(Path(stages.training_curve(cfg, {"sft": sft}))) == (800, 450)


def test_the_curve_of_a_tracked_run_is_under_its_run_id_and_logged_on_the_parent_run(cfg, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.start_pipeline_run(cfg, tracking_uri=uri)
    sft = trained(cfg, "sft", "s4", SFT_HISTORY, {**SFT_HISTORY[1], "step": 4.0})
    path = stages.training_curve(cfg, {"sft": sft}, stages.Tracking(parent, uri))
    assert path == str(Path(cfg.output_dir).resolve() / "runs" / parent / "training_curve.png")
    logged = {a.path: a.file_size for a in MlflowClient(uri).list_artifacts(parent)}
    assert logged["training_curve.png"] == Path(path).stat().st_size
