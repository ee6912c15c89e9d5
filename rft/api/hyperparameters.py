"""OpenAI's fine-tuning hyperparameters mapped onto rft's config: the one table.

`"auto"` (or leaving a hyperparameter out) keeps the value of the server's base config for it
(`rft api --config`: rft's defaults when none is given, which suit the built-in tiny model; an
operator serving a hub model gives the settings for that model size there). The values a job runs
with are written back on the job object, as OpenAI does.

| method | OpenAI hyperparameter | rft config | written back |
|---|---|---|---|
| supervised | `n_epochs` | `sft.epochs` (and `sft.max_steps` cleared) | the epochs (auto: `sft.epochs`, or the epochs `sft.max_steps` makes, rounded up) |
| supervised | `batch_size` | `sft.batch_size` (`sft.grad_accum` 1) | sequences per optimizer step |
| supervised | `learning_rate_multiplier` | `sft.lr` = base `sft.lr` x multiplier | the multiplier (auto: 1.0) |
| reinforcement | `n_epochs` | `rl.iterations` = ceil(n_epochs x training prompts / `rl.prompts_per_iteration`) | passes over the training prompts started (auto: from `rl.iterations`, rounded up) |
| reinforcement | `batch_size` | `rl.prompts_per_iteration` (prompts per iteration; `rl.minibatch_size` at most the iteration's samples) | prompts per iteration |
| reinforcement | `learning_rate_multiplier` | `rl.lr` = base `rl.lr` x multiplier | the multiplier (auto: 1.0) |
| reinforcement | `eval_interval` | `rl.eval_interval` (iterations between validations) | iterations |
| reinforcement | `eval_samples` | `eval.k` (samples per validation item in the final evaluation: pass@k, maj@k; validation during training stays greedy plus one sample per item) | samples |
| reinforcement | `compute_multiplier` | `rl.samples_per_prompt` = max(2, round(base x multiplier)) (exploration: samples per prompt) | the multiplier (auto: 1.0) |
| reinforcement | `reasoning_effort` | `rl.max_new_tokens` and `eval.max_new_tokens`: low x0.5, medium x1, high x2 of the base (`default`: the base) | the effort |
| both | `seed` | `seed`, `sft.seed`, `rl.seed` (the split keeps `data.seed`) | the seed (absent: the base config's `seed`) |
| both | `validation_file` | `data.val_path` (absent: rft's leakage-checked split of the training file, `data.val_fraction`) | |

A supervised job runs SFT alone (`rl.enabled=false`); a reinforcement job runs RL alone from `model`
(`sft.enabled=false`, `model.name_or_path` the resolved model), with the job's grader
(`grader.spec`). The top-level `hyperparameters` (deprecated by OpenAI) are the supervised ones.
"""

from __future__ import annotations

import math
from typing import Any

SUPERVISED_KEYS = ("batch_size", "learning_rate_multiplier", "n_epochs")
REINFORCEMENT_KEYS = (
    "batch_size", "compute_multiplier", "eval_interval", "eval_samples", "learning_rate_multiplier", "n_epochs",
    "reasoning_effort",
)
EFFORT_SCALE = {"low": 0.5, "medium": 1.0, "high": 2.0}


def given(hp: dict[str, Any], key: str) -> Any:
    """The value set for `key`, or None for auto / absent."""
    value = hp.get(key)
    return None if value in (None, "auto", "default") else value


def supervised_settings(
    base: dict[str, Any], hp: dict[str, Any], n_sft_examples: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`section.key` -> value overrides, the hyperparameters written back) of a supervised job."""
    sft = base["sft"]
    overrides: dict[str, Any] = {"rl.enabled": False, "sft.enabled": True}
    batch = given(hp, "batch_size")
    if batch is not None:
        overrides.update({"sft.batch_size": int(batch), "sft.grad_accum": 1})
    global_batch = int(batch) if batch is not None else sft["batch_size"] * sft["grad_accum"]
    multiplier = given(hp, "learning_rate_multiplier")
    if multiplier is not None:
        overrides["sft.lr"] = sft["lr"] * float(multiplier)
    epochs = given(hp, "n_epochs")
    if epochs is not None:
        overrides.update({"sft.epochs": float(epochs), "sft.max_steps": None})
        used_epochs = int(epochs)
    elif sft.get("max_steps"):
        used_epochs = math.ceil(sft["max_steps"] * global_batch / max(1, n_sft_examples))
    else:
        used_epochs = math.ceil(sft["epochs"])
    written = {
        "batch_size": global_batch,
        "learning_rate_multiplier": float(multiplier) if multiplier is not None else 1.0,
        "n_epochs": used_epochs,
    }
    return overrides, written


def reinforcement_settings(
    base: dict[str, Any], hp: dict[str, Any], n_train: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`section.key` -> value overrides, the hyperparameters written back) of a reinforcement job."""
    rl, ev = base["rl"], base["eval"]
    overrides: dict[str, Any] = {"sft.enabled": False, "rl.enabled": True}
    prompts = given(hp, "batch_size")
    if prompts is not None:
        overrides["rl.prompts_per_iteration"] = int(prompts)
    prompts = int(prompts) if prompts is not None else rl["prompts_per_iteration"]
    multiplier = given(hp, "learning_rate_multiplier")
    if multiplier is not None:
        overrides["rl.lr"] = rl["lr"] * float(multiplier)
    compute = given(hp, "compute_multiplier")
    samples = rl["samples_per_prompt"]
    if compute is not None:
        samples = max(2, round(rl["samples_per_prompt"] * float(compute)))
        overrides["rl.samples_per_prompt"] = samples
    if prompts * samples < rl["minibatch_size"]:
        overrides["rl.minibatch_size"] = prompts * samples
    epochs = given(hp, "n_epochs")
    if epochs is not None:
        iterations = max(1, math.ceil(int(epochs) * n_train / prompts))
        overrides["rl.iterations"] = iterations
        used_epochs = int(epochs)
    else:
        iterations = rl["iterations"]
        used_epochs = max(1, math.ceil(iterations * prompts / max(1, n_train)))
    if rl["algorithm"] == "ppo" and rl["critic_warmup"] >= iterations:
        # The base config's critic warm-up would leave no policy iteration in so short a job.
        overrides["rl.critic_warmup"] = max(0, iterations // 3)
    interval = given(hp, "eval_interval")
    if interval is not None:
        overrides["rl.eval_interval"] = int(interval)
    eval_samples = given(hp, "eval_samples")
    if eval_samples is not None:
        overrides["eval.k"] = int(eval_samples)
    effort = hp.get("reasoning_effort") or "default"
    if effort in EFFORT_SCALE:
        overrides["rl.max_new_tokens"] = max(1, round(rl["max_new_tokens"] * EFFORT_SCALE[effort]))
        overrides["eval.max_new_tokens"] = max(1, round(ev["max_new_tokens"] * EFFORT_SCALE[effort]))
    written = {
        "batch_size": prompts,
        "compute_multiplier": float(compute) if compute is not None else 1.0,
        "eval_interval": int(interval) if interval is not None else rl["eval_interval"],
        "eval_samples": int(eval_samples) if eval_samples is not None else ev["k"],
        "learning_rate_multiplier": float(multiplier) if multiplier is not None else 1.0,
        "n_epochs": used_epochs,
        "reasoning_effort": effort,
    }
    return overrides, written


def seed_settings(seed: int) -> dict[str, Any]:
    return {"seed": seed, "sft.seed": seed, "rl.seed": seed}


def apply(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with `section.key` overrides set."""
    import copy

    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return result
