"""The RL stage: iterations of rollout (sample, grade, score) and update (PPO or GRPO epochs).

Starts from the warm-up model. With LoRA, fresh adapters are trained and the reference is the same
weights with adapters off (exactly the warm-up model: no second copy in memory); with full
fine-tuning, a frozen copy is the reference. Prompt order and every sample are functions of
(seed, iteration), so resuming from a checkpoint continues exactly where the run stopped, and the
same batch split over several processes computes the same update.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator

from rft_core.checkpoint import (
    hash_of,
    load_optimizer_states,
    load_state,
    resumable_checkpoint,
    run_settings,
    save_checkpoint,
)
from rft_core.config import RFTConfig
from rft_core.evaluate import decode, eos_ids, evaluate, item_records, prompt_token_ids
from rft_core.generation import row_seeds
from rft_core.graders import grade_batch
from rft_core.models import (
    add_lora,
    load_model,
    load_tokenizer,
    merge_lora,
    pick_device,
    pick_dtype,
    save_model,
)
from rft_core.rl.grpo import grpo_advantages
from rft_core.rl.losses import ppo_losses
from rft_core.rl.ppo import ppo_advantages
from rft_core.rl.rollout import PolicyWithValue, Rollout, pack, sample_rollout, score_tokens
from rft_core.sft import StageResult, make_accelerator, selection_key, step_positions

logger = logging.getLogger("rft.rl")

LogFn = Callable[[dict[str, float], int], None]

# Fields that change how long a run is, what it reports or how work is batched, not what an
# iteration computes: a resumed run may change them (e.g. run more iterations).
_RL_RUN_LENGTH_FIELDS = {
    "enabled", "iterations", "eval_interval", "checkpoint_interval", "keep_best",
    "generation_batch_size", "micro_batch_size",
}


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
        accelerator: Accelerator | None = None,
    ):
        self.cfg, self.rl = cfg, cfg.rl
        self.train, self.val = train.reset_index(drop=True), val
        self.init_model = str(init_model)
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.grader, self.log = grader, log
        device = pick_device(cfg.model.device)
        self.dtype = pick_dtype(cfg.model.dtype, device)
        self.accelerator = accelerator or make_accelerator(device, self.dtype)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if self.rl.prompts_per_iteration % self.world:
            raise ValueError(
                f"rl.prompts_per_iteration ({self.rl.prompts_per_iteration}) must divide over "
                f"{self.world} processes"
            )
        rows_local = self.rl.prompts_per_iteration * self.rl.samples_per_prompt // self.world
        k = self.rl.samples_per_prompt
        # Rows of one prompt stay together (minibatches hold whole groups) so that the prompt can
        # run once per group; gradient checkpointing cannot reuse a cache, so it turns this off.
        self.group = k if (self.rl.shared_prompt_forward and k > 1 and not cfg.model.gradient_checkpointing) else 1
        wanted = min(rows_local, self.rl.minibatch_size // self.world)
        self.minibatch_local = max(self.group, wanted // self.group * self.group)
        if self.rl.algorithm == "grpo" and self.rl.samples_per_prompt < 2:
            raise ValueError("GRPO needs rl.samples_per_prompt >= 2 (it compares samples of a prompt)")

        self.tokenizer = load_tokenizer(self.init_model, cfg.model)
        self.prompts = prompt_token_ids(self.train, self.tokenizer, cfg, self.rl.max_prompt_length)
        self.items = item_records(self.train)
        self.eos = eos_ids(self.tokenizer)

        identity = run_settings(
            self.rl, ignore=_RL_RUN_LENGTH_FIELDS, start_model=self.init_model,
            lora=cfg.model.lora.model_dump(mode="json"), items=hash_of(self.prompts, list(self.train["reference"])),
        )
        resume_from = resumable_checkpoint(self.ckpt_root, identity, "rl.")
        policy = self._build_policy(resume_from)
        self.module = PolicyWithValue(policy, with_value_head=self.rl.algorithm == "ppo").to(self.accelerator.device)
        self.reference = None
        if not cfg.model.lora.enabled and self._needs_reference():
            self.reference = load_model(self.init_model, cfg.model, device=self.accelerator.device, dtype=self.dtype)
            self.reference.eval().requires_grad_(False)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.rl.lr, eps=1e-5, weight_decay=0.0)
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
            extra = load_optimizer_states(resume_from, self.optimizer, self.scheduler)
            if self.module.value_head is not None and "value_head.weight" in extra:
                self.module.value_head.load_state_dict(
                    {"weight": extra["value_head.weight"], "bias": extra["value_head.bias"]}
                )
            self.state = load_state(resume_from)
            self.start_iteration = self.state.pop("step")
            logger.info("resuming RL from %s (iteration %d)", resume_from, self.start_iteration)
        self.state["settings"] = identity
        self.model, self.optimizer = self.accelerator.prepare(self.module, self.optimizer)
        self.model.eval()  # no dropout anywhere in RL: sampling, scoring and updates see one policy

    # ------------------------------------------------------------------ set-up

    def _needs_reference(self) -> bool:
        return self.rl.kl_coef > 0

    def _build_policy(self, checkpoint: Path | None) -> torch.nn.Module:
        device = self.accelerator.device
        if self.cfg.model.lora.enabled:
            base = load_model(self.init_model, self.cfg.model, device=device, dtype=self.dtype)
            if checkpoint is not None:
                from peft import PeftModel

                return PeftModel.from_pretrained(base, str(checkpoint / "model"), is_trainable=True)
            return add_lora(base, self.cfg.model)
        source = checkpoint / "model" if checkpoint is not None else self.init_model
        return load_model(source, self.cfg.model, device=device, dtype=self.dtype)

    @property
    def policy(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model).policy

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum").cpu()

    def _reference_logprobs(self, input_ids, attention_mask, length) -> torch.Tensor | None:
        if not self._needs_reference():
            return None
        if self.reference is not None:
            return score_tokens(
                self.reference, input_ids, attention_mask, length, self.rl.temperature, None, self.group, with_entropy=False
            )[0]
        with self.policy.disable_adapter():
            return score_tokens(
                self.policy, input_ids, attention_mask, length, self.rl.temperature, None, self.group, with_entropy=False
            )[0]

    # ------------------------------------------------------------------ one iteration

    def iteration_prompts(self, iteration: int) -> list[int]:
        """This process's share of the iteration's training items."""
        positions = step_positions(iteration, self.rl.prompts_per_iteration, len(self.prompts), self.rl.seed)
        share = self.rl.prompts_per_iteration // self.world
        return positions[self.rank * share : (self.rank + 1) * share]

    @torch.no_grad()
    def rollout(self, iteration: int, timings: dict[str, float]) -> Rollout:
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
        )
        t1 = time.perf_counter()
        texts = [decode(self.tokenizer, c) for c in completions]
        results = grade_batch(self.grader, texts, [self.items[i] for i in item_idx], workers=self.cfg.grader.workers)
        graded = torch.tensor([r.reward is not None for r in results])
        scores = torch.tensor([r.reward if r.reward is not None else 0.0 for r in results], dtype=torch.float32)
        t2 = time.perf_counter()
        input_ids, attention_mask, response_mask = pack(prompts, completions, self.tokenizer.pad_token_id)
        response_mask = response_mask * graded[:, None]
        batch = Rollout(input_ids, attention_mask, response_mask, item_idx, texts, scores, graded, stopped)
        logprobs, values, entropy, ref = [], [], [], []
        device = self.accelerator.device
        for start in range(0, len(prompts), self.minibatch_local):
            sl = slice(start, start + self.minibatch_local)
            ids, am = input_ids[sl].to(device), attention_mask[sl].to(device)
            lp, v, ent = self.accelerator.unwrap_model(self.model)(
                ids, am, batch.response_length, self.rl.temperature, self.group
            )
            logprobs.append(lp.cpu())
            entropy.append(ent.cpu())
            if v is not None:
                values.append(v.cpu())
            r = self._reference_logprobs(ids, am, batch.response_length)
            if r is not None:
                ref.append(r.cpu())
        batch.logprobs, batch.entropy = torch.cat(logprobs), torch.cat(entropy)
        batch.values = torch.cat(values) if values else None
        batch.ref_logprobs = torch.cat(ref) if ref else None
        t3 = time.perf_counter()
        timings.update(generate=t1 - t0, grade=t2 - t1, score=t3 - t2)
        timings["generated_tokens"] = float(sum(len(c) for c in completions))
        return batch

    def update(self, batch: Rollout, iteration: int, timings: dict[str, float]) -> dict[str, float]:
        rl = self.rl
        mask = batch.response_mask
        stats: dict[str, float] = {}
        if rl.algorithm == "ppo":
            advantages, returns, kl = ppo_advantages(
                batch.scores, batch.logprobs, batch.ref_logprobs, batch.values, mask, rl, self._reduce
            )
        else:
            advantages, zero_std = grpo_advantages(batch.scores, batch.graded, mask, rl)
            returns = None
            kl = (batch.logprobs - batch.ref_logprobs) * mask if batch.ref_logprobs is not None else torch.zeros_like(mask)
            stats["zero_std_groups"] = float(self._reduce(torch.tensor([zero_std])).item()) / self.world
        stats["kl"] = float(self._reduce(kl.sum().reshape(1).double()).item()) / max(
            1.0, float(self._reduce(torch.tensor([float(len(kl))])).item())
        )

        t0 = time.perf_counter()
        device = self.accelerator.device
        n_rows = len(mask)
        sums = {"pg_loss": 0.0, "vf_loss": 0.0, "kl_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "vf_clipfrac": 0.0}
        updates, processed_tokens = 0, 0
        micro = rl.micro_batch_size // self.world if rl.micro_batch_size else self.minibatch_local
        micro = max(self.group, min(micro, self.minibatch_local) // self.group * self.group)
        for epoch in range(rl.ppo_epochs):
            g = torch.Generator().manual_seed((rl.seed * 1_000_003 + iteration) * 101 + epoch)
            groups = torch.randperm(n_rows // self.group, generator=g)
            order = (groups[:, None] * self.group + torch.arange(self.group)).reshape(-1)
            for start in range(0, n_rows, self.minibatch_local):
                rows = order[start : start + self.minibatch_local]
                normaliser = float(self._reduce(mask[rows].sum().reshape(1).double()).item())
                if normaliser == 0:
                    continue
                parts = [rows[i : i + micro] for i in range(0, len(rows), micro)]
                part_stats = {key: 0.0 for key in sums}
                for j, part in enumerate(parts):
                    sync = j == len(parts) - 1
                    ctx = self.accelerator.no_sync(self.model) if (self.world > 1 and not sync) else contextlib.nullcontext()
                    with ctx:
                        out = self._minibatch_loss(batch, part, advantages, returns, normaliser, device)
                        # DDP averages gradients over processes; * world turns that into the sum the
                        # global normaliser expects.
                        self.accelerator.backward(out.loss * self.world)
                    for key in part_stats:
                        part_stats[key] += float(getattr(out, key).detach())
                    processed_tokens += int(batch.attention_mask[part].sum())
                self.accelerator.clip_grad_norm_(self.params, rl.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                reduced = self._reduce(torch.tensor([part_stats[key] for key in sums], dtype=torch.float64))
                for key, value in zip(sums, reduced.tolist(), strict=True):
                    sums[key] += value
                updates += 1
        timings["update"] = time.perf_counter() - t0
        timings["update_tokens"] = float(processed_tokens)
        for key, value in sums.items():
            if rl.algorithm == "grpo" and key in ("vf_loss", "vf_clipfrac"):
                continue
            if rl.algorithm == "ppo" and key == "kl_loss":
                continue
            stats[key] = value / max(1, updates)
        return stats

    def _minibatch_loss(self, batch: Rollout, rows, advantages, returns, normaliser, device):
        mask = batch.response_mask[rows]
        # Trim columns that are padding in every row of this minibatch: less compute, same result.
        resp_len = max(1, int(mask.sum(0).nonzero().max().item()) + 1) if mask.any() else 1
        am = batch.attention_mask[rows]
        prompt_width = batch.input_ids.shape[1] - batch.response_length
        first = int((am[:, :prompt_width].sum(0) > 0).nonzero().min().item()) if am[:, :prompt_width].any() else 0
        end = prompt_width + resp_len
        ids = batch.input_ids[rows, first:end].to(device)
        am = am[:, first:end].to(device)
        logprobs, values, _ = self.model(ids, am, resp_len, self.rl.temperature, self.group, with_entropy=False)
        cut = slice(0, resp_len)
        kwargs: dict[str, Any] = {}
        if self.rl.algorithm == "ppo":
            kwargs.update(
                values=values, old_values=batch.values[rows, cut].to(device),
                returns=returns[rows, cut].to(device), vf_clip_range=self.rl.vf_clip_range,
                vf_coef=self.rl.vf_coef,
            )
        elif batch.ref_logprobs is not None:
            kwargs.update(ref_logprobs=batch.ref_logprobs[rows, cut].to(device), kl_coef=self.rl.kl_coef)
        return ppo_losses(
            logprobs, batch.logprobs[rows, cut].to(device), advantages[rows, cut].to(device),
            mask[:, cut].to(device), clip_range=self.rl.clip_range, normaliser=normaliser, **kwargs,
        )

    def rollout_stats(self, batch: Rollout, timings: dict[str, float]) -> dict[str, float]:
        graded = batch.graded
        reward_sum = float((batch.scores * graded).sum())
        correct = float(((batch.scores >= self.cfg.eval.pass_threshold) & graded).sum())
        lengths = batch.attention_mask[:, -batch.response_length :].sum(1).float()
        mask = batch.response_mask
        totals = self._reduce(
            torch.tensor(
                [reward_sum, float(graded.sum()), correct, float(len(graded)), float(lengths.sum()),
                 float((~graded).sum()), float((batch.entropy * mask).sum()), float(mask.sum()),
                 timings["generated_tokens"], float(sum(batch.stopped))],
                dtype=torch.float64,
            )
        ).tolist()
        reward, n_graded, correct, rows, length, errors, ent, tokens, generated, stopped = totals
        return {
            "reward_mean": reward / max(1.0, n_graded),
            "accuracy": correct / max(1.0, rows),
            "response_length": length / max(1.0, rows),
            "grader_errors": errors,
            "entropy": ent / max(1.0, tokens),
            "stop_rate": stopped / max(1.0, rows),
            "rollout_tokens_per_s": generated / max(1e-9, timings["generate"]),
        }

    # ------------------------------------------------------------------ the loop

    def validate(self, iteration: int) -> dict[str, float]:
        report = evaluate(self.policy, self.tokenizer, self.val, self.grader, self.cfg, k=0, accelerator=self.accelerator)
        metrics = {f"val_{k}": report.metrics[k] for k in ("accuracy", "reward_mean", "grader_errors")}
        self.state["history"].append({"step": iteration, **metrics})
        best = self.state.get("best")
        rank = selection_key(metrics)
        if self.rl.keep_best and (best is None or rank > tuple(best)):
            self.state["best"], self.state["best_iteration"] = list(rank), iteration
            if self.accelerator.is_main_process:
                best_dir = self.out_dir / "best"
                shutil.rmtree(best_dir, ignore_errors=True)
                self.policy.save_pretrained(str(best_dir), safe_serialization=True)
            self.accelerator.wait_for_everyone()
        return metrics

    def checkpoint(self, iteration: int) -> None:
        if self.accelerator.is_main_process:
            extra = None
            head = self.accelerator.unwrap_model(self.model).value_head
            if head is not None:
                extra = {f"value_head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
            save_checkpoint(
                self.ckpt_root, iteration, model=self.policy, tokenizer=self.tokenizer,
                optimizer=self.optimizer, scheduler=self.scheduler, state=self.state, extra=extra,
            )
        self.accelerator.wait_for_everyone()

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

    def run(self) -> StageResult:
        rl = self.rl
        if self.start_iteration == 0 and rl.eval_interval:
            self._log(self.validate(0), 0)
        for iteration in range(self.start_iteration, rl.iterations):
            timings: dict[str, float] = {}
            started = time.perf_counter()
            self._set_iteration_lr(iteration)
            batch = self.rollout(iteration, timings)
            stats = self.rollout_stats(batch, timings)
            stats.update(self.update(batch, iteration, timings))
            done = iteration + 1
            stats["lr"] = self.scheduler.get_last_lr()[0]
            stats["update_tokens_per_s"] = self._reduce(torch.tensor([timings["update_tokens"]])).item() / max(
                1e-9, timings["update"]
            )
            for key in ("generate", "grade", "score", "update"):
                stats[f"time_{key}"] = timings[key]
            stats["time_iteration"] = time.perf_counter() - started
            if (rl.eval_interval and done % rl.eval_interval == 0) or done == rl.iterations:
                stats.update(self.validate(done))
            self._log(stats, done)
            logger.info(
                "iteration %d/%d reward %.3f acc %.3f kl %.4f%s", done, rl.iterations, stats["reward_mean"],
                stats["accuracy"], stats["kl"],
                f" val_acc {stats['val_accuracy']:.3f}" if "val_accuracy" in stats else "",
            )
            if (rl.checkpoint_interval and done % rl.checkpoint_interval == 0) or done == rl.iterations:
                self.checkpoint(done)
        return self.finish()

    def finish(self) -> StageResult:
        policy = self.policy
        history = self.state["history"]
        chosen = history[-1] if history else {}
        best_iteration = self.state.get("best_iteration")
        if self.rl.keep_best and best_iteration is not None and best_iteration != self.rl.iterations:
            from rft_core.sft import _load_weights_from

            policy = _load_weights_from(policy, self.out_dir / "best")
            chosen = next(h for h in history if h["step"] == best_iteration)
        model_dir = self.out_dir / "model"
        if self.accelerator.is_main_process:
            save_model(merge_lora(policy), self.tokenizer, model_dir)
            head = self.accelerator.unwrap_model(self.model).value_head
            if head is not None:
                torch.save(head.state_dict(), self.out_dir / "value_head.pt")
            (self.out_dir / "result.json").write_text(json.dumps({"metrics": chosen, "history": history}, indent=1))
        self.accelerator.wait_for_everyone()
        return StageResult(str(model_dir), {k: float(v) for k, v in chosen.items()}, history)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.log and self.accelerator.is_main_process:
            self.log(metrics, step)


def run_rl(
    cfg: RFTConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    init_model: str | Path,
    out_dir: str | Path,
    *,
    log: LogFn | None = None,
    grader: Any | None = None,
    accelerator: Accelerator | None = None,
) -> StageResult:
    """RL (PPO or GRPO, from `cfg.rl`) starting from `init_model`; the result is a full model."""
    from rft_core.graders import build_grader

    own = grader is None
    if own:
        grader = build_grader(cfg.grader.resolved_spec(), timeout_s=cfg.grader.timeout_s, memory_mb=cfg.grader.memory_mb)
    try:
        trainer = RLTrainer(cfg, train, val, init_model, out_dir, grader=grader, log=log, accelerator=accelerator)
        return trainer.run()
    finally:
        if own and hasattr(grader, "close"):
            grader.close()
