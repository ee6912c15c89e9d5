"""The RL levers a strong start needs, on real tiny runs: early stop of an iteration's update on a
target approx_kl, adaptive KL, the critic's own learning rate and a detached critic, flat groups
left out; and the statistics that show what moves first."""

from __future__ import annotations

import pytest
import torch
from training_fixtures import tiny_config, tiny_task

from rft_core.rl.trainer import RLTrainer, run_rl


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("levers")
    return tiny_task(tmp, tiny_config(tmp))


def logged_run(task, tmp_path, *overrides: str) -> list[dict]:
    train, val, base = task
    logged: list[dict] = []
    run_rl(tiny_config(tmp_path, *overrides), train, val, base, tmp_path / "rl", log=lambda m, s: logged.append(m))
    return [m for m in logged if "reward_mean" in m]


def test_every_iteration_reports_the_critic_advantages_and_flat_groups(task, tmp_path) -> None:
    stats = logged_run(task, tmp_path, "rl.iterations=2")
    for key in ("explained_variance", "advantage_mean", "advantage_std", "value_mean", "flat_groups",
                "update_steps", "kl_coef", "samples"):
        assert key in stats[-1], key
    assert 0.0 <= stats[-1]["flat_groups"] <= 1.0 and stats[-1]["samples"] == 8


def test_a_target_kl_stops_an_iterations_update_early(task, tmp_path) -> None:
    # 8 prompts x 2 samples, minibatches of 4, 2 epochs: 8 steps an iteration without the stop.
    settings = ("rl.iterations=3", "rl.prompts_per_iteration=8", "rl.lr=5e-3")
    full = logged_run(task, tmp_path / "a", *settings)
    stopped = logged_run(task, tmp_path / "b", *settings, "rl.target_kl=1e-6")
    assert [s["update_steps"] for s in full] == [8.0, 8.0, 8.0]
    # The first step of an iteration is taken at the rollout's own policy (approx_kl 0), so at
    # least one step is; the policy then moves past the target and the iteration stops.
    assert all(1.0 <= s["update_steps"] < 8.0 for s in stopped[1:])


def test_adaptive_kl_moves_the_coefficient_toward_the_target_and_a_resume_keeps_it(task, tmp_path) -> None:
    train, val, base = task
    cfg = tiny_config(tmp_path, "rl.iterations=4", "rl.kl_target=1000", "rl.kl_horizon=16", "rl.checkpoint_interval=2")
    logged: list[dict] = []
    run_rl(cfg, train, val, base, tmp_path / "rl", log=lambda m, s: logged.append(m))
    coefs = [m["kl_coef"] for m in logged if "kl_coef" in m]
    # KL far below the target: each iteration lowers the coefficient by 20 % x 8 samples / 16.
    assert coefs == pytest.approx([0.05 * 0.9**i for i in range(4)])
    resumed = RLTrainer(cfg.model_copy(update={"rl": cfg.rl.model_copy(update={"iterations": 6})}), train, val, base,
                        tmp_path / "rl", grader=None)
    assert resumed.start_iteration == 4 and resumed.rl.kl_coef == pytest.approx(0.05 * 0.9**4)


def test_the_critic_trains_at_its_own_learning_rate(task, tmp_path) -> None:
    train, val, base = task
    trainer = RLTrainer(tiny_config(tmp_path, "rl.critic_lr=7e-3"), train, val, base, tmp_path / "rl", grader=None)
    policy_group, head_group = trainer.optimizer.param_groups
    assert (policy_group["lr"], head_group["lr"]) == (pytest.approx(1e-3), pytest.approx(7e-3))
    head = {id(p) for p in trainer.module.value_head.parameters()}
    assert {id(p) for p in head_group["params"]} == head
    assert not head & {id(p) for p in policy_group["params"]}
    grpo = RLTrainer(tiny_config(tmp_path, "rl.algorithm=grpo"), train, val, base, tmp_path / "grpo", grader=None)
    assert len(grpo.optimizer.param_groups) == 1  # no critic, one group


def test_a_detached_critic_never_moves_the_policy(task, tmp_path) -> None:
    """The value loss of a detached critic reaches the value head and nothing else."""
    train, val, base = task
    trainer = RLTrainer(tiny_config(tmp_path, "rl.critic_detached=true"), train, val, base, tmp_path / "rl", grader=None)
    from rft_core.graders import build_grader

    trainer.grader = build_grader({"type": "numeric_match"})
    batch = trainer.rollout(0, {})
    estimate = trainer.algorithm.advantages(batch, trainer.rl, trainer.processes.sum)
    rows = torch.arange(len(batch.texts))
    out = trainer.losses(batch, rows, estimate, float(batch.response_mask.sum()))
    (out.vf_loss * trainer.rl.vf_coef).backward()
    trunk = [p for p in trainer.params if id(p) not in trainer.head_params]
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in trunk)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in trainer.module.value_head.parameters())
