"""Gradient checkpointing in RL updates, and RL's "no dropout anywhere" in training mode.

transformers checkpoints decoder layers only in training mode; RL updates run in training mode with
every dropout disabled, so checkpointing works and sampling, scoring and updates still see one
policy. Memory is measured with torch's profiler (every allocation and free of the update, in
order), as a ratio of two updates in this process: no timing thresholds.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from training_fixtures import tiny_config, tiny_task
from transformers import AutoConfig, AutoModelForCausalLM

from rft_core.graders import build_grader
from rft_core.rl.rollout import score_tokens
from rft_core.rl.trainer import RLTrainer

# Deeper and longer than the other tests' tiny model, so that layer activations dominate an update.
MODEL = ["model.tiny.pretrain_steps=0", "model.tiny.num_layers=6", "model.tiny.hidden_size=64",
         "model.tiny.num_heads=4", "model.tiny.intermediate_size=256"]
RL = ["rl.iterations=1", "rl.prompts_per_iteration=4", "rl.samples_per_prompt=4", "rl.minibatch_size=16",
      "rl.ppo_epochs=1", "rl.max_new_tokens=64", "rl.shared_prompt_forward=false", "rl.kl_coef=0.05",
      "rl.critic_warmup=0"]
SIMILARITY = {"type": "text_similarity", "name": "sim", "evaluation_metric": "fuzzy_match",
              "input": "{{ sample.output_text }}", "reference": "Ann has 9 pens. 9+13=22. #### 22"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("task")
    train, val, model_dir = tiny_task(tmp, tiny_config(tmp, *MODEL))
    return train, val, model_dir


@pytest.fixture(scope="module")
def grader():
    with build_grader(SIMILARITY) as g:
        yield g


def trainer(task, tmp_path, grader, *overrides, model_dir=None):
    train, val, tiny_dir = task
    cfg = tiny_config(tmp_path, *MODEL, *RL, *overrides)
    return RLTrainer(cfg, train, val, model_dir or tiny_dir, tmp_path / "rl", grader=grader)


def count_calls(module: torch.nn.Module) -> list[int]:
    """Counts calls of `module.forward`, recomputations included (checkpointing reruns forward
    functions, not the module hooks)."""
    calls = [0]
    forward = module.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def peak_bytes(fn) -> int:
    """The most memory held at once by what `fn` allocates (net of what it frees), on the CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def test_rl_updates_recompute_layers_with_less_memory_and_the_same_result(task, tmp_path, grader):
    plain = trainer(task, tmp_path / "plain", grader)
    checkpointed = trainer(task, tmp_path / "checkpointed", grader, "model.gradient_checkpointing=true")
    batch = plain.rollout(0, {})
    assert batch.response_length > 32
    calls, peaks = {}, {}
    for name, t in (("plain", plain), ("checkpointed", checkpointed)):
        calls[name] = count_calls(t.policy.model.layers[0].mlp)
        peaks[name] = peak_bytes(lambda t=t: t.update(batch, 0, {}))
        assert not t.model.training  # evaluation mode again after the update
    # One forward pass per micro-batch, plus its recomputation in the backward pass.
    assert calls["plain"][0] >= 1
    assert calls["checkpointed"][0] == 2 * calls["plain"][0]
    print(f"update peak memory: {peaks['checkpointed'] / peaks['plain']:.2f} of plain; mlp calls {calls}")
    assert peaks["checkpointed"] < 0.7 * peaks["plain"]
    for (name, a), b in zip(plain.policy.named_parameters(), checkpointed.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(plain.module.value_head.weight, checkpointed.module.value_head.weight)


def test_rl_training_mode_has_no_dropout_anywhere(task, tmp_path, grader):
    _, _, model_dir = task
    # A model that ships with attention dropout, trained with LoRA adapters that have dropout too.
    noisy = tmp_path / "noisy"
    config = AutoConfig.from_pretrained(model_dir)
    config.attention_dropout = 0.5
    AutoModelForCausalLM.from_pretrained(model_dir, config=config).save_pretrained(noisy)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / f).exists():
            (noisy / f).write_bytes((model_dir / f).read_bytes())
    t = trainer(task, tmp_path, grader, "model.lora.enabled=true", "model.lora.dropout=0.5",
                "model.gradient_checkpointing=true", model_dir=noisy)
    batch = t.rollout(0, {})
    ids, mask, width = batch.input_ids[:8], batch.attention_mask[:8], batch.response_length
    scores = []
    for training in (False, True, True):
        t.model.train(training)
        with torch.enable_grad():
            scores.append(score_tokens(t.policy, ids, mask, width)[0].detach())
    t.model.eval()
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[1], scores[2])
    # The saved model keeps the settings it came with.
    assert t.policy.config.attention_dropout == 0.5


@pytest.mark.parametrize("architecture", ["gpt2", "qwen2"])
def test_disabled_dropout_makes_training_mode_compute_what_evaluation_mode_does(architecture):
    from transformers import GPT2Config, Qwen2Config

    from rft_core.training import disable_dropout

    if architecture == "gpt2":  # dropout modules: embeddings, attention, residuals
        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, embd_pdrop=0.5, attn_pdrop=0.5,
                            resid_pdrop=0.5)
    else:  # a rate the attention applies itself when training
        config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    ids = torch.randint(0, 64, (2, 12))
    evaluation = model.eval()(ids).logits
    assert not torch.equal(model.train()(ids).logits, evaluation)  # the dropout is real
    disable_dropout(model)
    assert torch.equal(model.train()(ids).logits, evaluation)
