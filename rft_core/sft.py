"""Warm-up SFT: supervised fine-tuning on the items that carry a worked solution.

Loss on the solution tokens only (prompt masked), normalised by the number of target tokens in the
whole optimizer step across all processes, so 1 process with batch 8 and 2 processes with batch 4
compute the same update (`training.Processes`). AdamW with warm-up and decay, gradient clipping,
periodic validation, checkpoints, resume, and the best-validation checkpoint kept. Runs on
`accelerate` (CPU, one GPU, or `accelerate launch` over several processes, data parallel or FSDP),
in float32 or mixed precision (`model.dtype`). Shares its set-up and bookkeeping with RL through
`rft_core.training`.

The same loop pretrains the tiny model on generated documents (`train_language_model`), always in
this one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase, get_scheduler

from rft_core.checkpoint import (
    hash_of,
    load_state,
    load_training_state,
    resumable_checkpoint,
    run_settings,
    save_checkpoint,
)
from rft_core.config import RFTConfig, SFTConfig
from rft_core.guards import NonFiniteError, diverged
from rft_core.integrity import reading, write_file
from rft_core.lifecycle import TrainingStopped, deferring_stops
from rft_core.models import (
    add_lora,
    encode_completion,
    end_of_response,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    row_prompt_ids,
)
from rft_core.progress import progress
from rft_core.training import (
    LogFn,
    Processes,
    StageResult,
    best_weights_usable,
    make_accelerator,
    save_weights,
    selection_key,
    stage_grader,
    step_positions,
    stop_after_step,
)

logger = logging.getLogger("rft.sft")


@dataclass
class Example:
    """One training sequence: prompt tokens (no loss) then completion tokens (loss)."""

    prompt_ids: list[int]
    completion_ids: list[int]


def solution_target(solution: str, reference: str) -> str:
    """The SFT target: the worked solution, ending with the `#### answer` line it implies."""
    solution = solution.rstrip()
    if "####" in solution:
        return solution
    return f"{solution}\n#### {reference}"


def sft_examples(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, cfg: RFTConfig) -> list[Example]:
    """Examples from the rows that carry a worked solution; prompts are cut from the left to fit."""
    examples = []
    end = end_of_response(tokenizer, cfg.model).token_id
    for _, row in frame.iterrows():
        solution = row.get("solution")
        if not isinstance(solution, str) or not solution.strip():
            continue
        prompt = row_prompt_ids(tokenizer, cfg.model, row)
        completion = encode_completion(tokenizer, solution_target(solution, str(row["reference"])), end)
        completion = completion[: cfg.sft.max_length - 1]
        prompt = prompt[-(cfg.sft.max_length - len(completion)):]
        examples.append(Example(prompt, completion))
    return examples


def document_examples(
    documents: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> list[Example]:
    """Language-model examples: documents joined with EOS and packed into blocks of `block_size`
    tokens (no padding wasted), loss on every token after the block's first."""
    stream: list[int] = []
    for doc in documents:
        stream += encode_completion(tokenizer, doc)
    starts = range(0, max(1, len(stream) - block_size + 1), block_size)
    return [Example(stream[start : start + 1], stream[start + 1 : start + block_size]) for start in starts]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and padding)."""
    width = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids = e.prompt_ids + e.completion_ids
        input_ids[i, : len(ids)] = torch.as_tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, len(e.prompt_ids) : len(ids)] = torch.as_tensor(e.completion_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_nll_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over label tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    return loss, int((targets != -100).sum())


@torch.no_grad()
def validation_loss(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(next(model.parameters()).device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        loss, n = token_nll_sum(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(1, count)


# Fields that change how long a run is or what it reports, not what a step computes: a resumed run
# may change them (e.g. train for more epochs).
_SFT_RUN_LENGTH_FIELDS = {"enabled", "epochs", "max_steps", "eval_interval", "checkpoint_interval", "keep_best"}


def train_examples(
    *,
    make_model: Callable[[Path | None], torch.nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: SFTConfig,
    out_dir: str | Path,
    processes: Processes,
    log: LogFn | None = None,
    evaluate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    identity: dict[str, Any] | None = None,
    task: str = "sft",
    lr_key: str = "sft.lr",
) -> tuple[torch.nn.Module, list[dict[str, float]], dict[str, Any]]:
    """The supervised loop. Returns the trained model as `processes.prepare` returned it (best
    checkpoint's weights when `settings.keep_best` and validation ran), the metric history and the
    final state.

    `make_model(checkpoint_model_dir or None)` builds the trainable model: from the base, or from a
    checkpoint's `model/` directory when resuming. A checkpoint left in `out_dir` by a run with
    other settings (the training fields of `settings`, the examples, `identity`: e.g. the starting
    model) is refused. Progress is reported under the name `task`; a step that diverges (non-finite
    gradients or weights) stops the loop with an error naming `lr_key`, the setting to lower.
    """
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    world, rank = processes.world, processes.rank
    micro = settings.batch_size
    global_batch = micro * settings.grad_accum * world
    n = len(examples)
    if n == 0:
        raise ValueError("no training examples (SFT needs items with a worked solution)")
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * n / global_batch))

    run_identity = run_settings(
        settings, ignore=_SFT_RUN_LENGTH_FIELDS, processes=world, **(identity or {}),
        examples=hash_of([(ex.prompt_ids, ex.completion_ids) for ex in examples]),
    )
    resume_from = resumable_checkpoint(ckpt_root, run_identity, "sft.")
    model = processes.prepare(make_model(resume_from / "model" if resume_from else None))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule_name = {"constant": "constant_with_warmup"}.get(settings.lr_scheduler, settings.lr_scheduler)
    scheduler = get_scheduler(
        schedule_name, optimizer, num_warmup_steps=int(settings.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    state: dict[str, Any] = {"history": [], "best": None, "best_step": None}
    start_step = 0
    if resume_from is not None:
        processes.load_optimizer_state(model, optimizer, load_training_state(resume_from, scheduler))
        state = load_state(resume_from)
        start_step = state.pop("step")
        logger.info("resuming from %s (step %d of %d)", resume_from, start_step, total_steps)
    state["settings"] = run_identity
    device = processes.device
    pad_id = tokenizer.pad_token_id
    best_dir = out_dir / "best"

    def run_eval(step: int) -> None:
        if evaluate_fn is None:
            return
        with processes.gathered(model), processes.autocast():
            metrics = evaluate_fn(processes.unwrap(model))
        entry = {"step": step, **metrics}
        state["history"].append(entry)
        if log and processes.is_main:
            log(metrics, step)
        key = selection_key(metrics)
        if settings.keep_best and (state["best"] is None or key > tuple(state["best"])):
            state["best"], state["best_step"] = list(key), step
            save_weights(processes, model, processes.unwrap(model), best_dir, step=step)
        processes.wait()

    with contextlib.ExitStack() as stack:
        # The bar opens first: the starting model's validation shows on it (not a blank while it
        # runs); stop requests wait for step boundaries from the first step on, as before.
        bar = stack.enter_context(progress(task, total_steps, "steps", start=start_step, enabled=processes.is_main))
        if start_step == 0 and evaluate_fn is not None and settings.eval_interval:
            with bar.doing("validating the starting model"):
                run_eval(0)
        model.train()
        started = time.perf_counter()
        tokens_seen = 0
        stack.enter_context(deferring_stops())
        for step in range(start_step, total_steps):
            # Per-step seed: dropout and friends replay exactly after a resume.
            torch.manual_seed(settings.seed * 1_000_003 + step * 7919 + rank)
            positions = step_positions(step, global_batch, n, settings.seed)
            step_examples = [examples[i] for i in positions]
            target_tokens = sum(len(e.completion_ids) for e in step_examples)
            # grad_accum micro-batches: block m holds micro x world examples, this process takes its micro.
            blocks = (step_examples[m * micro * world : (m + 1) * micro * world] for m in range(settings.grad_accum))
            mine = [block[rank * micro : (rank + 1) * micro] for block in blocks]
            loss_total = 0.0
            for part in processes.accumulate(model, mine):
                batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
                with processes.autocast():
                    nll, _ = token_nll_sum(model, batch)
                processes.backward(nll / target_tokens)  # the token-mean over the whole step
                loss_total += float(nll.detach())
                tokens_seen += int(batch["attention_mask"].sum())
            done = step + 1
            try:
                grad_norm = processes.step(params, optimizer, scheduler, settings.max_grad_norm)
            except NonFiniteError as exc:
                raise diverged(exc, where=f"{task} step {done}", lr_key=lr_key, lr=settings.lr, checkpoints=ckpt_root) from None
            step_loss = processes.total(loss_total) / target_tokens  # a collective: every rank
            if log and processes.is_main:
                elapsed = time.perf_counter() - started
                log(
                    {
                        "loss": step_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_seen * world / max(elapsed, 1e-9),
                    },
                    done,
                )
            last = done == total_steps
            # The step is done: the bar says so before a validation or a checkpoint, and names them
            # while they run (a bar at 49/50 for the last validation would say nothing).
            bar.update(done, loss=step_loss, **_latest_validation(state["history"]))
            if evaluate_fn is not None and (last or (settings.eval_interval and done % settings.eval_interval == 0)):
                with bar.doing("validating"):
                    run_eval(done)
                bar.update(done, loss=step_loss, **_latest_validation(state["history"]))
            stopping = stop_after_step(processes)  # Ctrl-C, SIGTERM: checkpoint, then stop
            if stopping or (settings.checkpoint_interval and done % settings.checkpoint_interval == 0) or last:
                with bar.doing("saving a checkpoint"):
                    model_state = processes.full_state_dict(model)  # these two gather with FSDP: every process
                    optimizer_state = processes.optimizer_state(model, optimizer)
                    if processes.is_main:
                        save_checkpoint(
                            ckpt_root, done, model=processes.unwrap(model), tokenizer=tokenizer,
                            optimizer_state=optimizer_state, scheduler=scheduler, state=state,
                            model_state=model_state,
                        )
                    processes.wait()
            if stopping:
                raise TrainingStopped(task, done, total_steps, ckpt_root / f"step-{done}")

    best_step = state["best_step"]
    if settings.keep_best and best_step is not None and best_step != total_steps:
        if best_weights_usable(best_dir, best_step):
            processes.load_weights(model, processes.unwrap(model), best_dir)
        else:
            state["best"], state["best_step"] = None, None
    return model, state["history"], state


def _latest_validation(history: list[dict[str, float]]) -> dict[str, float]:
    """The last validation's accuracy (and sampled reward), to show beside a loop's progress."""
    if not history:
        return {}
    last = history[-1]
    return {key: last[key] for key in ("val_accuracy", "val_sampled_reward") if key in last}


# --------------------------------------------------------------------------- stages


def run_sft(
    cfg: RFTConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    base_model: str | Path,
    out_dir: str | Path,
    *,
    log: LogFn | None = None,
    grader: Any | None = None,
    accelerator: Accelerator | None = None,
) -> StageResult:
    """Warm-up SFT from `base_model` on `train` items with solutions; validates on `val`.

    The result directory (`out_dir/model`) holds a full model: a LoRA warm-up is merged into the
    weights, so that the RL stage's adapters-off reference is exactly this model. Trained weights
    are float32 (mixed precision computes in `model.dtype`; see `training.Processes`).
    """
    from rft_core.evaluate import validation_metrics

    out_dir = Path(out_dir)
    device = pick_device(cfg.model.device)
    precision = pick_dtype(cfg.model.dtype, device)
    accelerator = accelerator or make_accelerator(device)
    processes = Processes(accelerator, precision)
    tokenizer = load_tokenizer(base_model, cfg.model)
    examples = sft_examples(train, tokenizer, cfg)
    val_examples = sft_examples(val, tokenizer, cfg)
    logger.info("SFT on %d items with solutions (of %d)", len(examples), len(train))

    def make_model(checkpoint: Path | None) -> torch.nn.Module:
        if cfg.model.lora.enabled:
            # The frozen base may be stored in the compute precision; peft keeps adapters in float32.
            model = load_model(base_model, cfg.model, device=processes.device, dtype=precision)
            if checkpoint is not None:
                from peft import PeftModel

                with reading(checkpoint, "checkpoint adapter"):
                    return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
            return add_lora(model, cfg.model)
        return load_model(checkpoint or base_model, cfg.model, device=processes.device, dtype=torch.float32)

    with stage_grader(cfg, grader) as grader:

        def evaluate_fn(model: torch.nn.Module) -> dict[str, float]:
            metrics = validation_metrics(model, tokenizer, val, grader, cfg, accelerator)
            if val_examples:
                metrics["val_loss"] = validation_loss(model, val_examples, tokenizer.pad_token_id, cfg.sft.batch_size)
            return metrics

        model, history, state = train_examples(
            make_model=make_model, tokenizer=tokenizer, examples=examples, settings=cfg.sft,
            out_dir=out_dir, processes=processes, log=log, evaluate_fn=evaluate_fn,
            identity={
                "start_model": str(base_model),
                "lora": cfg.model.lora.model_dump(mode="json"),
            },
        )
    final = _final_metrics(history, state)
    model_dir = out_dir / "model"
    save_weights(processes, model, processes.unwrap(model), model_dir, tokenizer=tokenizer, merge=True)
    if processes.is_main:
        write_file(out_dir / "result.json", json.dumps({"metrics": final, "history": history}, indent=1))
    processes.wait()
    return StageResult(str(model_dir), final, history)


def _final_metrics(history: list[dict[str, float]], state: dict[str, Any]) -> dict[str, float]:
    """Metrics of the model the stage returns: the best evaluation when keep_best chose it."""
    if not history:
        return {}
    chosen = history[-1]
    if state.get("best_step") is not None:
        chosen = next(h for h in history if h["step"] == state["best_step"])
    return {k: float(v) for k, v in chosen.items()}


def train_language_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    settings: SFTConfig,
    out_dir: str | Path,
    *,
    log: LogFn | None = None,
) -> torch.nn.Module:
    """Plain causal-LM training on `documents` (the tiny model's pretraining), in this process
    alone whatever the environment: under `accelerate launch` the main process runs it while the
    others wait (`Processes.local`)."""
    device = next(model.parameters()).device
    processes = Processes.local(device)
    examples = document_examples(documents, tokenizer, settings.max_length)

    def make_model(checkpoint: Path | None) -> torch.nn.Module:
        if checkpoint is not None:
            return load_model(checkpoint, device=device)
        return model

    trained, _, _ = train_examples(
        make_model=make_model, tokenizer=tokenizer, examples=examples, settings=settings,
        out_dir=out_dir, processes=processes, log=log, task="pretrain tiny model", lr_key="model.tiny.pretrain_lr",
    )
    return trained
