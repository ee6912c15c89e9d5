"""Rollouts: sample completions, grade them, and score the sampled tokens under policy and reference.

A batch is laid out as [left padding][prompt] (P columns) then [response][right padding] (R columns),
so every response starts at column P and per-token tensors are [rows, R].

Log-probabilities under truncated sampling (rl.top_k, rl.top_p, rl.min_p): every log-probability the
RL update uses, the rollout's (old), the update's (new) and the reference's, is that of the
distribution the sampler draws from: softmax(logits / T) renormalised over the step's kept tokens
(`generation.kept_tokens`), with the sampled token always counted as kept. See `score_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rft_core.generation import CACHE_ARG, Sampling, generate, kept_tokens


class PolicyWithValue(nn.Module):
    """The policy LM and (PPO) a scalar value head on its final hidden state: a shared trunk.

    The head starts at zero, so the first values are 0 and the critic learns from the returns. It
    is trained, so its weights are float32 whatever the policy's storage (mixed precision computes
    it under the same autocast as the policy). Wrapping both in one module lets data-parallel
    training synchronise both, and FSDP shard both.
    """

    def __init__(self, policy: nn.Module, with_value_head: bool):
        super().__init__()
        self.policy = policy
        self.value_head: nn.Linear | None = None
        if with_value_head:
            hidden = policy.config.hidden_size
            self.value_head = nn.Linear(hidden, 1, dtype=torch.float32)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_length: int,
        temperature: float | Sampling,
        group_size: int = 1,
        with_entropy: bool = True,
        detach_value: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probs, values, entropy of the response tokens. `detach_value`: the value head sees the
        trunk's hidden states detached, so a value loss trains the head and nothing else."""
        head = self.value_head
        if detach_value and head is not None:
            head = _DetachedInput(head)
        return score_tokens(
            self.policy, input_ids, attention_mask, response_length, temperature, head, group_size, with_entropy,
        )


class _DetachedInput(nn.Module):
    """A head applied to detached inputs: gradients stop at its input."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.detach())


def _sampling(sampling: Sampling | float) -> Sampling:
    return sampling if isinstance(sampling, Sampling) else Sampling(temperature=float(sampling))


def _token_stats(
    logits: torch.Tensor, targets: torch.Tensor, sampling: Sampling | float, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of `targets` under the sampling distribution (softmax(logits / T) over the
    kept tokens, `targets` always kept), and its entropy (no gradient). A float is a temperature."""
    sampling = _sampling(sampling)
    logits = logits.float() / sampling.temperature
    keep = kept_tokens(logits, sampling)
    if keep is not None:
        keep.scatter_(-1, targets.unsqueeze(-1), True)
        logits = logits.masked_fill(~keep, float("-inf"))
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        weighted = probs * logits if keep is None else torch.where(keep, probs * logits, 0.0)
        entropy = log_norm - weighted.sum(-1)
    return logprobs, entropy


def score_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    sampling: Sampling | float = 1.0,
    value_head: nn.Module | None = None,
    group_size: int = 1,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probabilities of the response tokens under the sampling distribution, values, entropy
    (None without `with_entropy`: the update needs none, and it costs a softmax over the vocabulary).

    `sampling` is the rollout's `Sampling` (a float: a temperature, nothing truncated). With top_k,
    top_p or min_p on, a token's log-probability is that of softmax(logits / T) renormalised over
    the tokens this model's logits keep at that step (`kept_tokens`), the scored token always
    counted in. So the rollout's log-probabilities (old) are those of the distribution each token
    was drawn from, the update recomputes the same numbers at its first step (ratio 1), and a policy
    that moves is scored as the truncated sampler it now is; the reference is scored the same way,
    so the KL compares the two samplers and is 0 while the policy equals the reference. Forcing the
    scored token in keeps every log-probability finite: a token the moved policy would no longer
    keep (or the generation pass kept at a boundary the scoring pass rounds the other way).

    The alternatives, and why not: TRL's GRPOTrainer and verl score old and new log-probs over the
    full vocabulary at temperature T whatever top_p/top_k/min_p sampled (ratio right, but it is the
    ratio of untruncated policies while the behaviour policy is truncated, and the KL then charges
    -log(kept mass) per token even for an unchanged policy: a length penalty). DeepSeek-V3.2's "keep
    sampling mask" (also NeMo-RL, prime-rl's sampling replay) stores each step's kept set from
    sampling and renormalises the new policy over it; it agrees with this at the first step (same
    gradient there) but needs a vocabulary-sized mask per token, which we do not store.

    Only the last R+1 positions' logits are computed (`logits_to_keep`): long prompts cost no
    vocabulary-sized logits. With `group_size` > 1, rows come in groups of that many samples of
    one prompt: the prompt runs once per group and its KV cache is shared by the group's
    responses (gradients flow back through it), which saves (K-1)/K of the prompt's compute.
    """
    if group_size > 1:
        return _score_shared_prompt(
            model, input_ids, attention_mask, response_length, sampling, value_head, group_size, with_entropy
        )
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=value_head is not None,
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    logprobs, entropy = _token_stats(out.logits[:, :-1], input_ids[:, -response_length:], sampling, with_entropy)
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1][:, -response_length - 1 : -1]
        values = value_head(hidden).squeeze(-1).float()
    return logprobs, values, entropy


def _score_shared_prompt(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    sampling: Sampling | float,
    value_head: nn.Module | None,
    group_size: int,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    from transformers import DynamicCache

    if len(input_ids) % group_size:
        raise ValueError(f"{len(input_ids)} rows do not make groups of {group_size}")
    width = input_ids.shape[1] - response_length
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    want_hidden = value_head is not None
    head = model(
        input_ids=input_ids[::group_size, :width],
        attention_mask=attention_mask[::group_size, :width],
        position_ids=position_ids[::group_size, :width],
        **{CACHE_ARG: DynamicCache()},
        use_cache=True,
        output_hidden_states=want_hidden,
        logits_to_keep=1,
    )
    logits = [head.logits[:, -1:].repeat_interleave(group_size, dim=0)]
    hidden = [head.hidden_states[-1][:, -1:].repeat_interleave(group_size, dim=0)] if want_hidden else []
    if response_length > 1:
        cache = getattr(head, CACHE_ARG)
        cache.batch_repeat_interleave(group_size)
        # The last response token is only a target: it predicts nothing we score.
        tail = model(
            input_ids=input_ids[:, width:-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=position_ids[:, width:-1],
            **{CACHE_ARG: cache},
            use_cache=True,
            output_hidden_states=want_hidden,
        )
        logits.append(tail.logits)
        if want_hidden:
            hidden.append(tail.hidden_states[-1])
    logprobs, entropy = _token_stats(torch.cat(logits, dim=1), input_ids[:, width:], sampling, with_entropy)
    values = value_head(torch.cat(hidden, dim=1)).squeeze(-1).float() if want_hidden else None
    return logprobs, values, entropy


@dataclass
class Rollout:
    """One process's share of an iteration's samples and everything the update needs."""

    input_ids: torch.Tensor  # [N, P + R]
    attention_mask: torch.Tensor  # [N, P + R]
    response_mask: torch.Tensor  # [N, R]: real response tokens of validly graded samples
    item_indices: list[int]  # training item of each row
    texts: list[str]  # decoded completions
    scores: torch.Tensor  # [N] grader rewards (0 where the grader failed; see `graded`)
    graded: torch.Tensor  # [N] bool: the grader returned a reward
    stopped: list[bool]  # the completion ended with EOS
    logprobs: torch.Tensor | None = None  # [N, R] policy at sampling time
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    errors: list[str] = field(default_factory=list)  # the first grader errors (shown if it mostly fails)

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    def group_widths(self, group_size: int = 1) -> torch.Tensor:
        """A sort key per group of `group_size` consecutive rows: its longest response, then its
        longest prompt (what a minibatch of such groups is padded to)."""
        prompt_width = self.input_ids.shape[1] - self.response_length
        response = self.response_mask.sum(1).view(-1, group_size).amax(1)
        prompt = self.attention_mask[:, :prompt_width].sum(1).view(-1, group_size).amax(1)
        return response * (prompt_width + 1) + prompt

    def by_length(self, group_size: int = 1) -> torch.Tensor:
        """Every row, groups of `group_size` consecutive rows kept together, ordered by
        `group_widths`: consecutive chunks of this order have similar widths, so `minibatch` trims
        most of their padding (a batch padded to its longest row spends about a third of a forward
        pass on padding at the demo's lengths)."""
        return group_rows(torch.argsort(self.group_widths(group_size), stable=True), group_size)

    def minibatch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """input_ids, attention_mask and response width of `rows`, without the columns that are
        padding in every one of them: less compute, same result."""
        mask = self.response_mask[rows]
        width = max(1, int(mask.sum(0).nonzero().max().item()) + 1) if mask.any() else 1
        attention_mask = self.attention_mask[rows]
        prompt_width = self.input_ids.shape[1] - self.response_length
        prompt_mask = attention_mask[:, :prompt_width]
        first = int((prompt_mask.sum(0) > 0).nonzero().min().item()) if prompt_mask.any() else 0
        end = prompt_width + width
        return self.input_ids[rows, first:end], attention_mask[:, first:end], width


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """The rows of `groups` (indices of groups of `group_size` consecutive rows), in that order."""
    return (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)


def pack(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[left-padded prompts | right-padded completions] ids, attention mask, response mask."""
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(c) for c in completions))
    n = len(prompts)
    input_ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((n, width_r), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[i, width_p - len(p) : width_p] = torch.as_tensor(list(p), dtype=torch.long)
        attention_mask[i, width_p - len(p) : width_p] = 1
        if c:
            input_ids[i, width_p : width_p + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            attention_mask[i, width_p : width_p + len(c)] = 1
            response_mask[i, : len(c)] = 1
    return input_ids, attention_mask, response_mask


def sample_rollout(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    item_indices: Sequence[int],
    *,
    samples_per_prompt: int,
    seeds: torch.Tensor,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    batch_size: int,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> tuple[list[list[int]], list[int], list[list[int]], list[bool]]:
    """Generate `samples_per_prompt` completions per prompt, in generation batches.

    Returns per row: its prompt ids, item index, completion ids, stopped-on-EOS.
    """
    k = samples_per_prompt
    rows_prompts, rows_items, rows_completions, rows_stopped = [], [], [], []
    per_batch = max(1, batch_size // k)
    for start in range(0, len(prompts), per_batch):
        chunk = range(start, min(len(prompts), start + per_batch))
        out = generate(
            model,
            [prompts[i] for i in chunk],
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            max_new_tokens=max_new_tokens,
            num_samples=k,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seeds=seeds[start * k : (start + len(chunk)) * k],
        )
        for j, i in enumerate(chunk):
            for s in range(k):
                rows_prompts.append(list(prompts[i]))
                rows_items.append(item_indices[i])
                rows_completions.append(out.completions[j * k + s])
                rows_stopped.append(out.stopped[j * k + s])
    return rows_prompts, rows_items, rows_completions, rows_stopped
