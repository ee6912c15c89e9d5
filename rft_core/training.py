"""What SFT and RL share: how a stage runs (`Processes`: one process, data parallel or FSDP, and the
precision), the order of training items, checkpoint selection and the best weights, the items
graders see, and the stage's result.

SFT (`rft_core.sft`) and RL (`rft_core.rl.trainer`) are siblings built on this module; neither
imports the other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from accelerate import Accelerator

from rft_core.config import RFTConfig
from rft_core.guards import NonFiniteError, all_finite
from rft_core.integrity import directory_problem, manifest_meta, reading, writing_directory
from rft_core.lifecycle import stop_requested
from rft_core.models import compute_in

LogFn = Callable[[dict[str, float], int], None]

logger = logging.getLogger("rft.training")

T = TypeVar("T")


@dataclass
class StageResult:
    """What a training stage leaves behind: the model directory and its final metrics."""

    model_dir: str
    metrics: dict[str, float]
    history: list[dict[str, float]]
    events: list[dict[str, Any]] = field(default_factory=list)  # what the RL guard did (rl/guard.py)


def make_accelerator(device: torch.device) -> Accelerator:
    """The processes of a stage: this one, or every process of `accelerate launch`.

    accelerate's own mixed precision stays off: it is one setting for the whole Python process (a
    later stage with another precision could not change it). `Processes` applies each stage's
    precision (`model.dtype`) itself, on every device."""
    return Accelerator(cpu=device.type == "cpu", mixed_precision="no")


def fsdp_settings(accelerator: Accelerator) -> Any | None:
    """accelerate's FSDP settings for this launch (`accelerate launch --use_fsdp --fsdp_version 2`,
    or an accelerate config file with `distributed_type: FSDP` and `fsdp_version: 2`), or None.

    rft shards the model itself (`shard`), the same way on every device: accelerate turns FSDP on
    for accelerator devices only (its CPU processes get DDP), and a sharded model needs the
    checkpoint and generation handling of `Processes` anyway. Of the settings, `fsdp_version`,
    `fsdp_reshard_after_forward` and `fsdp_transformer_layer_cls_to_wrap` are used."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = None
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()  # read from the launcher's environment
    if plugin is not None and plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP version {plugin.fsdp_version} is not supported: rft shards with FSDP2 "
            "(fsdp_version: 2 in the accelerate config, or accelerate launch --fsdp_version 2)"
        )
    return plugin


def _fsdp2() -> tuple[Any, type]:
    """FSDP2's `fully_shard` and `FSDPModule` (public from torch 2.6, under `_composable` before)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return fully_shard, FSDPModule


FSDP_TESTED_TRANSFORMERS = (5, 24)  # release numbers: a 5.24 dev build counts as 5.24


def shard(model: torch.nn.Module, plugin: Any) -> None:
    """FSDP2 (`fully_shard`) in place: each decoder layer is one unit (the classes the model names
    in `_no_split_modules`, or the accelerate config's `fsdp_transformer_layer_cls_to_wrap`), the
    rest of `model` (embeddings, final norm, LM head, value head) the root unit."""
    fully_shard, _ = _fsdp2()
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release < FSDP_TESTED_TRANSFORMERS:
        # Not a guess: with transformers 4.56, 4.57 and 5.0 the 2-process FSDP test ended with NaN
        # weights (the same test passes with 5.24); nothing between was tried.
        raise RuntimeError(
            f"FSDP is tested with transformers >= {'.'.join(map(str, FSDP_TESTED_TRANSFORMERS))} only "
            f"(this is {transformers.__version__}: older releases gave NaN weights under rft's FSDP "
            "test); upgrade transformers, or train without FSDP (data parallel)"
        )

    names = plugin.transformer_cls_names_to_wrap or []
    names = set(names.split(",") if isinstance(names, str) else names)
    if not names:
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"FSDP: no decoder layer in {type(model).__name__} (looked for {sorted(names)})")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(
            "FSDP shards fully trained models only; this one has frozen weights (LoRA?), e.g. "
            f"{frozen[0]}: train LoRA without FSDP (plain accelerate launch: data parallel)"
        )
    name = type(model).__name__  # sharding changes the class (FSDP<name>)
    # The root unit's forward returns views of its outputs; nothing here writes to them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=plugin.reshard_after_forward)
    fully_shard(model, reshard_after_forward=plugin.reshard_after_forward)
    # FSDP2 takes the first unit to run forward for its root. Generation calls the policy inside
    # `PolicyWithValue` first, so settle the root now, as a forward through it would.
    model._get_fsdp_state()._lazy_init()
    logger.info("FSDP2: %s sharded in %d units", name, len(layers) + 1)


class Processes:
    """How a stage runs: on which processes (this one, data parallel, or FSDP-sharded) and in which
    precision. Whatever differs between those cases lives here; the training loops read the same.

    Synchronisation. A loss is a sum over this process's tokens divided by a normaliser counted over
    every process (all tokens of the optimizer step), so the processes' gradients add up to the
    one-process gradient. DDP and FSDP average gradients over processes: `backward` multiplies by
    the number of processes to turn that average into the sum. The micro-batches of a step
    accumulate gradients locally and exchange them once, with the last backward (`accumulate`).

    Precision. Trainable weights and their optimizer state are float32 in every case (master
    weights: small updates are not rounded away). With `precision` bfloat16 or float16, forward
    passes run under autocast to it (`autocast`: sampling, scoring, updates and evaluation alike),
    as mixed precision does; float16 adds a gradient scaler. Weights that never train (a LoRA
    base, the RL reference) may be stored in `precision`.

    FSDP (`fsdp_settings`). `prepare` shards the model; `gathered` holds the full weights on every
    process while generating (each process stops when its own rows end, so forward passes cannot
    be collective); `full_state_dict` and `optimizer_state` gather what a checkpoint or the final
    model holds, so that the main process writes the same files as without FSDP.
    """

    def __init__(
        self,
        accelerator: Accelerator | None,
        precision: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ):
        self.accelerator = accelerator
        self.precision = precision
        if accelerator is None:
            self.world, self.rank, self.device = 1, 0, device or torch.device("cpu")
            self.fsdp = None
        else:
            self.world, self.rank = accelerator.num_processes, accelerator.process_index
            self.device = accelerator.device
            self.fsdp = fsdp_settings(accelerator)
        self.sharded = self.fsdp is not None and self.world > 1
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == torch.float16 else None

    @classmethod
    def local(cls, device: torch.device, precision: torch.dtype = torch.float32) -> Processes:
        """This process alone, whatever the environment: for work that one process does while the
        others wait (the tiny model's pretraining, inside `main_process_first`)."""
        return cls(None, precision, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """A barrier: every process reaches this point before any goes on."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ precision

    @property
    def mixed(self) -> bool:
        return self.precision != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes in `precision` (float32 weights stay float32); nothing in float32."""
        return compute_in(self.device, self.precision)

    # ------------------------------------------------------------------ the model

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train: wrapped for data parallelism (DDP), sharded in place (FSDP), or as is.
        Build the optimizer afterwards, from the returned model's parameters."""
        if self.sharded:
            shard(model, self.fsdp)
            return model
        if self.accelerator is None or self.fsdp is not None:  # one process (FSDP over one: nothing to shard)
            return model.to(self.device)
        return self.accelerator.prepare(model)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model if self.accelerator is None else self.accelerator.unwrap_model(model)

    @contextlib.contextmanager
    def gathered(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside the block, every process holds the full weights of `model` and its forward passes
        exchange nothing, so each process may run as many as it needs (generation stops when the
        process's own rows end). Nothing to do without FSDP."""
        if not self.sharded:
            yield
            return
        _, FSDPModule = _fsdp2()
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                if unit is not model:  # the root unit never reshards after forward
                    unit.set_reshard_after_forward(self.fsdp.reshard_after_forward, recurse=False)
                unit.reshard()

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """With FSDP: the full weights of `model`, gathered on the main process (on the CPU; other
        processes get {}); every process must call it. None without FSDP: the main process's own
        module is complete, and `save_pretrained` reads it as usual."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_weights(
        self, model: torch.nn.Module, module: torch.nn.Module, directory: Path, prefix: str = ""
    ) -> None:
        """Load the weights `save_weights` wrote from `directory` into `module`, the sub-module at
        `prefix` of `model` (as `prepare` returned it); every process calls it."""
        if not self.sharded:
            load_best_weights(module, directory)
            return
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = {}
        for f in sorted(Path(directory).glob("*.safetensors")):
            with reading(f, "saved weights"):
                state.update({prefix + k: v for k, v in load_file(str(f)).items()})
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    # ------------------------------------------------------------------ the optimizer

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state keyed by parameter name, whole (gathered with FSDP: every process
        must call it): one checkpoint format, with or without FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=self.sharded, cpu_offload=self.sharded)
        return get_optimizer_state_dict(self.unwrap(model), optimizer, options=options)

    def load_optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Restore what `optimizer_state` returned (each process takes its shard with FSDP)."""
        groups = state.get("param_groups") or [{}]
        if groups[0].get("params") and isinstance(groups[0]["params"][0], int):
            optimizer.load_state_dict(state)  # a checkpoint from before parameter names
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            self.unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=self.sharded)
        )

    # ------------------------------------------------------------------ one optimizer step

    def accumulate(self, model: torch.nn.Module, parts: Iterable[T]) -> Iterator[T]:
        """Yield each micro-batch of an optimizer step inside the right context: gradients stay
        local until the last micro-batch's backward exchanges them."""
        parts = list(parts)
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if self.world == 1:
                yield part
            elif self.sharded:
                model.set_requires_gradient_sync(last)
                yield part
            else:
                with self.accelerator.no_sync(model) if not last else contextlib.nullcontext():
                    yield part

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss normalised over every process (see the class docstring)."""
        loss = loss * self.world
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(
        self,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        max_grad_norm: float,
    ) -> float:
        """Clip the gradients' norm, step the optimizer and the schedule, clear the gradients.
        Returns the norm before clipping.

        Raises `NonFiniteError` on a non-finite gradient norm (before stepping: the weights stay as
        they were; with float16's gradient scaler, an overflow is its business, not an error) and
        on non-finite weights after the step. Every process agrees on it (one all-reduce), so
        none is left waiting in a collective."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        if self.scaler is None and not self._everywhere(bool(torch.isfinite(grad_norm))):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"non-finite gradient norm ({float(grad_norm)}); the step was not applied")
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not self._everywhere(all_finite(params)):
            lr = optimizer.param_groups[0]["lr"]
            raise NonFiniteError(f"non-finite weights after an optimizer step at lr {lr:g} (gradient norm {float(grad_norm):g})")
        return float(grad_norm)

    def _everywhere(self, ok: bool) -> bool:
        """Whether `ok` holds on every process (a collective: every process calls it)."""
        if self.world == 1:
            return ok
        return self.total(0.0 if ok else 1.0) == 0

    # ------------------------------------------------------------------ statistics

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over processes (on the CPU); the identity in one process."""
        if self.world == 1:
            return t
        return self.accelerator.reduce(t.to(self.device), reduction="sum").cpu()

    def total(self, x: torch.Tensor | float) -> float:
        """A scalar summed over processes, in float64."""
        return float(self.sum(torch.as_tensor(x, dtype=torch.float64).reshape(1)).item())

    def mean(self, stats: dict[str, float]) -> dict[str, float]:
        """Per-process statistics averaged over processes."""
        return {key: float(self.sum(torch.tensor([value])).item()) / self.world for key, value in stats.items()}


def sub_state(state: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    """The entries of a state dict under `prefix` (e.g. "policy."), with the prefix removed."""
    if state is None:
        return None
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of `model` off, so that training mode computes exactly what evaluation mode
    does (RL keeps "no dropout anywhere", yet trains in training mode, which gradient
    checkpointing needs): `nn.Dropout` modules, LoRA's included, get p = 0, and the rates that
    attention modules keep as numbers and apply when training (`attention_dropout`, `dropout_p`,
    ...), like a mixture of experts' router jitter, become 0. The model's config is left as it is
    (saved models keep their settings)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("drop" in name or "jitter" in name):
                setattr(module, name, 0.0)
    return model


@contextlib.contextmanager
def training_mode(model: torch.nn.Module) -> Iterator[None]:
    """`model` in training mode inside the block (gradient checkpointing runs only then), back in
    evaluation mode after."""
    model.train()
    try:
        yield
    finally:
        model.eval()


def stop_after_step(processes: Processes) -> bool:
    """Whether training stops after the current step: a stop was requested (Ctrl-C, SIGTERM; see
    `rft_core.lifecycle`) on any process. Every process calls it at every step, so they agree on
    the step (a collective with several processes)."""
    requested = stop_requested() is not None
    return requested if processes.world == 1 else processes.total(float(requested)) > 0


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


def save_weights(
    processes: Processes,
    model: torch.nn.Module,
    module: torch.nn.Module,
    directory: Path,
    *,
    prefix: str = "",
    tokenizer: Any = None,
    merge: bool = False,
    step: int | None = None,
) -> None:
    """Replace `directory` with `module`'s weights in `save_pretrained` form (the adapter alone for a
    LoRA model, unless `merge` folds it into a full model), plus the tokenizer when given.

    Written whole or not at all (`integrity.writing_directory`: staged, hashed, flushed, renamed),
    so a crash leaves the previous contents, never a mix; `step` (the training step the weights
    are from) is kept in its manifest, for `best_weights_usable`.

    `module` is the sub-module at `prefix` of `model` (as `Processes.prepare` returned it). Every
    process calls this (with FSDP the weights are gathered first); the main process writes."""
    state = sub_state(processes.full_state_dict(model), prefix)
    if processes.is_main:
        with writing_directory(directory, None if step is None else {"step": step}) as staging:
            if merge:
                from rft_core.models import merge_lora

                merged = merge_lora(module)
                # A merged LoRA model is never sharded (`shard` refuses frozen weights): it is complete here.
                state = state if merged is module else None
                module = merged
            module.save_pretrained(str(staging), state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
    processes.wait()


def best_weights_usable(directory: Path, step: int) -> bool:
    """Whether `directory` holds whole weights of training step `step` (the best validation so
    far). When not (damaged, missing, or of another step: a crash came between saving a newer best
    and the checkpoint that records it), say so: the caller keeps the weights it has."""
    problem = directory_problem(directory)
    saved = manifest_meta(directory).get("step") if problem is None else None
    if problem is None and saved is not None and saved != step:
        problem = f"it holds the weights of step {saved}"
    if problem is None:
        return True
    logger.warning(
        "the best weights in %s cannot be used (%s): keeping the last step's weights instead of step %s's",
        directory, problem, step,
    )
    return False


def load_best_weights(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Load the weights `save_weights` wrote (full model or adapter) into `model` (not sharded)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    if isinstance(model, PeftModel):
        adapter = directory / "adapter_model.safetensors"
        with reading(adapter, "saved adapter weights"):
            set_peft_model_state_dict(model, load_file(str(adapter)))
        return model
    files = sorted(directory.glob("*.safetensors"))
    state = {}
    for f in files:
        with reading(f, "saved weights"):
            state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"the weights in {directory} do not match the model: missing {missing}, unexpected {unexpected}"
        )
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
