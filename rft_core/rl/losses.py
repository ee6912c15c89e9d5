"""The losses of the policy update: clipped surrogate, clipped value loss, and their statistics.

Losses are sums over tokens divided by `normaliser` (the number of response tokens in the whole
minibatch across processes), so that data-parallel processes add up to the single-process loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_STATS = ("pg_loss", "vf_loss", "kl_loss", "clipfrac", "approx_kl", "vf_clipfrac")


@dataclass
class LossOutput:
    loss: torch.Tensor
    pg_loss: torch.Tensor
    vf_loss: torch.Tensor
    kl_loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    vf_clipfrac: torch.Tensor

    def stats(self) -> torch.Tensor:
        """The terms and statistics of the loss, in `LOSS_STATS` order: a float64 vector, no gradient."""
        return torch.tensor([float(getattr(self, key).detach()) for key in LOSS_STATS], dtype=torch.float64)


def _normalised(x: torch.Tensor, mask: torch.Tensor, normaliser: float | torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / normaliser


def ppo_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    vf_clip_range: float = 0.2,
    vf_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    normaliser: float | torch.Tensor | None = None,
) -> LossOutput:
    """PPO-clip policy loss, plus (PPO) the clipped value loss or (GRPO) a k3 KL term to the reference.

    pg_loss  = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))), r = exp(logp - logp_old)
    vf_loss  = 0.5 * mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))
    kl_loss  = mean(k3(logp, logp_ref))
    loss     = pg_loss + vf_coef * vf_loss + kl_coef * kl_loss
    """
    mask = mask.to(logprobs.dtype)
    if normaliser is None:
        normaliser = mask.sum().clamp(min=1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = _normalised(torch.maximum(pg_losses, pg_losses_clipped), mask, normaliser)
    loss = pg_loss
    zero = logprobs.new_zeros(())
    vf_loss, vf_clipfrac, kl_loss = zero, zero, zero
    if values is not None:
        assert old_values is not None and returns is not None
        values_clipped = old_values + torch.clamp(values - old_values, -vf_clip_range, vf_clip_range)
        vf_losses = (values - returns) ** 2
        vf_losses_clipped = (values_clipped - returns) ** 2
        vf_loss = 0.5 * _normalised(torch.maximum(vf_losses, vf_losses_clipped), mask, normaliser)
        vf_clipfrac = _normalised((vf_losses_clipped > vf_losses).to(mask.dtype), mask, normaliser).detach()
        loss = loss + vf_coef * vf_loss
    if ref_logprobs is not None and kl_coef > 0:
        ref_log_ratio = ref_logprobs - logprobs
        kl_loss = _normalised(torch.expm1(ref_log_ratio) - ref_log_ratio, mask, normaliser)
        loss = loss + kl_coef * kl_loss
    with torch.no_grad():
        clipfrac = _normalised((pg_losses_clipped > pg_losses).to(mask.dtype), mask, normaliser)
        # cleanrl's estimator of KL(old || new): (r - 1) - log r, >= 0 per token.
        approx_kl = _normalised((ratio - 1.0) - log_ratio, mask, normaliser)
    return LossOutput(loss, pg_loss, vf_loss, kl_loss, clipfrac, approx_kl, vf_clipfrac)
