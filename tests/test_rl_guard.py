"""The RL guard (rft_core/rl/guard.py): the rules as a state machine, then real runs on the tiny
model: a run made to diverge is rolled back and stopped, and ends with its best validated
weights; an ordinary run is left alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from training_fixtures import tiny_config, tiny_task

from rft_core.config import GuardSection
from rft_core.rl.guard import Guard
from rft_core.rl.trainer import run_rl


def guard(**settings) -> Guard:
    return Guard(GuardSection(**settings))


def test_validation_below_the_margin_for_patience_validations_trips_a_rollback() -> None:
    g = guard(margin=0.1, patience=2)
    assert g.after_validation(0, {"val_accuracy": 0.85, "val_sampled_reward": 0.74}) is None
    assert g.after_validation(20, {"val_accuracy": 0.70, "val_sampled_reward": 0.70}) is None  # once
    assert g.after_validation(40, {"val_accuracy": 0.80, "val_sampled_reward": 0.70}) is None  # back within
    assert g.after_validation(60, {"val_accuracy": 0.74, "val_sampled_reward": 0.70}) is None
    event = g.after_validation(80, {"val_accuracy": 0.60, "val_sampled_reward": 0.66})
    assert event is not None and (event.iteration, event.rule, event.action) == (80, "validation", "rollback")
    assert "val_accuracy 0.600 (start 0.850)" in event.message and "val_sampled_reward" not in event.message
    assert "rollback 1 of 2" in event.message
    assert g.events == [event.to_dict()]


def test_after_max_rollbacks_the_guard_stops_and_with_action_stop_at_once() -> None:
    g = guard(margin=0.0, patience=1, max_rollbacks=2)
    g.after_validation(0, {"val_accuracy": 0.5})
    actions = [g.after_validation(i, {"val_accuracy": 0.1}).action for i in (1, 2, 3)]
    assert actions == ["rollback", "rollback", "stop"]
    assert "after 2 rollbacks" in g.events[-1]["message"]
    stop = guard(action="stop", margin=0.0, patience=1)
    stop.after_validation(0, {"val_accuracy": 0.5})
    assert stop.after_validation(1, {"val_accuracy": 0.4}).action == "stop"


def test_only_watched_finite_metrics_count_and_a_rise_never_trips() -> None:
    g = guard(metrics=["val_accuracy"], margin=0.05, patience=1)
    g.after_validation(0, {"val_accuracy": 0.5, "val_sampled_reward": 0.9})
    assert g.after_validation(1, {"val_accuracy": 0.9, "val_sampled_reward": 0.0}) is None
    assert g.after_validation(2, {"val_accuracy": math.nan}) is None


def test_kl_per_token_and_entropy_outside_their_band_trip_after_iteration_patience() -> None:
    g = guard(max_kl=1.0, entropy_ratio=None, iteration_patience=3)
    runaway = {"kl": 60.0, "response_length": 20.0}  # 3 nats per token
    calm = {"kl": 10.0, "response_length": 20.0}
    assert [g.after_iteration(i, s) for i, s in enumerate([runaway, runaway, calm, runaway, runaway])] == [None] * 5
    event = g.after_iteration(5, runaway)
    assert event.rule == "kl" and "above rl.guard.max_kl 1 nats per token for 3 iterations" in event.message
    e = guard(max_kl=None, entropy_ratio=5.0, iteration_patience=2)
    assert e.after_iteration(1, {"entropy": 0.4}) is None
    assert e.after_iteration(2, {"entropy": 1.9}) is None and e.after_iteration(3, {"entropy": 0.1}) is None
    assert e.after_iteration(4, {"entropy": 2.5}) is None
    event = e.after_iteration(5, {"entropy": math.nan})
    assert event.rule == "entropy" and "left [0.08, 2] nats per token" in event.message


def test_a_disabled_guard_never_trips_and_its_state_is_json() -> None:
    g = guard(enabled=False, margin=0.0, patience=1, max_kl=0.001, iteration_patience=1)
    g.after_validation(0, {"val_accuracy": 1.0})
    assert g.after_validation(1, {"val_accuracy": 0.0}) is None
    assert g.after_iteration(1, {"kl": 1e9, "response_length": 1, "entropy": 1e9}) is None
    state = json.loads(json.dumps(guard().state))
    assert Guard(GuardSection(), state).state == state


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard-runs")
    cfg = tiny_config(tmp)
    return tiny_task(tmp, cfg)


def test_a_run_made_to_diverge_is_rolled_back_then_stopped_and_ends_with_its_best_weights(task, tmp_path) -> None:
    train, val, base = task
    cfg = tiny_config(
        tmp_path, "rl.lr=0.05", "rl.iterations=12", "rl.eval_interval=2", "rl.checkpoint_interval=4",
        "rl.guard.max_kl=0.5", "rl.guard.iteration_patience=1", "rl.guard.max_rollbacks=1",
    )
    logged: list[tuple[int, dict]] = []
    result = run_rl(cfg, train, val, base, tmp_path / "rl", log=lambda m, s: logged.append((s, m)))
    actions = [event["action"] for event in result.events]
    assert actions == ["rollback", "stop"], result.events
    assert all(event["rule"] == "kl" and "nats per token" in event["message"] for event in result.events)
    stopped_at = result.events[-1]["iteration"]
    assert max(step for step, _ in logged) == stopped_at < 12  # no iteration after the stop
    saved = json.loads((tmp_path / "rl" / "result.json").read_text())
    assert saved["guard"] == result.events and saved["signals"][0]["step"] == 1
    assert (tmp_path / "rl" / "rl_signals.png").exists() is False  # the stage draws it, not the trainer
    # It ends with the best validated weights: the file the stage returns equals the kept best.
    best = load_file(str(tmp_path / "rl" / "best" / "model.safetensors"))
    final = load_file(str(tmp_path / "rl" / "model" / "model.safetensors"))
    assert set(best) <= set(final) and all(torch.equal(best[k], final[k]) for k in best)
    # The rollback halved the learning rate of the iterations after it.
    lrs = [m["lr"] for s, m in logged if "lr" in m]
    first = result.events[0]["iteration"]
    assert lrs[first] == pytest.approx(0.5 * lrs[first - 1], rel=0.2)


def test_an_ordinary_run_is_left_alone(task, tmp_path) -> None:
    train, val, base = task
    cfg = tiny_config(tmp_path, "rl.iterations=3", "rl.eval_interval=1")
    result = run_rl(cfg, train, val, base, tmp_path / "rl")
    assert result.events == []
    saved = json.loads((tmp_path / "rl" / "result.json").read_text())
    assert [s["step"] for s in saved["signals"]] == [1, 2, 3]
    assert {"reward_mean", "kl", "entropy", "response_length", "val_accuracy"} <= set(saved["signals"][-1])
