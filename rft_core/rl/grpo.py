"""GRPO advantages (critic-free): each completion's score against its prompt group's scores.

Every token of a completion gets the completion's group-normalised advantage. Groups whose scores
are all equal carry no signal; their share is reported. The KL to the warm-up model, when
`kl_coef > 0`, is a loss term (k3 estimator), not part of the reward.
"""

from __future__ import annotations

import torch

from rft_core.config import RLConfig
from rft_core.rl.advantages import group_advantages


def grpo_advantages(
    scores: torch.Tensor, graded: torch.Tensor, mask: torch.Tensor, cfg: RLConfig
) -> tuple[torch.Tensor, float]:
    """(per-token advantages [N, R], share of groups with no signal) for one process's rows."""
    per_sequence, flat = group_advantages(
        scores, cfg.samples_per_prompt, scale=cfg.grpo.scale_rewards, valid=graded
    )
    return per_sequence[:, None] * mask, float(flat.float().mean()) if len(flat) else 0.0
