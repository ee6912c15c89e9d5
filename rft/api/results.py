"""What a job has done so far, read from the tracking store and the job's directory: metrics events,
checkpoints, the results CSV, trained tokens.

Each run of a job (the first, and each resume) is an MLflow parent run named after the job; its
stage child runs hold the step metrics. Step metrics become `type: "metrics"` events with the
figures OpenAI's dashboards show (`train_loss`, `valid_loss`, `train_reward_mean`,
`valid_reward_mean`) plus rft's (`kl`, accuracies, ...), once per step (`Store.add_event` with a
key), so polling never repeats one. A step is published when a later step exists or its run ended:
SFT logs a step's validation after its training figures.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

from rft.api.catalog import (
    TRAINING_STAGE,
    checkpoint_created,
    checkpoint_dirs,
    checkpoint_id,
    checkpoint_name,
)
from rft.api.settings import ServerSettings
from rft.api.store import Job, Store

logger = logging.getLogger("rft.api")

# rft metric (without the stage prefix) -> the field of a metrics event / checkpoint. OpenAI's
# names where it has them (`train_loss`, `valid_loss`, reward means), rft's otherwise.
FIELDS: dict[str, dict[str, str]] = {
    "sft": {
        "loss": "train_loss",
        "val_loss": "valid_loss",
        "val_accuracy": "valid_accuracy",
        "val_reward_mean": "valid_reward_mean",
        "val_sampled_reward": "valid_sampled_reward_mean",
        "lr": "learning_rate",
    },
    "rl": {
        "reward_mean": "train_reward_mean",
        "accuracy": "train_accuracy",
        "kl": "kl",
        "entropy": "entropy",
        "pg_loss": "pg_loss",
        "vf_loss": "vf_loss",
        "response_length": "response_length",
        "grader_errors": "train_grader_errors",
        "val_sampled_reward": "valid_reward_mean",
        "val_reward_mean": "valid_greedy_reward_mean",
        "val_accuracy": "valid_accuracy",
        "lr": "learning_rate",
    },
}
CSV_COLUMNS = ("step", "train_loss", "valid_loss", "train_reward_mean", "valid_reward_mean", "valid_accuracy",
               "train_accuracy", "kl", "learning_rate")


def _client(settings: ServerSettings):
    from rft_core.tracking.uri import mlflow_client

    return mlflow_client(settings.tracking_uri)  # through configure: the store's schema made once


def job_pipeline_runs(client: Any, experiment_id: str, job_id: str) -> list[Any]:
    """The pipeline (parent) runs of a job, newest first: those started under its name (tag
    `rft.run_name`: a rerun's name gets a suffix at its end, ` (rerun, reused validate, ...)`), and
    those of stores written before that tag that still carry the name itself."""
    from rft_core.tracking.tags import TAG_STARTED_AS

    found: dict[str, Any] = {}
    for query in (f"tags.`{TAG_STARTED_AS}` = '{job_id}'", f"tags.`mlflow.runName` = '{job_id}'"):
        for run in client.search_runs([experiment_id], query, max_results=1000):
            found.setdefault(run.info.run_id, run)
    return sorted(found.values(), key=lambda run: run.info.start_time or 0, reverse=True)


def training_runs(settings: ServerSettings, job: Job) -> list[Any]:
    """The job's training-stage child runs, oldest first (one per run of the job that reached it)."""
    experiment = job.data.get("experiment")
    stage = TRAINING_STAGE.get(job.data.get("method_type", ""), "rl")
    if not experiment:
        return []
    client = _client(settings)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    parents = job_pipeline_runs(client, found.experiment_id, job.id)
    runs = []
    for parent in parents:
        runs += client.search_runs(
            [found.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`mlflow.runName` = '{stage}'",
        )
    return sorted(runs, key=lambda run: run.info.start_time or 0)


def step_metrics(settings: ServerSettings, job: Job) -> tuple[dict[int, dict[str, Any]], dict[int, int], bool]:
    """(step -> event data, step -> unix time it was logged, whether the last run has ended).
    A step logged by several runs (a resumed job repeats the steps after its checkpoint) keeps the
    later run's figures."""
    stage = TRAINING_STAGE.get(job.data.get("method_type", ""), "rl")
    client = _client(settings)
    steps: dict[int, dict[str, Any]] = {}
    times: dict[int, int] = {}
    ended = False
    for run in training_runs(settings, job):
        ended = run.info.status != "RUNNING"
        for key, name in FIELDS[stage].items():
            for metric in client.get_metric_history(run.info.run_id, f"{stage}/{key}"):
                if metric.step <= 0 and stage == "rl" and key not in ("val_accuracy", "val_sampled_reward", "val_reward_mean"):
                    continue
                data = steps.setdefault(metric.step, {"step": metric.step})
                data[name] = metric.value if math.isfinite(metric.value) else None
                times[metric.step] = max(times.get(metric.step, 0), metric.timestamp // 1000)
    return dict(sorted(steps.items())), times, ended


def _message(data: dict[str, Any], total: int | None) -> str:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in data.items() if k not in ("step", "total_steps") and isinstance(v, float))
    return f"Step {data['step']}/{total if total else '?'}: {shown}"


# Pauses between the final sync's tries (a store written by another process: sqlite's "database is
# locked" once its 5 s busy wait runs out).
FINAL_SYNC_DELAYS = (0.5, 1.0, 2.0, 4.0)


def sync_metric_events(settings: ServerSettings, store: Store, job: Job, final: bool = False) -> bool:
    """Publish the job's complete steps as metrics events (each once); False when the tracking store
    could not be read. A poll that cannot read it leaves it to the next poll; the final sync (the
    run has ended, its last step is complete) tries again after each of `FINAL_SYNC_DELAYS`."""
    delays = FINAL_SYNC_DELAYS if final else ()
    for attempt in range(len(delays) + 1):
        try:
            steps, times, ended = step_metrics(settings, job)
            break
        except Exception as exc:  # noqa: BLE001 (MLflow raises its own and sqlalchemy's errors)
            if attempt == len(delays):
                log = logger.warning if final else logger.debug
                log("the metrics of %s could not be read%s: %s", job.id, "" if final else " yet", exc)
                return False
            time.sleep(delays[attempt])
    total = job.data.get("total_steps")
    last = max(steps, default=0)
    published = store.event_keys(job.id, "metrics:")
    for step, data in steps.items():
        if f"metrics:{step}" in published or (step == last and not (ended or final)):
            continue
        data = {**data, "total_steps": total}
        store.add_event(job.id, _message(data, total), type="metrics", data=data, created_at=times[step],
                        key=f"metrics:{step}")
    return True


def settle_metric_events(settings: ServerSettings, store: Store, job: Job) -> None:
    """The final sync of a job whose run has ended. When the store cannot be read even so, the job
    says its metrics events are pending (`metrics_pending`) and the next listing of its events
    publishes them: a job that has ended never lacks its last steps for good."""
    synced = sync_metric_events(settings, store, job, final=True)
    job = store.get_job(job.id) or job
    if synced == bool(job.data.get("metrics_pending")):
        store.transition(job.id, None, metrics_pending=None if synced else True)


def checkpoint_objects(settings: ServerSettings, job: Job) -> list[dict[str, Any]]:
    """The job's checkpoints on disk as `fine_tuning.job.checkpoint` objects, newest first."""
    dirs = checkpoint_dirs(settings, job)
    if not dirs:
        return []
    try:
        steps, _, _ = step_metrics(settings, job)
    except Exception:
        steps = {}
    objects = []
    for step, path in sorted(dirs.items(), reverse=True):
        created = checkpoint_created(path)
        if created is None:
            continue  # pruned by the running job meanwhile
        metrics: dict[str, Any] = {"step": float(step), "train_loss": None, "valid_loss": None,
                                   "train_mean_token_accuracy": None, "valid_mean_token_accuracy": None,
                                   "full_valid_loss": None, "full_valid_mean_token_accuracy": None}
        metrics.update({k: v for k, v in steps.get(step, {}).items() if k != "step"})
        objects.append({
            "id": checkpoint_id(job.id, step),
            "object": "fine_tuning.job.checkpoint",
            "created_at": created,
            "fine_tuned_model_checkpoint": checkpoint_name(job.data["fine_tuned_name"], step),
            "fine_tuning_job_id": job.id,
            "metrics": metrics,
            "step_number": step,
        })
    return objects


def write_metrics_csv(settings: ServerSettings, job: Job, path: Path) -> Path:
    """The job's step metrics as a CSV (OpenAI's results file): one row per step."""
    steps, _, _ = step_metrics(settings, job)
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for data in steps.values():
            writer.writerow(["" if data.get(c) is None else data.get(c) for c in CSV_COLUMNS])
    return path


def trained_tokens(settings: ServerSettings, job: Job, cfg: Any) -> int:
    """Tokens the training stage trained on. Supervised: the tokens of the SFT examples drawn over
    the steps run (prompt and answer, as OpenAI counts a file's tokens times its epochs);
    reinforcement: the sampled completion tokens of every iteration (the tokens the policy loss
    is on)."""
    client = _client(settings)
    runs = training_runs(settings, job)
    if not runs:
        return 0
    if job.data.get("method_type") == "reinforcement":
        per_iteration = cfg.rl.prompts_per_iteration * cfg.rl.samples_per_prompt
        lengths: dict[int, float] = {}
        for run in runs:
            for metric in client.get_metric_history(run.info.run_id, "rl/response_length"):
                lengths[metric.step] = metric.value
        return int(round(sum(lengths.values()) * per_iteration))
    steps = {m.step for run in runs for m in client.get_metric_history(run.info.run_id, "sft/loss")}
    per_step = cfg.sft.batch_size * cfg.sft.grad_accum
    return int(len(steps) * per_step * job.data.get("mean_example_tokens", 0))
