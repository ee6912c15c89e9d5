"""Truncated sampling (top_k, top_p, min_p): the kept sets, generation inside them, per-row
reproducibility, and RL log-probabilities that are those of the distribution sampled from."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rft_core.generation import Sampling, generate, kept_tokens, row_seeds
from rft_core.rl.rollout import _token_stats, pack, score_tokens


def kept(probs: list[float], **filters) -> list[int]:
    scores = torch.tensor(probs).log()[None]
    return kept_tokens(scores, Sampling(**filters))[0].nonzero().squeeze(-1).tolist()


def test_kept_sets_by_hand():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert kept_tokens(torch.tensor(probs).log()[None], Sampling()) is None  # nothing on: no mask
    assert kept(probs, top_k=1) == [0]
    assert kept(probs, top_p=0.45) == [0]
    assert kept(probs, top_p=0.75) == [0, 1]  # 0.5 is not enough, 0.5 + 0.3 is
    assert kept(probs, top_p=0.9) == [0, 1, 2]
    assert kept(probs, top_p=0.99) == [0, 1, 2, 3]
    assert kept(probs, min_p=0.25) == [0, 1, 2]  # p >= 0.125
    assert kept(probs, min_p=0.5) == [0, 1]  # p >= 0.25
    assert kept(probs, min_p=1.0) == [0]
    # top_p after top_k sees the renormalised top 2: 0.5 / 0.8 = 0.625 < 0.7 needs both.
    assert kept(probs, top_k=2, top_p=0.7) == [0, 1]
    assert kept(probs, top_k=3, top_p=0.55) == [0, 1]  # 0.5 / 0.95 < 0.55
    assert kept(probs, top_k=3, top_p=0.9, min_p=0.4) == [0, 1]  # min_p: p >= 0.2
    # Ties are kept or dropped together, whatever order a sort puts them in.
    assert kept([0.4, 0.2, 0.2, 0.2], top_p=0.5) == [0, 1, 2, 3]
    assert kept([0.4, 0.2, 0.2, 0.2], top_p=0.4) == [0]


def test_kept_sets_match_transformers_logits_processors():
    torch.manual_seed(0)
    scores = torch.randn(64, 200) * 3
    ids = torch.zeros(64, 1, dtype=torch.long)
    for top_k, top_p, min_p in [(0, 0.9, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.05), (20, 0.8, 0.0), (50, 0.95, 0.02)]:
        expected = scores.clone()
        if top_k:
            expected = TopKLogitsWarper(top_k)(ids, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(ids, expected)
        if min_p:
            expected = MinPLogitsWarper(min_p)(ids, expected)
        mask = kept_tokens(scores, Sampling(top_k=top_k, top_p=top_p, min_p=min_p))
        assert torch.equal(mask, expected > float("-inf")), (top_k, top_p, min_p)


def test_sampling_settings_are_checked():
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"top_k": -1}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_log_probs_are_those_of_the_renormalised_kept_set():
    logits = torch.tensor([[[2.0, 1.0, 0.5, -1.0, -3.0]]], requires_grad=True)
    targets = torch.tensor([[1]])
    sampling = Sampling(temperature=0.5, top_p=0.9)
    logprobs, entropy = _token_stats(logits, targets, sampling)
    probs = torch.softmax(logits.detach()[0, 0] / 0.5, -1)
    keep = kept_tokens(logits.detach() / 0.5, sampling)[0, 0]
    assert keep.tolist() == [True, True, False, False, False]
    q = probs * keep / (probs * keep).sum()
    assert logprobs.item() == pytest.approx(math.log(q[1].item()), abs=1e-6)
    assert entropy.item() == pytest.approx(-(q[:2] * q[:2].log()).sum().item(), abs=1e-6)
    logprobs.sum().backward()
    assert torch.all(logits.grad[0, 0, 2:] == 0)  # dropped tokens take no gradient
    # A token outside the set (a moved policy's view of an old sample) is counted in: finite.
    outside, _ = _token_stats(logits.detach(), torch.tensor([[3]]), sampling, with_entropy=False)
    kept_outside = probs[[0, 1, 3]]
    assert outside.item() == pytest.approx(math.log(probs[3].item() / kept_outside.sum().item()), abs=1e-6)
    # Nothing on: the plain tempered softmax, as a float temperature gives.
    plain, _ = _token_stats(logits.detach(), targets, Sampling(temperature=0.5))
    assert torch.equal(plain, _token_stats(logits.detach(), targets, 0.5)[0])


@pytest.fixture(scope="module")
def peaked_model():
    """A random tiny Llama with large weights: peaked next-token distributions, so the filters bite."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


PROMPTS = [[2, 5, 9, 13, 40], [2, 7], [2, 30, 31, 32, 33, 34, 35, 36]]
KW = {"eos_token_ids": [1], "pad_token_id": 0, "max_new_tokens": 16}
FILTERS = [Sampling(top_p=0.7), Sampling(min_p=0.1), Sampling(temperature=0.8, top_k=12, top_p=0.9, min_p=0.02)]


@pytest.mark.parametrize("sampling", FILTERS, ids=["top_p", "min_p", "all"])
def test_every_sampled_token_lies_in_the_kept_set_of_its_step(peaked_model, sampling):
    seeds = row_seeds(3, range(len(PROMPTS) * 4))
    out = generate(peaked_model, PROMPTS, num_samples=4, seeds=seeds, temperature=sampling.temperature,
                   top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p, **KW)
    dropped_somewhere = False
    for row, completion in enumerate(out.completions):
        ids = torch.tensor([PROMPTS[row // 4] + completion])
        with torch.no_grad():
            logits = peaked_model(ids).logits[0, len(PROMPTS[row // 4]) - 1 : -1].float()
        keep = kept_tokens(logits / sampling.temperature, sampling)
        assert keep[torch.arange(len(completion)), torch.tensor(completion)].all()
        dropped_somewhere |= bool((~keep).any())
    assert dropped_somewhere  # the filters did remove tokens: the test has teeth


@pytest.mark.parametrize("sampling", FILTERS, ids=["top_p", "min_p", "all"])
def test_truncated_samples_depend_only_on_prompt_and_seed(peaked_model, sampling):
    kw = dict(KW, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p)
    seeds = row_seeds(7, range(6))
    together = generate(peaked_model, PROMPTS, num_samples=2, seeds=seeds, **kw)
    alone = generate(peaked_model, PROMPTS[1:2], num_samples=2, seeds=seeds[2:4], **kw)
    assert together.completions[2:4] == alone.completions
    reordered = generate(peaked_model, [PROMPTS[2], PROMPTS[0]], num_samples=2,
                         seeds=torch.cat([seeds[4:6], seeds[0:2]]), **kw)
    assert reordered.completions == together.completions[4:6] + together.completions[0:2]
    assert generate(peaked_model, PROMPTS, num_samples=2, seeds=seeds, **kw).completions == together.completions
    untruncated = generate(peaked_model, PROMPTS, num_samples=2, seeds=seeds, temperature=sampling.temperature, **KW)
    assert untruncated.completions != together.completions


def test_filters_off_sample_exactly_as_without_them(peaked_model):
    seeds = row_seeds(5, range(6))
    plain = generate(peaked_model, PROMPTS, num_samples=2, seeds=seeds, **KW)
    off = generate(peaked_model, PROMPTS, num_samples=2, seeds=seeds, top_k=0, top_p=1.0, min_p=0.0, **KW)
    assert off.completions == plain.completions


@pytest.mark.parametrize("group", [1, 4])
def test_rollout_log_probs_are_the_truncated_sampler_and_the_recomputation_equals_them(peaked_model, group):
    sampling = Sampling(temperature=0.9, top_p=0.8, min_p=0.05)
    seeds = row_seeds(11, range(len(PROMPTS) * 4))
    out = generate(peaked_model, PROMPTS, num_samples=4, seeds=seeds, temperature=0.9, top_p=0.8, min_p=0.05, **KW)
    ids, am, mask = pack([p for p in PROMPTS for _ in range(4)], out.completions, 0)
    with torch.no_grad():
        old, _, _ = score_tokens(peaked_model, ids, am, mask.shape[1], sampling, group_size=group)
        full, _, _ = score_tokens(peaked_model, ids, am, mask.shape[1], 0.9, group_size=group)
    new, _, _ = score_tokens(peaked_model, ids, am, mask.shape[1], sampling, group_size=group, with_entropy=False)
    ratio = torch.exp((new - old) * mask)
    assert torch.equal(ratio, torch.ones_like(ratio))  # the update's first step: ratio exactly 1
    # Renormalising over the kept set raises each sampled token's log-prob (by -log kept mass).
    assert torch.all((old - full)[mask.bool()] >= -1e-6) and torch.any((old - full)[mask.bool()] > 1e-3)


def test_trainer_rollout_scores_the_truncated_sampler_and_its_first_update_has_ratio_one(tmp_path):
    from training_fixtures import tiny_config, tiny_task

    from rft_core.graders import build_grader
    from rft_core.rl.trainer import RLTrainer

    cfg = tiny_config(tmp_path, "model.tiny.pretrain_steps=30", "model.lora.enabled=true", "model.lora.r=4",
                      "rl.iterations=1", "rl.kl_coef=0.05", "rl.temperature=0.9", "rl.top_k=40",
                      "rl.top_p=0.8", "rl.min_p=0.05")
    train, val, model_dir = tiny_task(tmp_path, cfg)
    with build_grader({"type": "numeric_match", "partial_credit": 0.1}) as grader:
        trainer = RLTrainer(cfg, train, val, model_dir, tmp_path / "rl", grader=grader)
        batch = trainer.rollout(0, {})
        mask = batch.response_mask.bool()
        assert mask.any()
        # The KL compares the two truncated samplers: 0 while the policy is the reference.
        assert torch.equal(batch.logprobs, batch.ref_logprobs)
        # The rollout scored the truncated sampler, not the plain tempered softmax.
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        with torch.no_grad():
            full = score_tokens(policy, batch.input_ids, batch.attention_mask, batch.response_length, 0.9)[0]
        assert torch.all((batch.logprobs - full)[mask] >= -1e-5) and torch.any((batch.logprobs - full)[mask] > 1e-3)
        # The update's recomputation at its first step: ratio 1, nothing clipped.
        estimate = trainer.algorithm.advantages(batch, trainer.rl, trainer.processes.sum)
        rows = torch.arange(len(batch.texts))
        out = trainer.losses(batch, rows, estimate, float(batch.response_mask.sum()))
        assert float(out.approx_kl) < 1e-9 and float(out.clipfrac) == 0.0
        input_ids, attention_mask, width = batch.minibatch(rows)
        with torch.no_grad():
            new = trainer.model(input_ids, attention_mask, width, Sampling.of(cfg.rl), trainer.group)[0]
        assert torch.allclose(new * mask[:, :width], batch.logprobs[:, :width] * mask[:, :width], atol=1e-5, rtol=0)
