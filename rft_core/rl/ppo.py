"""PPO advantages as in ReFT: terminal grader score, per-token KL penalty, GAE, whitening; the
critic's targets may use a lambda of their own (`rl.critic_lam`, VC-PPO's decoupled GAE).

The reward of a response token is -kl_coef * KL(policy || warm-up) at that token, plus the grader's
score on the last token. The critic's values (a head on the policy's last hidden state) give GAE
advantages; advantages are whitened over the whole batch (all processes).
"""

from __future__ import annotations

import torch

from rft_core.config import RLConfig
from rft_core.rl.advantages import Reduce, gae, kl_penalty, terminal_rewards, whiten


def ppo_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    values: torch.Tensor,
    mask: torch.Tensor,
    cfg: RLConfig,
    reduce: Reduce,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, per-token KL) for one process's rows."""
    if ref_logprobs is None:
        kl = torch.zeros_like(logprobs)
    else:
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = terminal_rewards(scores, kl, mask, cfg.kl_coef)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.critic_lam is not None and cfg.critic_lam != cfg.lam:
        # Decoupled GAE: the critic learns from its own lambda's returns (1.0: Monte-Carlo).
        _, returns = gae(rewards, values, mask, cfg.gamma, cfg.critic_lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask, reduce)
    return advantages, returns, kl
