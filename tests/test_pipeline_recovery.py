"""A cached stage is reused only when the files its record names are still whole: a model
directory (or a data file) deleted or damaged since is computed again, not handed to the next
stage. Real Prefect (test harness), real MLflow (sqlite), tiny model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_pipeline import config

from rft_core.integrity import directory_problem, file_problem


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def stage_states(flow_run_id) -> dict[str, list[str]]:
    """Each stage's task runs in this flow run, in the order they started: e.g. sft: [Cached, Completed]."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.start_time or r.expected_start_time):
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def flow_warnings(flow_run_id) -> list[str]:
    """The flow run's warnings as the Prefect API holds them (logs travel there in the background:
    sent first)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs if log.level >= 30]


def rerun(cfg):
    from flows.pipeline import rft_pipeline

    state = rft_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    return stage_states(flow_run_id), flow_warnings(flow_run_id)


def cut_short(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_cached_stages_whose_outputs_are_gone_or_damaged_are_computed_again(prefect_api, tmp_path):
    cfg = config(tmp_path)
    first, _ = rerun(cfg)
    assert all(states == ["Completed"] for states in first.values())
    stages = tmp_path / "stages"
    sft_model = next(stages.glob("sft-*")) / "model"
    rl_model = next(stages.glob("rl-*")) / "model"
    train_items = next(stages.glob("split-*")) / "train.parquet"

    # Each way the cached records' files go bad; each time exactly that stage runs again.
    cases = [
        ("sft", sft_model, lambda: shutil.rmtree(sft_model)),
        ("sft", sft_model, lambda: cut_short(sft_model / "model.safetensors")),
        ("sft", sft_model, lambda: os.remove(sft_model / "config.json")),
        ("rl", rl_model, lambda: cut_short(rl_model / "model.safetensors")),
        ("split", train_items, lambda: cut_short(train_items)),
    ]
    for stage, path, damage in cases:
        damage()
        states, warnings = rerun(cfg)
        assert states[stage] == ["Cached", "Completed"], (stage, states)
        others = {name: s for name, s in states.items() if name not in (stage, "promote", "training-curve")}
        assert all(s == ["Cached"] for s in others.values()), (stage, states)
        assert any(f"cached {stage} result cannot be reused" in w and str(path) in w for w in warnings), warnings
        assert (directory_problem(path) if path.suffix != ".parquet" else file_problem(path)) is None

    # Whole again: the next rerun reuses everything.
    states, warnings = rerun(cfg)
    assert all(s == ["Cached"] for name, s in states.items() if name not in ("promote", "training-curve"))
    assert not [w for w in warnings if "cannot be reused" in w]
