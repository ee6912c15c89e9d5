"""Batched sampling with a KV cache, reproducible per row.

Each completion is a pure function of (model, prompt, its own seed): noise comes from a counter-based
hash of (seed, step, token id) and sampling is Gumbel-max. So a sample does not depend on which
other prompts share its batch, how many processes split the batch, or whether the run was resumed.

Truncated sampling (`Sampling`: top-k, then top-p, then min-p, as transformers' logits processors
apply them) keeps a set of tokens at each step and samples from the tempered softmax renormalised over
it; `kept_tokens` is that set, and the one definition that generation and the RL log-probs share
(`rft_core.rl.rollout.score_tokens`). The set depends only on the row's own logits, so samples stay
reproducible per row.

Also: the prompt is prefilled once and its cache repeated for the `samples_per_prompt` copies, and
finished rows leave the batch, so long prompts and uneven lengths cost little.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, LlamaForCausalLM

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache` (the
# old name still works there, with a deprecation warning): use the name this release has.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

_MASK32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # below 2**31, so products of 32-bit values stay inside int64


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (Wellons' lowbias-style) on int64 tensors holding 32-bit values."""
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    return (x >> 16) ^ x


def gumbel_noise(seeds: torch.Tensor, step: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise [rows, vocab], a deterministic function of (seed, step, token id)."""
    row = _hash32((seeds.to(device=device, dtype=torch.int64) & _MASK32) ^ _hash32(torch.tensor(step, device=device)))
    vocab = torch.arange(vocab_size, device=device, dtype=torch.int64)
    bits = _hash32(row[:, None] ^ _hash32(vocab + 0x9E37)[None, :])
    uniform = (bits.to(torch.float64) + 0.5) / 4294967296.0
    return -torch.log(-torch.log(uniform))


def row_seeds(seed: int, keys: Sequence[int]) -> torch.Tensor:
    """Per-row seeds from a run seed and stable row keys (e.g. item index * K + sample index)."""
    keys_t = torch.as_tensor(list(keys), dtype=torch.int64)
    return _hash32((keys_t & _MASK32) ^ _hash32(torch.tensor(seed & _MASK32)))


@dataclass(frozen=True)
class Sampling:
    """How a token is drawn: softmax(logits / temperature), truncated to the top `top_k` tokens
    (0: off), then to the nucleus of mass `top_p` (1: off), then to the tokens at least `min_p` times
    as probable as the most probable one (0: off), renormalised."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @classmethod
    def of(cls, section: Any) -> Sampling:
        """The sampling settings of a config section (rl, eval): its temperature, top_k, top_p, min_p."""
        return cls(section.temperature, section.top_k, section.top_p, section.min_p)

    @property
    def truncates(self) -> bool:
        """Whether any filter is on (otherwise every token stays possible)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


@torch.no_grad()
def kept_tokens(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor | None:
    """The tokens a step may sample: a bool mask shaped like `scores` (logits / temperature, last
    dimension the vocabulary), or None when no filter is on.

    Each filter looks at what the previous ones kept, renormalised: top-k keeps the tokens scoring at
    least the k-th best; top-p keeps the most probable tokens until their mass reaches `top_p` (a
    token is kept when the tokens strictly more probable than it hold less than `top_p`, so ties are
    kept or dropped together and the order of equal scores never matters); min-p keeps the tokens
    with probability >= min_p x the largest. The most probable token is always kept.
    """
    if not sampling.truncates:
        return None
    scores = scores.float()
    keep = torch.ones_like(scores, dtype=torch.bool)
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        keep &= scores >= kth
    if sampling.top_p < 1.0:
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        sorted_probs = probs.sort(dim=-1, descending=True, stable=True).values
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
        # The least probable token of the nucleus; every token at least as probable is kept.
        smallest = sorted_probs.masked_fill(mass_before >= sampling.top_p, float("inf")).amin(-1, keepdim=True)
        keep &= probs >= smallest
    if sampling.min_p > 0.0:
        best = scores.masked_fill(~keep, float("-inf")).amax(-1, keepdim=True)
        keep &= scores >= best + math.log(sampling.min_p)  # p >= min_p * p_max, in log space
    return keep


@dataclass
class Generated:
    """Completions of one call: token ids per row (EOS kept when the row stopped on it)."""

    completions: list[list[int]]
    stopped: list[bool]  # True when the row ended on EOS, False when it hit max_new_tokens


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seeds: torch.Tensor | None = None,
    on_step: Callable[[list[int], list[int]], None] | None = None,
) -> Generated:
    """Sample `num_samples` completions for each prompt (greedy when `seeds` is None).

    Rows come out prompt-major: prompt 0's samples, then prompt 1's. `seeds` has one seed per
    output row (len(prompts) * num_samples). Sampling draws from softmax(logits / temperature)
    over `kept_tokens` (top_k, top_p, min_p: see `Sampling`). `on_step(rows, tokens)` is told each
    step's new token of every row still generating, as it is chosen (to stream a completion).
    """
    sampling = Sampling(temperature, top_k, top_p, min_p)
    device = next(model.parameters()).device
    n_prompts = len(prompts)
    n_rows = n_prompts * num_samples
    if seeds is not None and len(seeds) != n_rows:
        raise ValueError(f"need {n_rows} seeds, got {len(seeds)}")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((n_prompts, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n_prompts, width), dtype=torch.long)
    for i, ids in enumerate(prompts):  # left padding: every row's next token lands at the same column
        input_ids[i, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    cache = DynamicCache()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{CACHE_ARG: cache},
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(out, CACHE_ARG)
    logits = out.logits[:, -1, :]
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
        position_ids = position_ids.repeat_interleave(num_samples, dim=0)
    next_position = position_ids[:, -1] + 1

    eos = torch.as_tensor(list(eos_token_ids), device=device)
    completions: list[list[int]] = [[] for _ in range(n_rows)]
    stopped = [False] * n_rows
    active = torch.arange(n_rows, device=device)  # output rows still generating, in batch order
    row_seed = seeds.to(device) if seeds is not None else None

    for step in range(max_new_tokens):
        logits = logits.float()
        if row_seed is None:
            tokens = logits.argmax(-1)
        else:
            scores = logits / temperature
            keep = kept_tokens(scores, sampling)
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            noise = gumbel_noise(row_seed[active], step, scores.shape[-1], device)
            tokens = (scores.double() + noise).argmax(-1)
        finished = torch.isin(tokens, eos)
        rows, new_tokens = active.tolist(), tokens.tolist()
        for row, token, done in zip(rows, new_tokens, finished.tolist(), strict=True):
            completions[row].append(token)
            stopped[row] = done
        if on_step is not None:
            on_step(rows, new_tokens)
        if step == max_new_tokens - 1:
            break
        keep = ~finished
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            index = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(index)
            active, tokens = active[index], tokens[index]
            attention_mask, next_position = attention_mask[index], next_position[index]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=-1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=next_position[:, None],
            **{CACHE_ARG: cache},
            use_cache=True,
        )
        cache = getattr(out, CACHE_ARG)
        logits = out.logits[:, -1, :]
        next_position = next_position + 1
    return Generated(completions=completions, stopped=stopped)
