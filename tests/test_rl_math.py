"""The RL maths against values computed by hand."""

import math

import pytest
import torch

from rft_core.config import RLConfig
from rft_core.rl.advantages import gae, group_advantages, kl_penalty, terminal_rewards, whiten
from rft_core.rl.algorithms import ALGORITHMS
from rft_core.rl.losses import ppo_losses
from rft_core.rl.ppo import ppo_advantages


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_gae_equals_hand_computed_values_for_gamma_1_lambda_095():
    advantages, returns = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1.0, 1.0, 1.0]]), 1.0, 0.95)
    assert advantages.tolist()[0] == pytest.approx([0.46575, 0.385, 0.3])
    assert returns.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0])


def test_gae_with_discount_and_lambda():
    advantages, _ = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1.0, 1.0, 1.0]]), 0.9, 0.5)
    assert advantages.tolist()[0] == pytest.approx([0.11425, 0.165, 0.3])


def test_gae_ignores_values_and_rewards_after_the_response_ends():
    advantages, returns = gae(t([[0.0, 1.0, 5.0]]), t([[0.5, 0.6, 9.0]]), t([[1.0, 1.0, 0.0]]), 1.0, 0.95)
    assert advantages.tolist()[0] == pytest.approx([0.48, 0.4, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.98, 1.0, 0.0])


def test_terminal_rewards_put_the_score_on_each_rows_last_token():
    kl = t([[0.1, -0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    rewards = terminal_rewards(t([1.0, 0.5]), kl, mask, kl_coef=0.05)
    assert rewards.tolist()[0] == pytest.approx([-0.005, 0.01, 0.985])
    assert rewards.tolist()[1] == pytest.approx([-0.02 + 0.5, 0.0, 0.0])


def test_kl_estimators():
    logp, ref = t([-1.0]), t([-2.0])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1) - 1 + 1)
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k2")


def test_whiten_uses_masked_unbiased_statistics():
    x = t([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = t([[1, 1, 1, 1, 0]])
    out = whiten(x, mask)
    # Mean 2.5 and unbiased variance 5/3 of the four unmasked entries; the masked one becomes 0.
    std = math.sqrt(5 / 3)
    assert out.tolist()[0] == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0], rel=1e-6)


def test_whiten_over_processes_equals_whitening_the_whole_batch():
    x = t([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    whole = whiten(x, mask)
    # Two processes with a row each: the first pass collects each one's statistics, the second
    # whitens each row with their sum, as an all-reduce would give it.
    local = []
    for row in (0, 1):
        whiten(x[row : row + 1], mask[row : row + 1], reduce=lambda s: local.append(s) or s)
    split = [whiten(x[row : row + 1], mask[row : row + 1], reduce=lambda s: local[0] + local[1]) for row in (0, 1)]
    assert torch.allclose(torch.cat(split), whole, rtol=1e-12, atol=0)
    # Mean 3 and unbiased variance 2.5 of the five unmasked entries.
    std = math.sqrt(2.5)
    assert whole.tolist()[1] == pytest.approx([0.0, 1 / std, 2 / std], rel=1e-6)


def test_ppo_policy_loss_clips_the_ratio_in_the_direction_of_the_advantage():
    old = t([[0.0]])
    new = t([[math.log(1.5)]])
    mask = t([[1.0]])
    up = ppo_losses(new, old, t([[1.0]]), mask, clip_range=0.2)
    assert up.pg_loss.item() == pytest.approx(-1.2)
    assert up.clipfrac.item() == 1.0
    down = ppo_losses(new, old, t([[-1.0]]), mask, clip_range=0.2)
    assert down.pg_loss.item() == pytest.approx(1.5)
    assert down.clipfrac.item() == 0.0
    assert up.approx_kl.item() == pytest.approx(0.5 - math.log(1.5))


def test_ppo_value_loss_is_clipped_around_the_old_values():
    logp = t([[0.0]])
    out = ppo_losses(
        logp, logp, t([[0.0]]), t([[1.0]]), clip_range=0.2,
        values=t([[1.0]]), old_values=t([[0.5]]), returns=t([[2.0]]), vf_clip_range=0.2, vf_coef=5.0,
    )
    assert out.vf_loss.item() == pytest.approx(0.5 * 1.69)
    assert out.loss.item() == pytest.approx(5.0 * 0.845)


def test_losses_divide_by_the_global_normaliser():
    logp = t([[0.0, 0.0]])
    out = ppo_losses(logp, logp, t([[1.0, 1.0]]), t([[1.0, 1.0]]), clip_range=0.2, normaliser=4.0)
    assert out.pg_loss.item() == pytest.approx(-0.5)


def test_grpo_group_advantages_and_flat_groups():
    scores = t([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, flat = group_advantages(scores, 4, scale=True, eps=0.0)
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    assert flat.tolist() == [False, True]
    unscaled, _ = group_advantages(scores, 4, scale=False)
    assert unscaled.tolist()[:4] == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_grpo_ignores_rows_the_grader_failed_on():
    scores = t([1.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, True, False, False])
    adv, flat = group_advantages(scores, 4, scale=False, valid=valid)
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert flat.tolist() == [False]


def test_ppo_advantages_kl_is_zero_when_policy_equals_reference():
    logp = t([[-1.0, -2.0, -0.5]])
    mask = t([[1.0, 1.0, 1.0]])
    cfg = RLConfig(whiten_advantages=False)
    advantages, returns, kl = ppo_advantages(t([1.0]), logp, logp.clone(), torch.zeros_like(logp), mask, cfg, lambda s: s)
    assert kl.abs().sum().item() == 0.0
    # Zero values, gamma 1: every token's advantage is the (discounted by lambda) terminal score.
    assert advantages.tolist()[0] == pytest.approx([0.95**2, 0.95, 1.0])
    assert returns.tolist()[0] == pytest.approx([0.95**2, 0.95, 1.0])


def test_ppo_and_grpo_differ_in_the_critic_and_where_the_kl_goes():
    ppo, grpo = ALGORITHMS["ppo"], ALGORITHMS["grpo"]
    assert ppo.value_head and not ppo.kl_in_loss
    assert not grpo.value_head and grpo.kl_in_loss and grpo.min_samples_per_prompt == 2
    # Each reports the losses it trains: the value loss with a critic, the KL term when it is one.
    assert ppo.loss_stats == ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac")
    assert grpo.loss_stats == ("pg_loss", "kl_loss", "clipfrac", "approx_kl")


def test_decoupled_gae_gives_the_critic_monte_carlo_returns_and_the_policy_its_own_lambda():
    logp = t([[-1.0, -2.0, -0.5]])
    mask = t([[1.0, 1.0, 1.0]])
    values = t([[0.2, 0.4, 0.6]])
    cfg = RLConfig(whiten_advantages=False, critic_lam=1.0, kl_coef=0.0)
    advantages, returns, _ = ppo_advantages(t([1.0]), logp, logp.clone(), values, mask, cfg, lambda s: s)
    assert returns.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])  # lambda 1, gamma 1: the score itself
    same, _, _ = ppo_advantages(t([1.0]), logp, logp.clone(), values, mask, RLConfig(whiten_advantages=False, kl_coef=0.0), lambda s: s)
    assert advantages.tolist()[0] == pytest.approx(same.tolist()[0])  # the policy keeps rl.lam (0.95)
    # delta = r_t + V_{t+1} - V_t: 0.2, 0.2, 0.4; A = delta_t + 0.95 A_{t+1}
    assert advantages.tolist()[0] == pytest.approx([0.2 + 0.95 * (0.2 + 0.95 * 0.4), 0.2 + 0.95 * 0.4, 0.4])


def test_explained_variance_and_critic_statistics_by_hand():
    from rft_core.rl.advantages import explained_variance, masked_moments

    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    returns = t([[1.0, 1.0, 9.0], [0.0, 0.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    mean = (2 / 5) * torch.ones_like(returns)
    assert explained_variance(mean, returns, mask) == pytest.approx(0.0, abs=1e-9)
    assert explained_variance(1 - returns, returns, mask) < 0  # worse than the mean
    m, v, n = masked_moments(returns, mask)
    assert (m, n) == (pytest.approx(0.4), 5.0) and v == pytest.approx(0.3)
    from rft_core.rl.algorithms import critic_stats

    stats = critic_stats(t([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]), returns, mask, lambda s: s)
    assert stats["value_mean"] == pytest.approx(0.5) and stats["advantage_mean"] == pytest.approx(-0.1)
    assert stats["advantage_std"] == pytest.approx(0.3**0.5) and stats["explained_variance"] == pytest.approx(0.0, abs=1e-9)
