"""Models, generation, SFT, PPO/GRPO and evaluation on a tiny real model."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from training_fixtures import Crash, crash_at, tiny_config, tiny_task
from transformers import AutoModelForCausalLM, AutoTokenizer

from rft_core.checkpoint import CheckpointMismatchError
from rft_core.evaluate import evaluate, pass_and_majority, validation_metrics
from rft_core.generation import generate, row_seeds
from rft_core.graders import build_grader
from rft_core.models import load_model, load_tokenizer
from rft_core.rl.trainer import RLTrainer, run_rl
from rft_core.sft import collate, run_sft, sft_examples


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("task")
    cfg = tiny_config(tmp)
    train, val, model_dir = tiny_task(tmp, cfg)
    return cfg, train, val, model_dir


@pytest.fixture(scope="module")
def grader():
    with build_grader({"type": "numeric_match", "partial_credit": 0.1}) as g:
        yield g


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_tiny_model_loads_back_like_a_hub_model(task):
    cfg, _, _, model_dir = task
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "Ann has 9 pens. Bob: 9+13=22.\n#### 22"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.tokenize("123") == ["1", "2", "3"]  # digits one by one
    ours = load_model(model_dir, cfg.model)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert torch.equal(model(ids).logits, ours(ids).logits)


def test_sampling_depends_only_on_the_row_seed_not_on_the_batch(task):
    cfg, _, _, model_dir = task
    model = load_model(model_dir, cfg.model).eval()
    tok = load_tokenizer(model_dir)
    prompts = [tok("Ann has 9 pens.")["input_ids"], tok("Bob")["input_ids"], tok("How many?")["input_ids"]]
    kw = {"eos_token_ids": [tok.eos_token_id], "pad_token_id": tok.pad_token_id, "max_new_tokens": 12}
    seeds = row_seeds(7, range(6))
    together = generate(model, prompts, num_samples=2, seeds=seeds, **kw)
    alone = generate(model, prompts[1:2], num_samples=2, seeds=seeds[2:4], **kw)
    assert together.completions[2:4] == alone.completions
    again = generate(model, prompts, num_samples=2, seeds=seeds, **kw)
    assert again.completions == together.completions
    other = generate(model, prompts, num_samples=2, seeds=row_seeds(8, range(6)), **kw)
    assert other.completions != together.completions


def test_greedy_generation_matches_transformers_generate(task):
    cfg, _, _, model_dir = task
    model = load_model(model_dir, cfg.model).eval()
    tok = load_tokenizer(model_dir)
    prompts = [tok("Ann has 9 pens. Bob has")["input_ids"], tok("Cal")["input_ids"]]
    ours = generate(model, prompts, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, max_new_tokens=10)
    for prompt, completion in zip(prompts, ours.completions, strict=True):
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )[0, len(prompt):].tolist()
        assert completion == ref[: len(completion)]


def test_sft_examples_mask_the_prompt_and_end_with_eos(task):
    cfg, train, _, model_dir = task
    tok = load_tokenizer(model_dir)
    examples = sft_examples(train, tok, cfg)
    assert len(examples) == sum(isinstance(s, str) for s in train["solution"])
    batch = collate(examples[:2], tok.pad_token_id)
    first = examples[0]
    labels = batch["labels"][0]
    assert (labels[: len(first.prompt_ids)] == -100).all()
    assert labels[len(first.prompt_ids) + len(first.completion_ids) - 1].item() == tok.eos_token_id
    assert "####" in tok.decode(first.completion_ids)


def test_sft_moves_weights_lowers_loss_and_resumes_exactly(task, tmp_path, grader):
    cfg, train, val, model_dir = task
    cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"keep_best": False})})
    losses = []
    result = run_sft(cfg, train, val, model_dir, tmp_path / "full", grader=grader,
                     log=lambda m, s: losses.append(m["loss"]) if "loss" in m else None)
    assert losses[-1] < losses[0]
    trained, base = weights(tmp_path / "full" / "model"), weights(model_dir)
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert "val_accuracy" in result.metrics and "val_loss" in result.metrics

    with pytest.raises(Crash):
        run_sft(cfg, train, val, model_dir, tmp_path / "resumed", grader=grader, log=crash_at(5))
    assert (tmp_path / "resumed" / "checkpoints" / "step-4").is_dir()
    run_sft(cfg, train, val, model_dir, tmp_path / "resumed", grader=grader)
    resumed = weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)


def test_lora_sft_merges_the_adapter_into_a_full_model(task, tmp_path, grader):
    cfg, train, val, model_dir = task
    cfg = tiny_config(tmp_path, "model.lora.enabled=true", "model.lora.r=4", "sft.max_steps=3",
                      "sft.keep_best=false")
    result = run_sft(cfg, train, val, model_dir, tmp_path / "sft", grader=grader)
    out = tmp_path / "sft" / "model"
    assert not (out / "adapter_config.json").exists()
    merged, base = weights(out), weights(model_dir)
    assert set(merged) == set(base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    assert result.model_dir == str(out)


@pytest.mark.parametrize("lora", [False, True])
def test_kl_to_the_reference_is_exactly_zero_before_the_first_update(task, tmp_path, grader, lora):
    cfg, train, val, model_dir = task
    cfg = tiny_config(tmp_path, f"model.lora.enabled={str(lora).lower()}", "rl.kl_coef=0.05")
    trainer = RLTrainer(cfg, train, val, model_dir, tmp_path / "rl", grader=grader)
    if lora:
        assert trainer.reference is None  # adapters off is the reference: no second copy
    batch = trainer.rollout(0, {})
    if lora:
        # Adapters off is the very same module: bit for bit.
        assert torch.equal(batch.logprobs, batch.ref_logprobs)
    else:
        # A second copy of the weights: equal up to float summation order in its kernels.
        assert torch.allclose(batch.logprobs, batch.ref_logprobs, atol=1e-5, rtol=0)
    assert torch.equal(batch.values, torch.zeros_like(batch.values))  # zero-initialised head


def test_ppo_iteration_moves_the_policy_and_value_head(task, tmp_path, grader):
    cfg, train, val, model_dir = task
    cfg = tiny_config(tmp_path, "rl.iterations=1")
    trainer = RLTrainer(cfg, train, val, model_dir, tmp_path / "rl", grader=grader)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    batch = trainer.rollout(0, {})
    # Make sure there is signal: grade a correct answer into one row by hand is not possible here,
    # but the KL and value terms always give gradients once the head moves.
    stats = trainer.update(batch, 0, {})
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    head = trainer.module.value_head
    assert head.weight.abs().sum() > 0 or head.bias.abs().sum() > 0
    for key in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "kl"):
        assert key in stats


def test_rl_resume_after_a_crash_gives_the_same_final_model_and_metrics(task, tmp_path, grader):
    cfg, train, val, model_dir = task
    # Cosine decay with a warm-up step: the learning rate is part of what a resume must restore.
    cfg = tiny_config(tmp_path, "rl.iterations=3", "rl.lr_scheduler=cosine", "rl.warmup_steps=1")
    logged_full = []
    full = run_rl(cfg, train, val, model_dir, tmp_path / "full", grader=grader,
                  log=lambda m, s: logged_full.append((s, m)))
    with pytest.raises(Crash):
        run_rl(cfg, train, val, model_dir, tmp_path / "resumed", grader=grader, log=crash_at(3))
    assert (tmp_path / "resumed" / "checkpoints" / "step-2").is_dir()
    logged = []
    resumed = run_rl(cfg, train, val, model_dir, tmp_path / "resumed", grader=grader,
                     log=lambda m, s: logged.append((s, m)))
    a, b = weights(tmp_path / "full" / "model"), weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == full.metrics
    last_full = dict(logged_full)[3]
    last_resumed = dict(logged)[3]
    for key in ("reward_mean", "kl", "pg_loss", "vf_loss", "entropy", "lr"):
        assert last_resumed[key] == last_full[key]
    # Iteration i of 3 trains at lr x (1 + cos(pi i / 3)) / 2: 1, 0.75, 0.25.
    lrs = [m["lr"] for _, m in sorted(logged_full, key=lambda e: e[0]) if "lr" in m]
    assert lrs == pytest.approx([cfg.rl.lr * f for f in (1.0, 0.75, 0.25)])


def test_a_checkpoint_of_a_run_with_other_settings_is_refused_not_resumed(task, tmp_path, grader):
    cfg, train, val, model_dir = task
    short = tiny_config(tmp_path, "rl.iterations=1", "rl.checkpoint_interval=1", "rl.eval_interval=0")
    run_rl(short, train, val, model_dir, tmp_path / "rl", grader=grader)
    other_lr = tiny_config(tmp_path, "rl.iterations=2", "rl.lr=3e-4", "rl.eval_interval=0")
    with pytest.raises(CheckpointMismatchError, match=r"rl\.lr: 0\.001 -> 0\.0003") as err:
        run_rl(other_lr, train, val, model_dir, tmp_path / "rl", grader=grader)
    assert str(tmp_path / "rl" / "checkpoints") in str(err.value)
    with pytest.raises(CheckpointMismatchError, match="rl.items"):
        run_rl(short.model_copy(update={"rl": short.rl.model_copy(update={"iterations": 2})}),
               train.iloc[1:], val, model_dir, tmp_path / "rl", grader=grader)
    # More iterations, other intervals: the same run, continued.
    longer = tiny_config(tmp_path, "rl.iterations=2", "rl.eval_interval=2")
    logged = []
    run_rl(longer, train, val, model_dir, tmp_path / "rl", grader=grader, log=lambda m, s: logged.append(s))
    assert 1 not in logged and 2 in logged

    sft = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"max_steps": 2, "checkpoint_interval": 2})})
    run_sft(sft, train, val, model_dir, tmp_path / "sft", grader=grader)
    other_batch = sft.model_copy(update={"sft": sft.sft.model_copy(update={"max_steps": 3, "batch_size": 3})})
    with pytest.raises(CheckpointMismatchError, match="sft.batch_size"):
        run_sft(other_batch, train, val, model_dir, tmp_path / "sft", grader=grader)


def test_grpo_reports_groups_without_signal_and_needs_groups(task, tmp_path, grader):
    cfg, train, val, model_dir = task
    cfg = tiny_config(tmp_path, "rl.algorithm=grpo", "rl.iterations=1", "rl.samples_per_prompt=4",
                      "rl.minibatch_size=16", "rl.kl_coef=0.0")
    logged = []
    run_rl(cfg, train, val, model_dir, tmp_path / "rl", grader=grader, log=lambda m, s: logged.append(m))
    stats = next(m for m in logged if "zero_std_groups" in m)
    assert 0.0 <= stats["zero_std_groups"] <= 1.0
    assert "vf_loss" not in stats
    bad = tiny_config(tmp_path, "rl.algorithm=grpo", "rl.samples_per_prompt=1")
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        RLTrainer(bad, train, val, model_dir, tmp_path / "bad", grader=grader)


def test_evaluation_reports_accuracy_pass_and_majority(task, grader):
    cfg, _, val, model_dir = task
    model, tok = load_model(model_dir, cfg.model), load_tokenizer(model_dir)
    report = evaluate(model, tok, val, grader, cfg, k=3, max_items=6)
    m = report.metrics
    assert m["items"] == 6
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["maj_at_3"] <= m["pass_at_3"] <= 1.0
    assert len(report.samples) == 6
    assert {"id", "prompt", "reference", "completion", "reward", "error"} <= set(report.samples[0])
    json.dumps(report.samples)


def test_pass_and_majority_by_hand():
    texts = [["#### 3", "#### 4", "#### 4"], ["the answer is 5", "5", "#### 5.0"], ["x", "y", "z"]]
    rewards = [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, None, 0.0]]
    assert pass_and_majority(texts, rewards, 1.0) == (2 / 3, 1 / 3)


@pytest.fixture(scope="module")
def gpt2_chat_model(task, tmp_path_factory):
    """Another architecture (GPT-2: absolute positions, Conv1D layers) with a chat template, saved to a
    local directory the way a hub model is laid out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, _, _, tiny_dir = task
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_sft_ppo_and_grpo_run_on_a_local_gpt2_with_a_chat_template(task, gpt2_chat_model, tmp_path, grader, lora):
    cfg, train, val, _ = task
    flag = str(lora).lower()
    cfg = tiny_config(tmp_path, f"model.lora.enabled={flag}", "model.lora.r=4", "sft.max_steps=2")
    tok = load_tokenizer(gpt2_chat_model, cfg.model)
    from rft_core.models import render_prompt

    assert render_prompt(tok, cfg.model, "2+2?").startswith("<s>user: 2+2?")
    sft = run_sft(cfg, train, val, gpt2_chat_model, tmp_path / "sft", grader=grader)
    for algorithm in ("ppo", "grpo"):
        rl_cfg = tiny_config(tmp_path, f"model.lora.enabled={flag}", "model.lora.r=4", "rl.iterations=1",
                             f"rl.algorithm={algorithm}", "rl.kl_coef=0.05")
        trainer = RLTrainer(rl_cfg, train, val, sft.model_dir, tmp_path / algorithm, grader=grader)
        batch = trainer.rollout(0, {})
        assert torch.allclose(batch.logprobs, batch.ref_logprobs, atol=1e-5, rtol=0)
        stats = trainer.update(batch, 0, {})
        assert stats["approx_kl"] >= 0.0
        result = trainer.finish()
        assert (tmp_path / algorithm / "model" / "config.json").exists() and result.model_dir


def test_shared_prompt_scoring_equals_scoring_each_row_with_its_prompt(task):
    from torch import nn

    from rft_core.rl.rollout import pack, score_tokens

    cfg, _, _, model_dir = task
    model = load_model(model_dir, cfg.model).eval()
    tok = load_tokenizer(model_dir)
    prompts = [tok("Ann has 9 pens. Bob has")["input_ids"], tok("Cal")["input_ids"]]
    completions = [[5, 6, 7, 8], [9, 10], [11], [12, 13, 14], [15, 16, 17, 18, 19], [3]]
    ids, am, mask = pack([prompts[0]] * 3 + [prompts[1]] * 3, completions, tok.pad_token_id)
    head = nn.Linear(model.config.hidden_size, 1)
    torch.manual_seed(0)
    nn.init.normal_(head.weight)
    each = score_tokens(model, ids, am, mask.shape[1], 0.8, head)
    shared = score_tokens(model, ids, am, mask.shape[1], 0.8, head, group_size=3)
    for a, b in zip(each, shared, strict=True):
        assert torch.allclose(a * mask, b * mask, atol=1e-5)
    grads = []
    for group in (1, 3):
        model.zero_grad()
        (score_tokens(model, ids, am, mask.shape[1], 0.8, head, group_size=group)[0] * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads, strict=True))


def test_a_minibatch_without_its_padding_columns_scores_as_the_full_width_does(task):
    from rft_core.rl.rollout import Rollout, pack, score_tokens

    cfg, _, _, model_dir = task
    model = load_model(model_dir, cfg.model).eval()
    tok = load_tokenizer(model_dir)
    prompts = [tok("Ann has 9 pens. Bob has")["input_ids"], tok("Cal")["input_ids"], tok("Dee has")["input_ids"]]
    completions = [[5, 6, 7, 8, 9, 10], [11, 12], [13]]
    ids, am, mask = pack(prompts, completions, tok.pad_token_id)
    n = len(prompts)
    batch = Rollout(ids, am, mask, list(range(n)), [""] * n, torch.zeros(n), torch.ones(n, dtype=torch.bool), [True] * n)
    rows = torch.tensor([2, 1])  # the short prompts and responses: left and right padding columns go
    input_ids, attention_mask, width = batch.minibatch(rows)
    assert width == 2 and input_ids.shape[1] < ids.shape[1] - mask.shape[1] + width
    full = score_tokens(model, ids[rows], am[rows], mask.shape[1])[0][:, :width]
    trimmed = score_tokens(model, input_ids, attention_mask, width)[0]
    assert torch.allclose(full * mask[rows, :width], trimmed * mask[rows, :width], atol=1e-5)


def test_the_rollout_scores_rows_in_length_order_as_full_width_scoring_does(task, tmp_path, grader):
    """The scoring pass runs chunks of rows of similar lengths, trimmed of their padding; every
    row's numbers are those of scoring the whole batch at full width, in its own place."""
    from rft_core.rl.rollout import score_tokens

    cfg, train, val, model_dir = task
    cfg = tiny_config(tmp_path, "rl.iterations=1", "rl.kl_coef=0.05", "rl.minibatch_size=4")
    trainer = RLTrainer(cfg, train, val, model_dir, tmp_path / "rl", grader=grader)
    batch = trainer.rollout(0, {})
    k = cfg.rl.samples_per_prompt
    order = batch.by_length(k)
    assert sorted(order.tolist()) == list(range(len(batch.texts)))
    chunks = order.view(-1, k)
    # the samples of a prompt stay together, in their order
    assert torch.equal(chunks, chunks[:, :1] + torch.arange(k)) and bool((chunks[:, 0] % k == 0).all())
    longest = batch.response_mask.sum(1).view(-1, k).amax(1)[order[::k] // k]
    assert torch.equal(longest, longest.sort().values)
    mask = batch.response_mask
    with torch.no_grad():
        lp, values, ent = trainer.module(batch.input_ids, batch.attention_mask, batch.response_length, 1.0)
        ref = score_tokens(trainer.reference, batch.input_ids, batch.attention_mask, batch.response_length)[0]
    for mine, full in ((batch.logprobs, lp), (batch.values, values), (batch.entropy, ent), (batch.ref_logprobs, ref)):
        assert mine.shape == full.shape
        assert torch.allclose(mine * mask, full * mask, atol=1e-5)


def test_length_grouped_minibatches_hold_neighbouring_lengths_and_weigh_tokens_as_the_whole_batch(
    task, tmp_path, grader
):
    cfg, train, val, model_dir = task
    k = 2
    cfg = tiny_config(tmp_path, "rl.group_by_length=true", "rl.prompts_per_iteration=8", "rl.minibatch_size=4")
    trainer = RLTrainer(cfg, train, val, model_dir, tmp_path / "rl", grader=grader)
    batch = trainer.rollout(0, {})
    n, widths = len(batch.texts), batch.group_widths(k)
    assert trainer.group == k
    cut = trainer.minibatches(0, 0, n, widths)
    assert sorted(torch.cat(cut).tolist()) == list(range(n)) and {len(rows) for rows in cut} == {4}
    for rows in cut:  # whole groups of a prompt's samples, in their order
        groups = rows.view(-1, k)
        assert torch.equal(groups, groups[:, :1] + torch.arange(k)) and bool((groups[:, 0] % k == 0).all())
    # neighbouring lengths: the minibatches' width ranges do not interleave
    ranges = sorted((float(widths[rows[::k] // k].min()), float(widths[rows[::k] // k].max())) for rows in cut)
    assert all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(ranges))

    def padded(minibatches):  # response positions computed, padding included
        return sum(len(rows) * batch.minibatch(rows)[2] for rows in minibatches)

    assert padded(cut) <= padded(trainer.minibatches(0, 0, n))  # the shuffled cut of the same epoch
    # an epoch's steps average to the whole batch's token mean, as shuffled minibatches do
    estimate = trainer.algorithm.advantages(batch, trainer.rl, trainer.processes.sum)
    with torch.no_grad():
        parts = [trainer.losses(batch, rows, estimate, trainer.loss_normaliser(batch, rows, len(cut))) for rows in cut]
        whole = trainer.losses(batch, torch.cat(cut), estimate, float(batch.response_mask.sum()))
    assert torch.allclose(sum(out.loss for out in parts) / len(cut), whole.loss, atol=1e-6)
    # micro-batches (gradient accumulation) are cut from a minibatch in length order, groups whole
    cfg = tiny_config(tmp_path, "rl.prompts_per_iteration=8", "rl.minibatch_size=8", "rl.micro_batch_size=2")
    split = RLTrainer(cfg, train, val, model_dir, tmp_path / "rl-micro", grader=grader)
    rows = split.minibatches(0, 0, n)[0]
    parts = split.micro_batches(rows, widths)
    assert [len(part) for part in parts] == [k] * 4 and sorted(torch.cat(parts).tolist()) == sorted(rows.tolist())
    for part in parts:
        assert torch.equal(part, part[:1] + torch.arange(k)) and int(part[0]) % k == 0
    part_widths = [float(widths[part[0] // k]) for part in parts]
    assert part_widths == sorted(part_widths)


def test_critic_warmup_trains_the_value_head_alone_then_the_policy(task, tmp_path, grader):
    cfg, train, val, model_dir = task
    cfg = tiny_config(tmp_path, "rl.iterations=2", "rl.critic_warmup=1")
    trainer = RLTrainer(cfg, train, val, model_dir, tmp_path / "rl", grader=grader)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.update(trainer.rollout(0, {}), 0, {})  # a warm-up iteration
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    head = trainer.module.value_head
    assert head.weight.abs().sum() > 0  # the head learned from the returns
    # The trunk's optimizer state is untouched: a zero-gradient Adam step would still advance its
    # bias correction and inflate the policy's first real steps.
    warmup_steps = int(trainer.optimizer.state[head.weight]["step"])
    assert warmup_steps > 0
    assert all(p not in trainer.optimizer.state for p in trainer.policy.parameters())
    trainer.update(trainer.rollout(1, {}), 1, {})  # past the warm-up: the policy moves too
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    # Adam counts the policy's steps from its first real one.
    policy_steps = int(trainer.optimizer.state[head.weight]["step"]) - warmup_steps
    assert {int(trainer.optimizer.state[p]["step"]) for p in trainer.policy.parameters()} == {policy_steps}


def test_flat_groups_are_left_out_of_the_update(task, tmp_path):
    cfg, train, val, model_dir = task
    cfg = tiny_config(tmp_path, "rl.iterations=1", "rl.filter_flat_groups=true", "rl.kl_coef=0.0")
    # Every sample scores the same: every group is flat, so nothing is left to learn from.
    with build_grader({"type": "string_check", "operation": "eq", "input": "x", "reference": "x"}) as same:
        trainer = RLTrainer(cfg, train, val, model_dir, tmp_path / "rl", grader=same)
        before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        batch = trainer.rollout(0, {})
        stats = trainer.update(batch, 0, {})
    assert stats["flat_groups"] == 1.0
    assert batch.response_mask.sum() == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())


def test_validation_reports_the_sampled_reward_beside_greedy_accuracy(task, grader):
    cfg, _, val, model_dir = task
    model, tok = load_model(model_dir, cfg.model), load_tokenizer(model_dir)
    metrics = validation_metrics(model, tok, val.iloc[:6], grader, cfg)
    assert set(metrics) == {"val_accuracy", "val_reward_mean", "val_grader_errors", "val_sampled_reward"}
    assert 0.0 <= metrics["val_sampled_reward"] <= 1.0
    again = validation_metrics(model, tok, val.iloc[:6], grader, cfg)
    assert again == metrics  # the samples are seeded
    off = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"sampled_validation": False})})
    assert "val_sampled_reward" not in validation_metrics(model, tok, val.iloc[:6], grader, off)
