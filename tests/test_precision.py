"""Mixed precision (`model.dtype: bfloat16 | float16`): float32 trained weights and optimizer state,
forward passes under autocast; frozen weights (LoRA base, RL reference) stored in the low precision.

At a small learning rate, bfloat16 weights updated in place would round most updates away (an
update of 1e-5 is below half a bfloat16 step for weights of 0.02); float32 master weights move
every entry that has a gradient, as a float32 run does.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from training_fixtures import tiny_config, tiny_task

from rft_core.graders import build_grader
from rft_core.rl.trainer import RLTrainer
from rft_core.sft import run_sft

NO_PRETRAINING = "model.tiny.pretrain_steps=0"
# Rewards that vary between samples of a random model, so that every update has a gradient.
SIMILARITY = {"type": "text_similarity", "name": "sim", "evaluation_metric": "fuzzy_match",
              "input": "{{ sample.output_text }}", "reference": "Ann has 9 pens. 9+13=22. #### 22"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("task")
    train, val, model_dir = tiny_task(tmp, tiny_config(tmp, NO_PRETRAINING))
    return train, val, model_dir


@pytest.fixture(scope="module")
def grader():
    with build_grader(SIMILARITY) as g:
        yield g


def changed_fraction(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> float:
    changed = sum(int((after[k].float() != before[k].float()).sum()) for k in before)
    return changed / sum(before[k].numel() for k in before)


def delta(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(after[k].float() - before[k].float()).flatten() for k in before])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_sft_keeps_float32_weights_and_moves_them_as_float32_does(
    task, tmp_path, grader, dtype
):
    train, val, model_dir = task
    base = load_file(str(model_dir / "model.safetensors"))
    trained = {}
    for name in ("float32", dtype):
        cfg = tiny_config(
            tmp_path, NO_PRETRAINING, f"model.dtype={name}", "sft.lr=1e-5", "sft.max_steps=20",
            "sft.lr_scheduler=constant", "sft.warmup_ratio=0", "sft.eval_interval=0", "sft.keep_best=false",
            "sft.checkpoint_interval=0", "eval.max_items=2",
        )
        run_sft(cfg, train, val, model_dir, tmp_path / name, grader=grader)
        trained[name] = load_file(str(tmp_path / name / "model" / "model.safetensors"))
    assert {t.dtype for t in trained[dtype].values()} == {torch.float32}
    # Every entry with a gradient moves (embedding rows of tokens absent from the data have none).
    reference = changed_fraction(trained["float32"], base)
    assert reference > 0.7
    assert changed_fraction(trained[dtype], base) == pytest.approx(reference, abs=1e-3)
    moved, moved32 = delta(trained[dtype], base), delta(trained["float32"], base)
    assert cosine(moved, moved32) > 0.999
    assert float(moved.norm() / moved32.norm()) == pytest.approx(1.0, abs=0.01)


def rl_trainer(task, tmp_path, grader, *overrides):
    train, val, model_dir = task
    cfg = tiny_config(tmp_path, NO_PRETRAINING, "rl.lr=1e-5", "rl.kl_coef=0.05", "rl.iterations=1",
                      "rl.max_new_tokens=16", *overrides)
    return RLTrainer(cfg, train, val, model_dir, tmp_path / "rl", grader=grader)


def record_output_dtypes(modules: dict[str, torch.nn.Module]) -> dict[str, set]:
    """For each module, the (gradients on, output dtype) pairs of its forward passes."""
    seen: dict[str, set] = {name: set() for name in modules}
    for name, module in modules.items():
        module.register_forward_hook(
            lambda m, i, out, name=name: seen[name].add((torch.is_grad_enabled(), out.dtype))
        )
    return seen


def test_mixed_precision_rl_trains_float32_weights_with_policy_reference_and_critic_under_one_autocast(
    task, tmp_path, grader
):
    moved = {}
    for dtype in ("float32", "bfloat16"):
        trainer = rl_trainer(task, tmp_path / dtype, grader, f"model.dtype={dtype}")
        policy = trainer.policy
        seen = record_output_dtypes({
            "policy": policy.model.layers[0].self_attn.q_proj,
            "reference": trainer.reference.model.layers[0].self_attn.q_proj,
            "critic": trainer.module.value_head,
        })
        before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        batch = trainer.rollout(0, {})
        trainer.update(batch, 0, {})
        moved[dtype] = {k: v.detach().clone() for k, v in policy.state_dict().items()}, before
        if dtype == "bfloat16":
            assert {p.dtype for p in trainer.params} == {torch.float32}  # policy and value head
            assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
            # Sampling and scoring (no gradient) and the update (gradient) alike, for all three.
            assert seen == {
                "policy": {(False, torch.bfloat16), (True, torch.bfloat16)},
                "reference": {(False, torch.bfloat16)},
                "critic": {(False, torch.bfloat16), (True, torch.bfloat16)},
            }
            # The bfloat16-stored reference differs from the float32 weights under autocast only by
            # the precision of what autocast keeps in float32 (norms, residual stream).
            assert 0 < (batch.logprobs - batch.ref_logprobs).abs().max() < 0.01
    after32, before32 = moved["float32"]
    after16, before16 = moved["bfloat16"]
    reference = changed_fraction(after32, before32)
    assert reference > 0.5
    assert changed_fraction(after16, before16) == pytest.approx(reference, abs=1e-3)
    assert cosine(delta(after16, before16), delta(after32, before32)) > 0.99


def test_mixed_precision_lora_stores_the_base_in_bfloat16_and_its_reference_is_exactly_the_policy(
    task, tmp_path, grader
):
    lora = ("model.lora.enabled=true", "model.lora.r=4")
    trainer = rl_trainer(task, tmp_path, grader, "model.dtype=bfloat16", *lora)
    frozen = {p.dtype for p in trainer.policy.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in trainer.params} == {torch.float32}  # adapters and value head
    batch = trainer.rollout(0, {})
    assert torch.equal(batch.logprobs, batch.ref_logprobs)  # adapters off: the same module, same autocast
    trainer.update(batch, 0, {})
    trainer.finish()
    saved = load_file(str(tmp_path / "rl" / "model" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # merged into the base, in its type
