"""What stops a run that has gone wrong, with a message that says what happened and what to do.

- Non-finite numbers: a NaN or infinite gradient norm stops the optimizer step before it is
  applied; a non-finite weight after a step stops training at once. Nothing is saved after the
  last good step, so the last checkpoint holds the last good weights (`NonFiniteError`, turned
  into `TrainingDiverged` by the training loops, which know the stage, the step and the lr).
- A grader that fails: when more than `grader.max_error_share` of the samples of one RL iteration,
  one validation or one evaluation are grader errors, the stage fails (`GraderFailing`) with the
  first error messages: rewards computed mostly from errors would train and rank on nothing.

The training loops call these; the promotion gate has its own rules on the same facts
(`tracking.gate`): a model with non-finite weights, or graded mostly by errors, is never promoted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


class NonFiniteError(FloatingPointError):
    """An optimizer step met a non-finite gradient norm, or left non-finite weights."""


class TrainingDiverged(RuntimeError):
    """Training stopped on non-finite numbers; the message names the step, the lr and the last
    good checkpoint."""


class GraderFailing(RuntimeError):
    """The grader failed on more than `grader.max_error_share` of the samples it was given."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite: one fused reduction, one host sync."""
    tensors = [t.detach() for t in tensors if t.numel()]
    if not tensors:
        return True
    # The norm of a tensor is finite exactly when all its elements are (overflow aside: a norm
    # above float32's range means weights nobody can use either).
    norms = torch._foreach_norm([t.float() if not t.is_floating_point() else t for t in tensors])
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def diverged(exc: NonFiniteError, *, where: str, lr_key: str, lr: float, checkpoints: Path) -> TrainingDiverged:
    """The error a training loop raises for `exc`: where it happened, and what the user can do."""
    from rft_core.checkpoint import latest_checkpoint

    last = latest_checkpoint(checkpoints)
    kept = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written before it"
    return TrainingDiverged(
        f"{where}: {exc}; training stopped before saving anything ({kept}). Lower {lr_key} "
        f"(now {lr:g}) and run again: a changed learning rate starts the stage afresh"
    )


def check_grader_errors(
    errors: float, total: float, limit: float, where: str, examples: Sequence[str] = ()
) -> None:
    """Raise `GraderFailing` when `errors` of `total` graded samples exceed the share `limit`."""
    if total <= 0 or errors / total <= limit:
        return
    shown = "; ".join(dict.fromkeys(e for e in examples if e))  # distinct, in order
    first = f"; first errors: {shown[:600]}" if shown else ""
    raise GraderFailing(
        f"{where}: the grader failed on {errors:g} of {total:g} samples ({errors / total:.0%}, more than "
        f"grader.max_error_share {limit:g}){first}. Fix the grader (try it with `rft grade`) or raise "
        "grader.max_error_share"
    )


def finite_metrics(metrics: dict[str, float]) -> list[str]:
    """The names of the non-finite values in `metrics` (empty when all are finite)."""
    return [key for key, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]


def weights_finite(model_dir: str | Path) -> bool:
    """Whether every tensor of the safetensors files in `model_dir` (a saved model or adapter) is
    finite; read tensor by tensor, so a large model is never whole in memory."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights to check")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return False
    return True
