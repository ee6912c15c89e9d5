"""Evaluation on a split: greedy accuracy, mean reward, pass@k, maj@k, grader errors, samples table.

A sample is correct when its grader reward is at least `eval.pass_threshold`. Grader errors are
counted and reported, and count as not correct; they are left out of the mean reward.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from rft_core.config import RFTConfig
from rft_core.generation import generate, row_seeds
from rft_core.models import decode, end_of_response, prompt_token_ids
from rft_core.progress import progress

# The graders, the guards and the training helpers are imported where evaluation uses them: the
# served model (rft_core.tracking.models) generates with `sample_completions` from this module,
# and a logged model carries only what generation needs (mlflow, torch, transformers).


@dataclass
class EvalReport:
    """Metrics (unprefixed: accuracy, reward_mean, ...) and a table of sampled completions."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the first grader error messages

    def check_grader_errors(self, limit: float, where: str) -> None:
        """Fail (`guards.GraderFailing`) when more than the share `limit` of the graded samples
        were grader errors."""
        from rft_core.guards import check_grader_errors

        share = self.metrics.get("grader_error_share", 0.0)
        graded = self.metrics.get("graded", 0.0)
        check_grader_errors(share * graded, graded, limit, where, self.errors)


def sample_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    keys: Sequence[int] | None = None,
    stop_ids: Sequence[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_tokens: Callable[[list[tuple[int, int, int]]], None] | None = None,
) -> list[list[list[int]]]:
    """Completions [prompt][sample] -> token ids, in batches; greedy when `seed` is None.
    `on_batch(n)` is told after each batch how many prompts it held; `on_tokens` is told at each
    generation step the new tokens as (prompt index, sample index, token id) (to stream them).

    `keys` are stable ids of the prompts (default: their positions) so that a prompt's samples
    depend on the prompt and the seed only. A completion ends on one of `stop_ids` (default:
    `end_of_response` of the tokenizer and the model with the default model section).
    """
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if stop_ids is None:
        stop_ids = end_of_response(tokenizer, None, model).stop_ids
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    # Sorting by length keeps padding (wasted compute) low; order is restored below.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    by_index: dict[int, list[list[int]]] = {}
    per_batch = max(1, batch_size // max(1, num_samples)) if seed is not None else batch_size
    for start in range(0, len(order), per_batch):
        chunk = order[start : start + per_batch]
        seeds = None
        if seed is not None:
            seeds = row_seeds(seed, [keys[i] * num_samples + s for i in chunk for s in range(num_samples)])
        n = num_samples if seed is not None else 1
        on_step = None
        if on_tokens is not None:
            def on_step(rows: list[int], tokens: list[int], chunk: list[int] = chunk, n: int = n) -> None:
                on_tokens([(chunk[row // n], row % n, token) for row, token in zip(rows, tokens, strict=True)])
        result = generate(
            model,
            [prompts[i] for i in chunk],
            eos_token_ids=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
            num_samples=num_samples if seed is not None else 1,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seeds=seeds,
            on_step=on_step,
        )
        for j, i in enumerate(chunk):
            by_index[i] = result.completions[j * n : (j + 1) * n]
        if on_batch is not None:
            on_batch(len(chunk))
    out = [by_index[i] for i in range(len(prompts))]
    model.train(was_training)
    return out


def _vote_key(text: str) -> str:
    from rft_core.graders.numeric import extract_answer, parse_number

    answer = extract_answer(text)
    if answer is None:
        return " ".join(text.lower().split())
    value = parse_number(answer)
    return f"{value:.9g}" if value is not None else answer


def pass_and_majority(
    texts: Sequence[Sequence[str]], rewards: Sequence[Sequence[float | None]], threshold: float
) -> tuple[float, float]:
    """pass@k (some sample correct) and maj@k (the most frequent final answer is correct).

    Answers are compared by their extracted final number when there is one, else by normalised
    text; a tie goes to the answer sampled first.

    >>> pass_and_majority([["#### 3", "#### 4", "#### 4"]], [[1.0, 0.0, 0.0]], 1.0)
    (1.0, 0.0)
    """
    pass_hits = maj_hits = 0
    for row_texts, row_rewards in zip(texts, rewards, strict=True):
        ok = [r is not None and r >= threshold for r in row_rewards]
        pass_hits += any(ok)
        keys = [_vote_key(t) for t in row_texts]
        votes = Counter(keys)
        winner = max(keys, key=votes.__getitem__)
        maj_hits += ok[keys.index(winner)]
    n = max(1, len(texts))
    return pass_hits / n, maj_hits / n


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    grader: Any,
    cfg: RFTConfig,
    *,
    k: int | None = None,
    sampled: bool = False,
    max_items: int | None = None,
    accelerator: Any | None = None,
    progress_task: str | None = None,
) -> EvalReport:
    """Greedy accuracy and mean reward on `frame`, plus pass@k and maj@k when k > 0.

    With k > 0, or `sampled`, also `sampled_reward_mean`: the mean reward of completions sampled at
    `eval.temperature` (the k samples, or one per item), the figure OpenAI's RFT dashboard plots.
    `progress_task` names the evaluation in the progress display (none: not shown).
    """
    from rft_core.graders import grade_batch
    from rft_core.training import item_records

    ev = cfg.eval
    k = ev.k if k is None else k
    n_sampled = k if k > 0 else int(sampled)
    limit = max_items if max_items is not None else ev.max_items
    if limit is not None:
        frame = frame.iloc[:limit]
    prompts = prompt_token_ids(frame, tokenizer, cfg.model, cfg.rl.max_prompt_length)
    stop_ids = end_of_response(tokenizer, cfg.model, model).stop_ids
    items = item_records(frame)
    indices = list(range(len(prompts)))
    rank, world = 0, 1
    if accelerator is not None and accelerator.num_processes > 1:
        rank, world = accelerator.process_index, accelerator.num_processes
    mine = indices[rank::world]

    passes = 1 + (n_sampled > 0)
    shown = progress(progress_task or "evaluate", passes * len(mine), "prompts", enabled=progress_task is not None and rank == 0)
    with shown as bar:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            bar.update(done[0])

        greedy = sample_completions(
            model, tokenizer, [prompts[i] for i in mine],
            num_samples=1, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, stop_ids=stop_ids,
            on_batch=advance,
        )
        samples_of: list[list[list[int]]] = [[] for _ in mine]
        if n_sampled > 0:
            samples_of = sample_completions(
                model, tokenizer, [prompts[i] for i in mine],
                num_samples=n_sampled, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                temperature=ev.temperature, top_k=ev.top_k, top_p=ev.top_p, min_p=ev.min_p,
                seed=ev.seed, keys=mine, stop_ids=stop_ids, on_batch=advance,
            )
    local = [(i, g[0], s) for i, g, s in zip(mine, greedy, samples_of, strict=True)]
    if world > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)
    local.sort(key=lambda row: row[0])
    greedy_texts = [decode(tokenizer, row[1]) for row in local]
    greedy_lengths = [len(row[1]) for row in local]

    results = grade_batch(grader, greedy_texts, items, workers=cfg.grader.workers)
    threshold = ev.pass_threshold
    correct = [r.reward is not None and r.reward >= threshold for r in results]
    rewards = [r.reward for r in results if r.reward is not None]
    n = max(1, len(results))
    metrics: dict[str, float] = {
        "accuracy": sum(correct) / n,
        "reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
        "grader_errors": float(sum(1 for r in results if r.reward is None)),
        "response_length": sum(greedy_lengths) / n,
        "items": float(len(results)),
    }
    graded = list(results)
    if n_sampled > 0:
        texts = [[decode(tokenizer, c) for c in row[2]] for row in local]
        flat_items = [items[i] for i, row in enumerate(texts) for _ in row]
        flat = grade_batch(grader, [t for row in texts for t in row], flat_items, workers=cfg.grader.workers)
        graded += flat
        sampled_rewards = [g.reward for g in flat if g.reward is not None]
        metrics["sampled_reward_mean"] = sum(sampled_rewards) / len(sampled_rewards) if sampled_rewards else 0.0
        metrics["grader_errors"] += sum(1 for g in flat if g.reward is None)
        if k > 0:
            rewards_per_item = [[g.reward for g in flat[i * k : (i + 1) * k]] for i in range(len(texts))]
            pass_at, maj_at = pass_and_majority(texts, rewards_per_item, threshold)
            # MLflow metric names cannot hold "@": pass@k is logged as pass_at_k.
            metrics[f"pass_at_{k}"], metrics[f"maj_at_{k}"] = pass_at, maj_at

    metrics["graded"] = float(len(graded))
    metrics["grader_error_share"] = metrics["grader_errors"] / max(1, len(graded))
    errors = [e for r in graded for e in r.errors][:5]
    samples = []
    for (_, row), text, result in list(zip(frame.iterrows(), greedy_texts, results, strict=True))[
        : ev.num_logged_samples
    ]:
        samples.append(
            {
                "id": str(row["id"]),
                "prompt": row["prompt"],
                "reference": row["reference"],
                "completion": text,
                "reward": result.reward,
                "error": "; ".join(result.errors),
            }
        )
    return EvalReport(metrics=metrics, samples=samples, errors=errors)


def validation_metrics(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    grader: Any,
    cfg: RFTConfig,
    accelerator: Any | None = None,
) -> dict[str, float]:
    """What training stages log and pick their best checkpoint by: greedy `val_accuracy`,
    `val_reward_mean` and `val_grader_errors` on `frame`, and (`eval.sampled_validation`)
    `val_sampled_reward`, the mean reward of one completion per item sampled at `eval.temperature`."""
    sampled = cfg.eval.sampled_validation
    report = evaluate(model, tokenizer, frame, grader, cfg, k=0, sampled=sampled, accelerator=accelerator)
    report.check_grader_errors(cfg.grader.max_error_share, "validation")
    metrics = {f"val_{key}": report.metrics[key] for key in ("accuracy", "reward_mean", "grader_errors")}
    if sampled:
        metrics["val_sampled_reward"] = report.metrics["sampled_reward_mean"]
    return metrics
