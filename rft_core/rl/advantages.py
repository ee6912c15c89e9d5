"""The maths of the rewards side: KL penalty, terminal rewards, GAE, whitening, group advantages.

Tensors are [batch, response_tokens] with a 0/1 `mask` marking real response tokens (padding after
the end of each response is 0). Pure functions, tested against hand-computed values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over processes (the identity in one process)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of policy vs reference from sampled tokens' log-probabilities.

    k1 = log p - log q (unbiased, can be negative per token; ReFT and TRL's PPO use it);
    k3 = (q/p) - 1 - log(q/p) (unbiased, always >= 0; GRPO uses it).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def terminal_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL on every response token, plus the score on the last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores * (mask.sum(1) > 0)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns (advantages, returns = advantages + values).

    The value after a response's last token is 0 (the episode ends there).
    """
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        # Past the end of a response nothing accumulates (mask 0 there).
        last_gae = last_gae * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def masked_moments(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None) -> tuple[float, float, float]:
    """(mean, unbiased variance, count) of the masked entries of `x`; with `reduce` (a sum over
    processes), of every process's entries together."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).to(torch.float64)
    if reduce is not None:
        stats = reduce(stats)
    total, total_sq, n = stats.tolist()
    mean = total / max(n, 1.0)
    var = (total_sq - n * mean * mean) / max(n - 1.0, 1.0)
    return mean, max(var, 0.0), n


def whiten(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); masked-out entries become 0.

    With `reduce` (a sum over processes), the statistics are those of every process's entries
    together, so a batch split over processes is whitened as the whole batch would be.
    """
    mean, var, _ = masked_moments(x, mask, reduce)
    return ((x - mean) / (var + eps) ** 0.5) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None) -> float:
    """1 - Var[returns - values] / Var[returns] over the masked tokens: 1 when the critic predicts the
    returns, 0 when it does no better than their mean, negative when it does worse (cleanrl's
    `explained_var`). 0 when the returns do not vary."""
    _, var_returns, _ = masked_moments(returns, mask, reduce)
    _, var_error, _ = masked_moments(returns - values, mask, reduce)
    return 1.0 - var_error / var_returns if var_returns > 0 else 0.0


def flat_groups(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """One boolean per group of `group_size` consecutive rows: True when the group's valid scores
    are all equal (every sample right, or every one wrong: nothing to compare), or none is valid.

    >>> flat_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2).tolist()
    [True, False, True]
    """
    groups = scores.view(-1, group_size).to(torch.float64)
    ok = torch.ones_like(groups, dtype=torch.bool) if valid is None else valid.view(-1, group_size).bool()
    big = torch.finfo(groups.dtype).max
    hi = torch.where(ok, groups, -big).max(1).values
    lo = torch.where(ok, groups, big).min(1).values
    return (hi - lo) <= 0


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    scale: bool = True,
    valid: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: each score minus its group's mean (divided by the group's std when `scale`).

    Rows are grouped consecutively (`group_size` samples of one prompt). Rows where `valid` is
    False (the grader failed) take no part in their group's statistics and get advantage 0.
    Also returns a boolean per group: True when its valid scores are all equal (no signal).
    """
    groups = scores.view(-1, group_size).to(torch.float64)
    ok = torch.ones_like(groups) if valid is None else valid.view(-1, group_size).to(groups.dtype)
    n = ok.sum(1, keepdim=True)
    mean = (groups * ok).sum(1, keepdim=True) / n.clamp(min=1)
    var = (((groups - mean) ** 2) * ok).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    flat = flat_groups(scores, group_size, valid)
    advantages = (groups - mean) * ok
    if scale:
        advantages = advantages / (var.sqrt() + eps)
    advantages = advantages.masked_fill(flat[:, None], 0.0)
    return advantages.reshape(-1).to(scores.dtype), flat
