"""What SFT and RL share: accelerator set-up, data-parallel synchronisation, the order of training
items, checkpoint selection and the best weights, the items graders see, and the stage's result.

SFT (`rft_core.sft`) and RL (`rft_core.rl.trainer`) are siblings built on this module; neither
imports the other.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from accelerate import Accelerator

from rft_core.config import RFTConfig

LogFn = Callable[[dict[str, float], int], None]

T = TypeVar("T")


@dataclass
class StageResult:
    """What a training stage leaves behind: the model directory and its final metrics."""

    model_dir: str
    metrics: dict[str, float]
    history: list[dict[str, float]]


def make_accelerator(device: torch.device, dtype: torch.dtype) -> Accelerator:
    mixed = "bf16" if (device.type == "cuda" and dtype == torch.bfloat16) else "no"
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)


class Processes:
    """Synchronisation of data-parallel training, in one place.

    A loss is a sum over this process's tokens divided by a normaliser counted over every process
    (all tokens of the optimizer step), so the processes' gradients add up to the one-process
    gradient. DDP averages gradients over processes: `backward` multiplies by the number of
    processes to turn that average into the sum. The micro-batches of a step accumulate gradients
    locally and exchange them once, with the last backward (`accumulate`).
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over processes (on the CPU); the identity in one process."""
        if self.world == 1:
            return t
        return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum").cpu()

    def total(self, x: torch.Tensor | float) -> float:
        """A scalar summed over processes, in float64."""
        return float(self.sum(torch.as_tensor(x, dtype=torch.float64).reshape(1)).item())

    def mean(self, stats: dict[str, float]) -> dict[str, float]:
        """Per-process statistics averaged over processes."""
        return {key: float(self.sum(torch.tensor([value])).item()) / self.world for key, value in stats.items()}

    def accumulate(self, model: torch.nn.Module, parts: Iterable[T]) -> Iterator[T]:
        """Yield each micro-batch of an optimizer step inside the right context: gradients stay
        local (no_sync) until the last micro-batch's backward exchanges them."""
        parts = list(parts)
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            with self.accelerator.no_sync(model) if (self.world > 1 and not last) else contextlib.nullcontext():
                yield part

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss normalised over every process (see the class docstring)."""
        self.accelerator.backward(loss * self.world)


def optimizer_step(
    accelerator: Accelerator,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float,
) -> torch.Tensor:
    """Clip the gradients' norm, step the optimizer and the schedule, clear the gradients.
    Returns the norm before clipping."""
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def step_positions(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Item indices of optimizer step (or RL iteration) `step`: a seeded permutation per epoch,
    concatenated. A function of (seed, step) only, so a resumed run continues the same order."""
    out, start = [], step * global_batch
    cache: dict[int, list[int]] = {}
    for pos in range(start, start + global_batch):
        epoch = pos // n
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(cache[epoch][pos % n])
    return out


def item_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """What graders see as `item` for each row of a canonical frame."""
    from rft_core.data import item_dict

    return [item_dict(row) for _, row in frame.iterrows()]


# --------------------------------------------------------------------------- the best checkpoint


def selection_key(metrics: dict[str, float]) -> tuple[float, float, float]:
    """How checkpoints are ranked: validation accuracy, then mean reward, then lower loss."""
    return (
        metrics.get("val_accuracy", 0.0),
        metrics.get("val_reward_mean", 0.0),
        -metrics.get("val_loss", 0.0),
    )


def save_best_weights(model: torch.nn.Module, directory: Path, accelerator: Accelerator) -> None:
    """Replace `directory` with the weights (full model or adapter) of `model`; main process only."""
    if accelerator.is_main_process:
        shutil.rmtree(directory, ignore_errors=True)
        model.save_pretrained(str(directory), safe_serialization=True)


def load_best_weights(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Load the weights `save_best_weights` wrote (full model or adapter) into `model`."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
        return model
    files = sorted(directory.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"best checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model


# --------------------------------------------------------------------------- the stage's grader


@contextlib.contextmanager
def stage_grader(cfg: RFTConfig, grader: Any | None) -> Iterator[Any]:
    """The grader a stage was given, or one built from `cfg.grader` and closed when the stage ends."""
    if grader is not None:
        yield grader
        return
    from rft_core.graders import configured_grader

    own = configured_grader(cfg.grader)
    try:
        yield own
    finally:
        if hasattr(own, "close"):
            own.close()
