"""PPO and GRPO: the one place where they differ.

The trainer runs the same iteration for both: rollout -> advantages -> epochs x minibatches of the
clipped policy loss. An algorithm is its advantage estimator, whether a value head (critic) trains
beside the policy, and where the KL to the warm-up model goes: a per-token penalty in the reward
(PPO, as ReFT) or a k3 term of the loss (GRPO).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rft_core.config import RLConfig
from rft_core.rl.advantages import Reduce, explained_variance, masked_moments
from rft_core.rl.grpo import grpo_advantages
from rft_core.rl.losses import LOSS_STATS
from rft_core.rl.ppo import ppo_advantages
from rft_core.rl.rollout import Rollout


@dataclass
class Estimate:
    """An estimator's output for one process's rows (per-token tensors are [N, R])."""

    advantages: torch.Tensor
    returns: torch.Tensor | None  # the critic's targets; None without a critic
    kl: torch.Tensor  # per-token KL to the reference, reported as rl/kl (0 without a reference)
    stats: dict[str, float]  # the estimator's own statistics, averaged over processes when reported


def ppo_estimate(batch: Rollout, cfg: RLConfig, reduce: Reduce) -> Estimate:
    """GAE on the critic's values; reward = score on the last token - kl_coef x KL per token."""
    mask = batch.response_mask
    advantages, returns, kl = ppo_advantages(
        batch.scores, batch.logprobs, batch.ref_logprobs, batch.values, mask, cfg, reduce
    )
    return Estimate(advantages, returns, kl, critic_stats(batch.values, returns, mask, reduce))


def critic_stats(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce) -> dict[str, float]:
    """How well the critic predicts, and the advantages before whitening (returns - values: GAE's
    output), over every process's response tokens: what moves first when PPO goes wrong."""
    values = values * mask
    advantage_mean, advantage_var, _ = masked_moments(returns - values, mask, reduce)
    value_mean, _, _ = masked_moments(values, mask, reduce)
    return {
        "advantage_mean": advantage_mean,
        "advantage_std": advantage_var**0.5,
        "value_mean": value_mean,
        "explained_variance": explained_variance(values, returns, mask, reduce),
    }


def grpo_estimate(batch: Rollout, cfg: RLConfig, reduce: Reduce) -> Estimate:
    """Each sample's score against its prompt group's; the KL (a loss term here) is only reported."""
    mask = batch.response_mask
    advantages, zero_std = grpo_advantages(batch.scores, batch.graded, mask, cfg)
    kl = (batch.logprobs - batch.ref_logprobs) * mask if batch.ref_logprobs is not None else torch.zeros_like(mask)
    return Estimate(advantages, None, kl, {"zero_std_groups": zero_std})


@dataclass(frozen=True)
class Algorithm:
    """What the trainer asks of an algorithm."""

    advantages: Callable[[Rollout, RLConfig, Reduce], Estimate]
    value_head: bool  # a critic on the policy's trunk, trained by the clipped value loss
    kl_in_loss: bool  # the KL to the reference is a loss term (else a penalty inside the reward)
    min_samples_per_prompt: int = 1

    @property
    def loss_stats(self) -> tuple[str, ...]:
        """The update statistics it reports: no value loss without a critic, no KL term outside the loss."""
        absent = set()
        if not self.value_head:
            absent |= {"vf_loss", "vf_clipfrac"}
        if not self.kl_in_loss:
            absent.add("kl_loss")
        return tuple(key for key in LOSS_STATS if key not in absent)


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(ppo_estimate, value_head=True, kl_in_loss=False),
    "grpo": Algorithm(grpo_estimate, value_head=False, kl_in_loss=True, min_samples_per_prompt=2),
}
