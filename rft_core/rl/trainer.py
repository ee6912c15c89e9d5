"""The RL stage: iterations of rollout (sample, grade, score the tokens) -> advantages -> update
(epochs x minibatches of the clipped loss), for PPO or GRPO (`algorithms.py`: where they differ).

Starts from the warm-up model. With LoRA, fresh adapters are trained and the reference is the same
weights with adapters off (exactly the warm-up model: no second copy in memory); with full
fine-tuning, a frozen copy is the reference. Prompt order and every sample are functions of
(seed, iteration), so resuming from a checkpoint continues exactly where the run stopped, and the
same batch split over several processes computes the same update (`training.Processes`).

No dropout anywhere: sampling, scoring and updates see one policy. The model is in evaluation
mode except inside the update, where training mode turns gradient checkpointing on (dropout is
disabled in the modules themselves, so both modes compute the same function). Sampling, scoring
(policy, critic, reference), updates and validation run under the stage's precision alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator

from rft_core.checkpoint import (
    hash_of,
    load_extra,
    load_state,
    load_training_state,
    resumable_checkpoint,
    run_settings,
    save_checkpoint,
)
from rft_core.config import RFTConfig
from rft_core.evaluate import validation_metrics
from rft_core.generation import Sampling, row_seeds
from rft_core.graders import GradeResult, grade_batch
from rft_core.guards import NonFiniteError, check_grader_errors, diverged
from rft_core.integrity import reading, write_file
from rft_core.lifecycle import TrainingStopped, deferring_stops
from rft_core.models import (
    add_lora,
    decode,
    end_of_response,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    prompt_token_ids,
)
from rft_core.progress import progress
from rft_core.rl.advantages import flat_groups
from rft_core.rl.algorithms import ALGORITHMS, Estimate
from rft_core.rl.guard import STOP, Guard
from rft_core.rl.losses import LOSS_STATS, LossOutput, ppo_losses
from rft_core.rl.rollout import PolicyWithValue, Rollout, group_rows, pack, sample_rollout, score_tokens
from rft_core.training import (
    LogFn,
    Processes,
    StageResult,
    best_weights_usable,
    disable_dropout,
    item_records,
    make_accelerator,
    save_weights,
    selection_key,
    stage_grader,
    step_positions,
    stop_after_step,
    sub_state,
    training_mode,
)

logger = logging.getLogger("rft.rl")

# Fields that change how long a run is, what it reports or how work is batched, not what an
# iteration computes: a resumed run may change them (e.g. run more iterations).
_RL_RUN_LENGTH_FIELDS = {
    "enabled", "iterations", "eval_interval", "checkpoint_interval", "keep_best",
    "generation_batch_size", "micro_batch_size", "guard",
}

# The per-iteration statistics kept for the picture of an RL run's health (`rl_signals.png`).
SIGNALS = ("reward_mean", "val_sampled_reward", "val_accuracy", "kl", "entropy", "response_length")


_APPROX_KL = LOSS_STATS.index("approx_kl")

# What the progress display shows of an iteration's statistics.
_SHOWN = ("reward_mean", "kl", "val_accuracy", "val_sampled_reward")

# Receives rollout samples (one dict per sample) at the iterations `RLTrainer.samples_due` picks;
# the stage passes one that appends them to a table of the tracking run.
SamplesFn = Callable[[list[dict[str, Any]]], None]

# Samples of an iteration handed to `log_samples`: the first ones of the main process's share
# (whole groups of a prompt's samples when the group size divides it), enough to read, small
# enough to log every few iterations.
LOGGED_SAMPLES = 16


class RLTrainer:
    """Holds the policy (+ value head), the reference, the optimizer and the data of one RL run."""

    def __init__(
        self,
        cfg: RFTConfig,
        train: pd.DataFrame,
        val: pd.DataFrame,
        init_model: str | Path,
        out_dir: str | Path,
        *,
        grader: Any,
        log: LogFn | None = None,
        log_samples: SamplesFn | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.cfg, self.rl = cfg, cfg.rl
        self.algorithm = ALGORITHMS[self.rl.algorithm]
        self.train, self.val = train.reset_index(drop=True), val
        self.init_model = str(init_model)
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.grader, self.log, self.log_samples = grader, log, log_samples
        device = pick_device(cfg.model.device)
        self.precision = pick_dtype(cfg.model.dtype, device)  # of computation; trained weights: float32
        self.accelerator = accelerator or make_accelerator(device)
        self.processes = Processes(self.accelerator, self.precision)
        self.world, self.rank = self.processes.world, self.processes.rank
        if self.rl.prompts_per_iteration % self.world:
            raise ValueError(
                f"rl.prompts_per_iteration ({self.rl.prompts_per_iteration}) must divide over "
                f"{self.world} processes"
            )
        rows_local = self.rl.prompts_per_iteration * self.rl.samples_per_prompt // self.world
        k = self.rl.samples_per_prompt
        # Rows of one prompt stay together (minibatches hold whole groups) so that the prompt can
        # run once per group. Gradient checkpointing cannot reuse a cache, and with FSDP every
        # process must run the same forward passes (a group's second one depends on its responses'
        # lengths), so either turns this off.
        shared = self.rl.shared_prompt_forward and k > 1
        self.group = k if (shared and not cfg.model.gradient_checkpointing and not self.processes.sharded) else 1
        wanted = min(rows_local, self.rl.minibatch_size // self.world)
        self.minibatch_local = max(self.group, wanted // self.group * self.group)
        micro = self.rl.micro_batch_size // self.world if self.rl.micro_batch_size else self.minibatch_local
        self.micro_batch_local = max(self.group, min(micro, self.minibatch_local) // self.group * self.group)
        if k < self.algorithm.min_samples_per_prompt:
            raise ValueError(
                f"{self.rl.algorithm.upper()} needs rl.samples_per_prompt >= {self.algorithm.min_samples_per_prompt} "
                "(it compares samples of a prompt)"
            )

        self.tokenizer = load_tokenizer(self.init_model, cfg.model)
        self.prompts = prompt_token_ids(self.train, self.tokenizer, cfg.model, self.rl.max_prompt_length)
        self.items = item_records(self.train)
        self.eos = end_of_response(self.tokenizer, cfg.model, self.init_model).stop_ids

        identity = run_settings(
            self.rl, ignore=_RL_RUN_LENGTH_FIELDS, start_model=self.init_model,
            lora=cfg.model.lora.model_dump(mode="json"), items=hash_of(self.prompts, list(self.train["reference"])),
        )
        resume_from = resumable_checkpoint(self.ckpt_root, identity, "rl.")
        policy = disable_dropout(self._build_policy(resume_from))
        self.module = PolicyWithValue(policy, self.algorithm.value_head).to(self.processes.device)
        extra = load_extra(resume_from) if resume_from is not None else {}
        if self.module.value_head is not None and "value_head.weight" in extra:
            self.module.value_head.load_state_dict(
                {"weight": extra["value_head.weight"], "bias": extra["value_head.bias"]}
            )
        self.reference = None
        if not cfg.model.lora.enabled and self._needs_reference():
            # Frozen: stored in the compute precision.
            self.reference = load_model(self.init_model, cfg.model, device=self.processes.device, dtype=self.precision)
            disable_dropout(self.reference).eval().requires_grad_(False)
        self.model = self.processes.prepare(self.module)
        self.model.eval()  # training mode only inside the update (see the module docstring)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # What the critic warm-up trains: the value head alone (`update` clears the others' gradients).
        head = self.module.value_head
        self.head_params = {id(p) for p in head.parameters()} if head is not None else set()
        # The critic learns at its own rate (rl.critic_lr; verl and OpenRLHF give it its own too):
        # it must catch up with the returns before its values shape the policy's advantages.
        groups = [{"params": [p for p in self.params if id(p) not in self.head_params], "lr": self.rl.lr}]
        if self.head_params:
            groups.append({"params": [p for p in self.params if id(p) in self.head_params],
                           "lr": self.rl.critic_lr or self.rl.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=self.rl.lr, eps=1e-5, weight_decay=0.0)
        warmup = self.rl.warmup_steps
        # Warm-up counts optimizer steps; the decay counts iterations (their number of optimizer
        # steps varies), set by `_set_iteration_lr` at the start of each one.
        self._decay = 1.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: (min(1.0, (step + 1) / warmup) if warmup else 1.0) * self._decay
        )
        self.state: dict[str, Any] = {"history": [], "best": None, "best_iteration": None}
        self.start_iteration = 0
        if resume_from is not None:
            optimizer_state = load_training_state(resume_from, self.scheduler)
            self.processes.load_optimizer_state(self.model, self.optimizer, optimizer_state)
            self.state = load_state(resume_from)
            self.start_iteration = self.state.pop("step")
            logger.info("resuming RL from %s (iteration %d)", resume_from, self.start_iteration)
        self.state["settings"] = identity
        self.state.setdefault("signals", [])
        self.guard = Guard(self.rl.guard, self.state.setdefault("guard", None))
        self.state["guard"] = self.guard.state
        self.stopped_by_guard = False
        # The settings of the current iteration: rl.kl_coef as adapted so far (rl.kl_target).
        self.state.setdefault("kl_coef", self.rl.kl_coef)
        self.rl = self.rl.model_copy(update={"kl_coef": self.state["kl_coef"]})

    # ------------------------------------------------------------------ one iteration

    def iteration(self, iteration: int) -> dict[str, float]:
        """One RL iteration: rollout (sample, grade, score) -> advantages -> update; its statistics."""
        started, timings = time.perf_counter(), {}
        self._set_iteration_lr(iteration)
        batch = self.rollout(iteration, timings)
        stats = self.rollout_stats(batch, timings)
        check_grader_errors(
            stats["grader_errors"], stats["samples"], self.cfg.grader.max_error_share,
            f"RL iteration {iteration + 1}", batch.errors,
        )
        stats.update(self.update(batch, iteration, timings))
        stats["lr"] = self.scheduler.get_last_lr()[0]
        stats["kl_coef"] = self.rl.kl_coef
        self.adapt_kl_coef(stats["kl"], int(stats["samples"]))
        update_tokens = self.processes.sum(torch.tensor([timings["update_tokens"]])).item()
        stats["update_tokens_per_s"] = update_tokens / max(1e-9, timings["update"])
        for key in ("generate", "grade", "score", "update"):
            stats[f"time_{key}"] = timings[key]
        stats["time_iteration"] = time.perf_counter() - started
        return stats

    def update(self, batch: Rollout, iteration: int, timings: dict[str, float]) -> dict[str, float]:
        """Advantages, then `ppo_epochs` passes over the batch in shuffled minibatches, one optimizer
        step each; statistics averaged over the steps."""
        rl, processes = self.rl, self.processes
        # The first `critic_warmup` iterations train the value head alone (PPO).
        critic_only = self.algorithm.value_head and iteration < rl.critic_warmup
        # Prompt groups whose samples all scored the same: no signal to compare (reported always).
        flat = flat_groups(batch.scores, rl.samples_per_prompt, batch.graded)
        filtered = {"flat_groups": float(flat.float().mean()) if len(flat) else 0.0}
        if rl.filter_flat_groups:
            batch.response_mask = batch.response_mask * (~flat).repeat_interleave(rl.samples_per_prompt)[:, None]
        estimate = self.algorithm.advantages(batch, rl, processes.sum)  # the PPO / GRPO seam
        stats = processes.mean(estimate.stats | filtered)
        stats["kl"] = processes.total(estimate.kl.sum()) / max(1.0, processes.total(len(estimate.kl)))

        t0, steps, tokens = time.perf_counter(), 0, 0
        widths = batch.group_widths(self.group)
        totals = torch.zeros(len(LOSS_STATS), dtype=torch.float64)  # loss statistics, summed over steps
        stop_above = 1.5 * rl.target_kl if rl.target_kl is not None and not critic_only else math.inf
        with training_mode(self.model):  # gradient checkpointing runs in training mode only
            for epoch in range(rl.ppo_epochs):
                minibatches = self.minibatches(iteration, epoch, len(batch.texts), widths)
                for rows in minibatches:
                    normaliser = self.loss_normaliser(batch, rows, len(minibatches))
                    if normaliser == 0:
                        continue
                    step_totals = torch.zeros_like(totals)
                    for part in processes.accumulate(self.model, self.micro_batches(rows, widths)):
                        with processes.autocast():
                            out = self.losses(batch, part, estimate, normaliser, critic_only)
                        processes.backward(out.loss)
                        step_totals += out.stats()
                        tokens += int(batch.attention_mask[part].sum())
                    if critic_only:
                        self._drop_trunk_gradients()
                    processes.step(self.params, self.optimizer, self.scheduler, rl.max_grad_norm)
                    step_totals = processes.sum(step_totals)  # every process's: they all stop together
                    totals += step_totals
                    steps += 1
                    if step_totals[_APPROX_KL] > stop_above:
                        break  # the policy moved far enough from the rollout's (rl.target_kl)
                else:
                    continue
                break
        timings.update(update=time.perf_counter() - t0, update_tokens=float(tokens))
        means = dict(zip(LOSS_STATS, (totals / max(1, steps)).tolist(), strict=True))
        return stats | {key: means[key] for key in self.algorithm.loss_stats} | {"update_steps": float(steps)}

    def adapt_kl_coef(self, kl: float, samples: int) -> None:
        """Adaptive KL (`rl.kl_target`, Ziegler et al. 2019, as verl's AdaptiveKLController): move
        kl_coef toward holding the per-sample KL to the warm-up model at the target. The settings
        of the next iteration (`self.rl`) carry the new coefficient; the checkpoint keeps it."""
        target = self.cfg.rl.kl_target
        if target is None:
            return
        error = min(max(kl / target - 1.0, -0.2), 0.2)
        self.state["kl_coef"] = self.state["kl_coef"] * (1.0 + error * samples / self.cfg.rl.kl_horizon)
        self.rl = self.cfg.rl.model_copy(update={"kl_coef": self.state["kl_coef"]})

    def loss_normaliser(self, batch: Rollout, rows: torch.Tensor, n_minibatches: int) -> float:
        """The loss's denominator for minibatch `rows` (0: it has no response token on any process):
        its response tokens (every process's). With `rl.group_by_length`, minibatches of one length
        hold more or fewer tokens, so each divides by the batch's response tokens per minibatch
        instead: an epoch's gradient is then the whole batch's token mean, as with random ones."""
        tokens = self.processes.total(batch.response_mask[rows].sum())
        if tokens == 0 or not self.rl.group_by_length:
            return tokens
        return self.processes.total(batch.response_mask.sum()) / n_minibatches

    def _drop_trunk_gradients(self) -> None:
        """Leave everything but the value head out of a critic warm-up step (gradients None: the
        optimizer skips them). A zero gradient would still count as an Adam step: its bias correction
        then assumes moments averaged over steps that carried nothing, and the policy's first real
        steps come out up to twice the learning rate (measured: twice the KL to the warm-up model
        over the first 10 policy iterations, and a dip in validation accuracy)."""
        for p in self.params:
            if id(p) not in self.head_params:
                p.grad = None

    def losses(
        self, batch: Rollout, rows: torch.Tensor, estimate: Estimate, normaliser: float, critic_only: bool = False
    ) -> LossOutput:
        """The clipped policy loss of `rows`, plus the critic's value loss (PPO) or the KL term
        (GRPO), as sums over their response tokens divided by `normaliser`. `critic_only`: the
        value loss alone, on the trunk's detached hidden states (the critic warm-up)."""
        rl, device = self.rl, self.processes.device
        input_ids, attention_mask, width = batch.minibatch(rows)
        logprobs, values, _ = self.model(
            input_ids.to(device), attention_mask.to(device), width, Sampling.of(rl), self.group,
            with_entropy=False, detach_value=critic_only or rl.critic_detached,
        )

        def rollout_side(t: torch.Tensor) -> torch.Tensor:  # what the rollout computed for these tokens
            return t[rows, :width].to(device)

        kwargs: dict[str, Any] = {}
        if self.algorithm.value_head:
            kwargs.update(
                values=values, old_values=rollout_side(batch.values), returns=rollout_side(estimate.returns),
                vf_clip_range=rl.vf_clip_range, vf_coef=rl.vf_coef,
            )
        if self.algorithm.kl_in_loss and batch.ref_logprobs is not None:
            kwargs.update(ref_logprobs=rollout_side(batch.ref_logprobs), kl_coef=rl.kl_coef)
        out = ppo_losses(
            logprobs, rollout_side(batch.logprobs), rollout_side(estimate.advantages),
            rollout_side(batch.response_mask), clip_range=rl.clip_range, normaliser=normaliser, **kwargs,
        )
        if critic_only:
            # 0 x the policy loss keeps every parameter in the graph (data-parallel processes
            # exchange a gradient for each), with nothing in it for the trunk (`update` then
            # drops the trunk's gradients before the optimizer step).
            out.loss = rl.vf_coef * out.vf_loss + 0.0 * out.pg_loss
        return out

    def minibatches(
        self, iteration: int, epoch: int, n_rows: int, widths: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """This process's rows in this epoch's shuffled order, cut into minibatches; the samples of
        a prompt stay together (see `group`). With `rl.group_by_length`, the shuffled groups are
        sorted by `widths` (`Rollout.group_widths`: equal widths stay in shuffled order) before the
        cut, and the minibatches come in shuffled order."""
        g = torch.Generator().manual_seed((self.rl.seed * 1_000_003 + iteration) * 101 + epoch)
        groups = torch.randperm(n_rows // self.group, generator=g)
        if self.rl.group_by_length and widths is not None:
            groups = groups[torch.argsort(widths[groups], stable=True)]
        order = group_rows(groups, self.group)
        cut = [order[start : start + self.minibatch_local] for start in range(0, n_rows, self.minibatch_local)]
        if self.rl.group_by_length:
            cut = [cut[i] for i in torch.randperm(len(cut), generator=g).tolist()]
        return cut

    def micro_batches(self, rows: torch.Tensor, widths: torch.Tensor | None = None) -> list[torch.Tensor]:
        """A minibatch in chunks of `rl.micro_batch_size` (gradient accumulation bounds memory), cut
        in order of its groups' `widths` (`Rollout.group_widths`) so that each chunk, trimmed of the
        padding its rows share, carries less of it. The chunks' losses add up to the minibatch's
        whatever rows they hold: the same gradient. Groups stay whole (a stable sort of whole groups)."""
        if widths is not None and len(rows) > self.micro_batch_local:
            rows = rows[torch.argsort(widths[rows // self.group], stable=True)]
        return [rows[i : i + self.micro_batch_local] for i in range(0, len(rows), self.micro_batch_local)]

    # ------------------------------------------------------------------ rollout

    def iteration_prompts(self, iteration: int) -> list[int]:
        """This process's share of the iteration's training items."""
        positions = step_positions(iteration, self.rl.prompts_per_iteration, len(self.prompts), self.rl.seed)
        share = self.rl.prompts_per_iteration // self.world
        return positions[self.rank * share : (self.rank + 1) * share]

    def rollout(self, iteration: int, timings: dict[str, float]) -> Rollout:
        """Sample `samples_per_prompt` completions of this process's prompts, grade them, and score
        their tokens under the policy, the critic and the reference: in the stage's precision, with
        the full weights on every process (`Processes.gathered`)."""
        with torch.no_grad(), self.processes.gathered(self.model), self.processes.autocast():
            return self._rollout(iteration, timings)

    def _rollout(self, iteration: int, timings: dict[str, float]) -> Rollout:
        k = self.rl.samples_per_prompt
        items = self.iteration_prompts(iteration)
        # A sample's seed depends on the run seed, the iteration, the item and the sample index.
        slot = [self.rank * len(items) + j for j in range(len(items))]
        seeds = row_seeds(self.rl.seed * 1_000_003 + iteration, [s * k + i for s in slot for i in range(k)])
        t0 = time.perf_counter()
        prompts, item_idx, completions, stopped = sample_rollout(
            self.policy, [self.prompts[i] for i in items], items,
            samples_per_prompt=k, seeds=seeds, eos_token_ids=self.eos,
            pad_token_id=self.tokenizer.pad_token_id, max_new_tokens=self.rl.max_new_tokens,
            temperature=self.rl.temperature, top_k=self.rl.top_k, batch_size=self.rl.generation_batch_size,
            top_p=self.rl.top_p, min_p=self.rl.min_p,
        )
        t1 = time.perf_counter()
        texts = [decode(self.tokenizer, c) for c in completions]
        results = grade_batch(self.grader, texts, [self.items[i] for i in item_idx], workers=self.cfg.grader.workers)
        graded = torch.tensor([r.reward is not None for r in results])
        scores = torch.tensor([r.reward if r.reward is not None else 0.0 for r in results], dtype=torch.float32)
        t2 = time.perf_counter()
        input_ids, attention_mask, response_mask = pack(prompts, completions, self.tokenizer.pad_token_id)
        response_mask = response_mask * graded[:, None]
        errors = [e for r in results for e in r.errors][:5]
        batch = Rollout(input_ids, attention_mask, response_mask, item_idx, texts, scores, graded, stopped, errors=errors)
        self.score(batch)
        t3 = time.perf_counter()
        timings.update(generate=t1 - t0, grade=t2 - t1, score=t3 - t2)
        timings["generated_tokens"] = float(sum(len(c) for c in completions))
        done = iteration + 1  # iterations are numbered from 1 where they are logged
        if self.log_samples is not None and self.processes.is_main and self.samples_due(done):
            self.log_samples(self.sample_rows(done, item_idx, texts, results))
        return batch

    def samples_due(self, done: int) -> bool:
        """Whether iteration `done` (from 1) hands samples to `log_samples`: the first, each one
        that is validated (every `eval_interval`) and the last."""
        rl = self.rl
        return done == 1 or done == rl.iterations or bool(rl.eval_interval and done % rl.eval_interval == 0)

    def sample_rows(
        self, done: int, item_idx: list[int], texts: list[str], results: list[GradeResult]
    ) -> list[dict[str, Any]]:
        """The first `LOGGED_SAMPLES` samples of this process's rollout as table rows: the item's
        prompt and reference, the completion, its reward (None when the grader failed, with the
        error), and the sub-graders' rewards as JSON text (one column whatever the grader)."""
        rows = []
        for i, text, result in list(zip(item_idx, texts, results, strict=True))[:LOGGED_SAMPLES]:
            item = self.items[i]
            rows.append(
                {
                    "iteration": done,
                    "id": str(item.get("id")),
                    "prompt": item.get("prompt"),
                    "completion": text,
                    "reward": result.reward,
                    "error": "; ".join(result.errors),
                    "sub_rewards": json.dumps(result.sub_rewards, sort_keys=True),
                    "reference": item.get("reference"),
                }
            )
        return rows

    @torch.no_grad()
    def score(self, batch: Rollout) -> None:
        """Fill in the sampled tokens' log-probabilities and entropy under the policy, the critic's
        values and the reference's log-probabilities, in chunks of rows of similar lengths
        (`Rollout.by_length`) trimmed of their common padding; positions past a chunk's width
        (padding in every row of it) are 0."""
        model, device = self.processes.unwrap(self.model), self.processes.device
        n, width_r = len(batch.texts), batch.response_length
        logprobs, entropy = torch.zeros(n, width_r), torch.zeros(n, width_r)
        values = torch.zeros(n, width_r) if self.algorithm.value_head else None
        ref = torch.zeros(n, width_r) if self._needs_reference() else None
        order = batch.by_length(self.group)
        for start in range(0, n, self.minibatch_local):
            rows = order[start : start + self.minibatch_local]
            input_ids, attention_mask, width = batch.minibatch(rows)
            ids, am = input_ids.to(device), attention_mask.to(device)
            lp, v, ent = model(ids, am, width, Sampling.of(self.rl), self.group)
            logprobs[rows, :width], entropy[rows, :width] = lp.cpu(), ent.cpu()
            if values is not None:  # the module has a value head exactly when the algorithm does
                values[rows, :width] = v.cpu()
            if ref is not None:
                ref[rows, :width] = self.reference_logprobs(ids, am, width).cpu()
        batch.logprobs, batch.entropy, batch.values, batch.ref_logprobs = logprobs, entropy, values, ref

    def reference_logprobs(self, input_ids, attention_mask, length) -> torch.Tensor | None:
        """Log-probabilities of the sampled tokens under the warm-up model (None without a KL term)."""
        if not self._needs_reference():
            return None
        if self.reference is not None:
            return score_tokens(
                self.reference, input_ids, attention_mask, length, Sampling.of(self.rl), None, self.group, with_entropy=False
            )[0]
        with self.policy.disable_adapter():
            return score_tokens(
                self.policy, input_ids, attention_mask, length, Sampling.of(self.rl), None, self.group, with_entropy=False
            )[0]

    def rollout_stats(self, batch: Rollout, timings: dict[str, float]) -> dict[str, float]:
        graded = batch.graded
        reward_sum = float((batch.scores * graded).sum())
        correct = float(((batch.scores >= self.cfg.eval.pass_threshold) & graded).sum())
        lengths = batch.attention_mask[:, -batch.response_length :].sum(1).float()
        mask = batch.response_mask
        totals = self.processes.sum(
            torch.tensor(
                [reward_sum, float(graded.sum()), correct, float(len(graded)), float(lengths.sum()),
                 float((~graded).sum()), float((batch.entropy * mask).sum()), float(mask.sum()),
                 timings["generated_tokens"], float(sum(batch.stopped))],
                dtype=torch.float64,
            )
        ).tolist()
        reward, n_graded, correct, rows, length, errors, ent, tokens, generated, stopped = totals
        return {
            "samples": rows,
            "reward_mean": reward / max(1.0, n_graded),
            "accuracy": correct / max(1.0, rows),
            "response_length": length / max(1.0, rows),
            "grader_errors": errors,
            "entropy": ent / max(1.0, tokens),
            "stop_rate": stopped / max(1.0, rows),
            "rollout_tokens_per_s": generated / max(1e-9, timings["generate"]),
        }

    # ------------------------------------------------------------------ set-up

    def _needs_reference(self) -> bool:
        return self.rl.kl_coef > 0

    def _build_policy(self, checkpoint: Path | None) -> torch.nn.Module:
        device = self.processes.device
        if self.cfg.model.lora.enabled:
            # The frozen base may be stored in the compute precision; peft keeps adapters in float32.
            base = load_model(self.init_model, self.cfg.model, device=device, dtype=self.precision)
            if checkpoint is not None:
                from peft import PeftModel

                with reading(checkpoint / "model", "checkpoint adapter"):
                    return PeftModel.from_pretrained(base, str(checkpoint / "model"), is_trainable=True)
            return add_lora(base, self.cfg.model)
        source = checkpoint / "model" if checkpoint is not None else self.init_model
        return load_model(source, self.cfg.model, device=device, dtype=torch.float32)

    @property
    def policy(self) -> torch.nn.Module:
        return self.processes.unwrap(self.model).policy

    def _set_iteration_lr(self, iteration: int) -> None:
        """The learning rate of this iteration: warm-up x decay(iteration / iterations). A function of
        the iteration and the step count only, so a resumed run trains at the same rates."""
        progress = iteration / self.rl.iterations
        self._decay = {
            "constant": 1.0,
            "linear": 1.0 - progress,
            "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
        }[self.rl.lr_scheduler]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor

    # ------------------------------------------------------------------ the loop

    def run(self) -> StageResult:
        rl = self.rl
        shown = {}  # the figures beside the progress: training reward, KL, the last validation
        with contextlib.ExitStack() as stack:
            # The bar opens first: the starting model's validation shows on it; stop requests wait
            # for iteration boundaries from the first iteration on, as before.
            bar = stack.enter_context(
                progress("rl", rl.iterations, "iterations", start=self.start_iteration, enabled=self.processes.is_main)
            )
            if self.start_iteration == 0:
                if rl.eval_interval:
                    with bar.doing("validating the starting model"):
                        self._log(self.validate(0), 0)
                if self.guard.settings.enabled and self.state.get("best_iteration") is None:
                    self._save_best(0)  # what a rollback returns to when nothing was validated yet
            stack.enter_context(deferring_stops())
            for iteration in range(self.start_iteration, rl.iterations):
                done = iteration + 1
                bar.note(self.phase(iteration))
                try:
                    stats = self.iteration(iteration)
                except NonFiniteError as exc:
                    raise diverged(
                        exc, where=f"RL iteration {done}", lr_key="rl.lr", lr=rl.lr, checkpoints=self.ckpt_root
                    ) from None
                event = self.guard.after_iteration(done, stats)
                if (rl.eval_interval and done % rl.eval_interval == 0) or done == rl.iterations:
                    # The iteration is done: the bar says so, and names the validation while it runs.
                    bar.update(done, **{**shown, **{key: stats[key] for key in _SHOWN if key in stats}})
                    with bar.doing("validating"):
                        validation = self.validate(done)
                    stats.update(validation)
                    event = event or self.guard.after_validation(done, validation)
                self._signals(done, stats)
                if event is not None:
                    stats["guard_events"] = float(len(self.guard.events))
                self._log(stats, done)
                shown.update({key: stats[key] for key in _SHOWN if key in stats})
                bar.update(done, **shown)
                stopping = stop_after_step(self.processes)  # Ctrl-C, SIGTERM: checkpoint, then stop
                if event is not None:
                    logger.warning("guard: %s", event.message)
                    if event.action == STOP:
                        self.stopped_by_guard = True
                        break
                    self._rollback()
                if stopping or (rl.checkpoint_interval and done % rl.checkpoint_interval == 0) or done == rl.iterations:
                    with bar.doing("saving a checkpoint"):
                        self.checkpoint(done)
                if stopping:
                    raise TrainingStopped("rl", done, rl.iterations, self.ckpt_root / f"step-{done}")
        return self.finish()

    def phase(self, iteration: int) -> str | None:
        """What the progress display says beside an iteration's figures: the critic's warm-up
        trains the value head alone, so the policy does not move (KL stays 0)."""
        warmup = self.rl.critic_warmup
        if self.algorithm.value_head and iteration < warmup:
            return f"critic warm-up {iteration + 1}/{warmup}: value head only, the policy does not move"
        return None

    def _signals(self, done: int, stats: dict[str, float]) -> None:
        """What the RL stage's picture of collapse and reward hacking draws, per iteration: training
        reward against validation, KL to the warm-up model, entropy, response length."""
        self.state["signals"].append({"step": done, **{k: stats[k] for k in SIGNALS if k in stats}})

    def _rollback(self) -> None:
        """The guard's rollback: the best validated weights back, the optimizer's moments cleared
        (they belong to the run that went wrong), the learning rate times `rl.guard.lr_factor`."""
        best = self.out_dir / "best"
        if best_weights_usable(best, self.state["best_iteration"]):
            self.processes.load_weights(self.model, self.policy, best, prefix="policy.")
        self.optimizer.state.clear()
        factor = self.rl.guard.lr_factor
        self.scheduler.base_lrs = [base * factor for base in self.scheduler.base_lrs]

    def validate(self, iteration: int) -> dict[str, float]:
        with self.processes.gathered(self.model), self.processes.autocast():
            metrics = validation_metrics(
                self.policy, self.tokenizer, self.val, self.grader, self.cfg, self.accelerator
            )
        self.state["history"].append({"step": iteration, **metrics})
        best = self.state.get("best")
        key = selection_key(metrics)
        # The best weights are kept for keep_best, and for the guard (what it rolls back to).
        if (self.rl.keep_best or self.guard.settings.enabled) and (best is None or key > tuple(best)):
            self.state["best"] = list(key)
            self._save_best(iteration)
        return metrics

    def _save_best(self, iteration: int) -> None:
        self.state["best_iteration"] = iteration
        save_weights(
            self.processes, self.model, self.policy, self.out_dir / "best", prefix="policy.", step=iteration
        )

    def checkpoint(self, iteration: int) -> None:
        processes = self.processes
        # These gather with FSDP: every process calls them.
        policy_state = sub_state(processes.full_state_dict(self.model), "policy.")
        optimizer_state = processes.optimizer_state(self.model, self.optimizer)
        head = self._value_head_state()
        if processes.is_main:
            save_checkpoint(
                self.ckpt_root, iteration, model=self.policy, tokenizer=self.tokenizer,
                optimizer_state=optimizer_state, scheduler=self.scheduler, state=self.state,
                extra={f"value_head.{k}": v for k, v in head.items()} if head is not None else None,
                model_state=policy_state,
            )
        processes.wait()

    def finish(self) -> StageResult:
        processes = self.processes
        history = self.state["history"]
        chosen = history[-1] if history else {}
        best_iteration = self.state.get("best_iteration")
        # keep_best ends with the best validated weights; so does a run the guard stopped (its
        # weights now are the ones it stopped for).
        best_dir = self.out_dir / "best"
        best_later = self.rl.keep_best and best_iteration != self.rl.iterations
        if (
            best_iteration is not None and (self.stopped_by_guard or best_later)
            and best_weights_usable(best_dir, best_iteration)
        ):
            processes.load_weights(self.model, self.policy, best_dir, prefix="policy.")
            chosen = next((h for h in history if h["step"] == best_iteration), {})
        model_dir = self.out_dir / "model"
        save_weights(
            processes, self.model, self.policy, model_dir, prefix="policy.", tokenizer=self.tokenizer, merge=True
        )
        head = self._value_head_state()
        if processes.is_main:
            if head is not None:
                torch.save(head, self.out_dir / "value_head.pt")
            result = {"metrics": chosen, "history": history, "guard": self.guard.events, "signals": self.state["signals"]}
            write_file(self.out_dir / "result.json", json.dumps(result, indent=1))
        processes.wait()
        return StageResult(str(model_dir), {k: float(v) for k, v in chosen.items()}, history, events=self.guard.events)

    def _value_head_state(self) -> dict[str, torch.Tensor] | None:
        """The critic's weights, whole (gathered with FSDP: every process calls it); None without one."""
        head = self.processes.unwrap(self.model).value_head
        if head is None:
            return None
        state = head.state_dict()
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in state.items()}

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.log and self.processes.is_main:
            self.log(metrics, step)


def run_rl(
    cfg: RFTConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    init_model: str | Path,
    out_dir: str | Path,
    *,
    log: LogFn | None = None,
    log_samples: SamplesFn | None = None,
    grader: Any | None = None,
    accelerator: Accelerator | None = None,
) -> StageResult:
    """RL (PPO or GRPO, from `cfg.rl`) starting from `init_model`; the result is a full model.
    `log_samples` receives rollout samples at some iterations (`RLTrainer.samples_due`)."""
    with stage_grader(cfg, grader) as grader:
        trainer = RLTrainer(
            cfg, train, val, init_model, out_dir, grader=grader, log=log, log_samples=log_samples,
            accelerator=accelerator,
        )
        return trainer.run()
