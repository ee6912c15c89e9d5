"""What stops a run that has gone wrong (rft_core/guards.py): non-finite gradients or weights stop
training before anything is saved, and a grader that mostly fails fails the stage. Real tiny
models and real graders; the pipeline-level consequences (nothing registered) are in
test_pipeline.py."""

from __future__ import annotations

import math

import pytest
import torch
from training_fixtures import tiny_config, tiny_task

from rft_core.checkpoint import checkpoint_dirs
from rft_core.graders import build_grader
from rft_core.guards import (
    GraderFailing,
    NonFiniteError,
    TrainingDiverged,
    all_finite,
    check_grader_errors,
    weights_finite,
)
from rft_core.models import load_model
from rft_core.rl.trainer import run_rl
from rft_core.sft import run_sft
from rft_core.training import Processes


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guards")
    cfg = tiny_config(tmp)
    return tiny_task(tmp, cfg)


def linear_step(lr: float, grad: float | None = None):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    params = list(layer.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    layer(torch.ones(3, 4)).sum().backward()
    if grad is not None:
        layer.weight.grad.fill_(grad)
    before = [p.detach().clone() for p in params]
    return Processes(None), params, optimizer, scheduler, before


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_gradient_is_refused_before_the_step_is_applied(bad) -> None:
    processes, params, optimizer, scheduler, before = linear_step(1e-3, grad=bad)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm .*the step was not applied"):
        processes.step(params, optimizer, scheduler, max_grad_norm=1.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(p.grad is None for p in params)


def test_weights_made_non_finite_by_a_step_stop_training() -> None:
    processes, params, optimizer, scheduler, _ = linear_step(float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite weights after an optimizer step at lr inf"):
        processes.step(params, optimizer, scheduler, max_grad_norm=1.0)


def test_a_finite_step_passes_and_all_finite_sees_every_element() -> None:
    processes, params, optimizer, scheduler, before = linear_step(1e-2)
    assert math.isfinite(processes.step(params, optimizer, scheduler, max_grad_norm=1.0))
    assert not all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    t = torch.zeros(1000)
    assert all_finite([t, torch.ones(3)])
    t[777] = math.nan
    assert not all_finite([torch.ones(3), t])
    assert not all_finite([torch.tensor([1e38, 1e38, math.inf])])


def test_rl_that_diverges_stops_with_the_iteration_the_lr_and_the_last_good_checkpoint(task, tmp_path) -> None:
    train, val, base = task
    cfg = tiny_config(tmp_path, "rl.lr=1e30", "rl.iterations=6", "rl.checkpoint_interval=1")
    out = tmp_path / "rl"
    with pytest.raises(TrainingDiverged) as caught:
        run_rl(cfg, train, val, base, out)
    message = str(caught.value)
    assert message.startswith("RL iteration ") and "Lower rl.lr (now 1e+30)" in message
    # Nothing was saved after the step that diverged: every checkpoint left holds finite weights,
    # and the message names the last one (or says there is none).
    kept = checkpoint_dirs(out / "checkpoints")
    for checkpoint in kept:
        assert weights_finite(checkpoint / "model")
    assert (f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written") in message
    assert not (out / "model").exists() and not (out / "result.json").exists()


def test_sft_that_diverges_stops_and_names_sft_lr(task, tmp_path) -> None:
    train, val, base = task
    cfg = tiny_config(tmp_path, "sft.lr=1e30", "sft.max_steps=8")
    with pytest.raises(TrainingDiverged, match=r"^sft step \d+: non-finite .*Lower sft\.lr \(now 1e\+30\)"):
        run_sft(cfg, train, val, base, tmp_path / "sft")
    for checkpoint in checkpoint_dirs(tmp_path / "sft" / "checkpoints"):
        assert weights_finite(checkpoint / "model")


def test_a_grader_failing_on_every_rl_sample_fails_the_stage_at_the_first_iteration(task, tmp_path) -> None:
    train, val, base = task
    cfg = tiny_config(tmp_path)
    grader = build_grader({"type": "string_check", "name": "needs-a-field", "operation": "eq",
                           "input": "{{ sample.output_text }}", "reference": "{{ item.no_such_field }}"})
    with pytest.raises(GraderFailing) as caught:
        run_rl(cfg, train, val, base, tmp_path / "rl", grader=grader)
    message = str(caught.value)
    assert message.startswith("RL iteration 1: the grader failed on 8 of 8 samples (100%")
    assert "no_such_field" in message and "grader.max_error_share 0.2" in message


def test_a_python_grader_that_always_raises_fails_validation_with_its_error(task, tmp_path) -> None:
    train, val, base = task
    cfg = tiny_config(tmp_path, "sft.eval_interval=3", "grader.timeout_s=20")
    source = "def grade(sample, item):\n    raise ValueError('the grader is broken')\n"
    grader = build_grader({"type": "python", "name": "broken", "source": source}, timeout_s=20)
    try:
        with pytest.raises(GraderFailing, match=r"^validation: the grader failed on (\d+) of \1 samples \(100%.*the grader is broken \(line 2"):
            run_sft(cfg, train, val, base, tmp_path / "sft", grader=grader)
    finally:
        grader.close()


def test_the_error_share_limit_is_a_share_and_a_limit_of_one_accepts_everything() -> None:
    check_grader_errors(2, 10, 0.2, "here")
    with pytest.raises(GraderFailing, match=r"here: the grader failed on 3 of 10 samples \(30%"):
        check_grader_errors(3, 10, 0.2, "here", ["boom", "boom", "bang"])
    check_grader_errors(10, 10, 1.0, "here")
    check_grader_errors(0, 0, 0.0, "nothing graded")


def test_weights_finite_reads_a_saved_model_tensor_by_tensor(task, tmp_path) -> None:
    _, _, base = task
    assert weights_finite(base)
    model = load_model(base)
    with torch.no_grad():
        next(iter(model.parameters()))[0, 0] = math.nan
    model.save_pretrained(tmp_path / "broken")
    assert not weights_finite(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        weights_finite(tmp_path)
