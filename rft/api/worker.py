"""A job's worker process: runs the pipeline flow on the job's config, as `rft run` does, and
records the outcome on the job (`python -m rft.api.worker --data-dir D --job-id J`).

The outcome is written by compare-and-set from `running` only: a job the server paused or
cancelled meanwhile keeps that status, whatever the stopped flow raised. On success the job gets
its `fine_tuned_model` (backed by the registered MLflow version the flow created), the results
CSV as a file, `trained_tokens` and `finished_at`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any

from rft.api import results
from rft.api.files import add_result_file
from rft.api.runner import RESUMABLE_NOTE, read_config
from rft.api.settings import ServerSettings
from rft.api.store import Job, Store, now

logger = logging.getLogger("rft.api.worker")


class _State:
    """What `add_result_file` needs: the settings and the store."""

    def __init__(self, settings: ServerSettings, store: Store) -> None:
        self.settings, self.store = settings, store


def mean_example_tokens(cfg: Any, model_dir: str, split_train: str) -> float:
    """Mean tokens of a training example (rendered prompt + answer) of a supervised job."""
    from rft_core.data import read_items
    from rft_core.models import load_tokenizer, row_prompt_ids

    tokenizer = load_tokenizer(model_dir, cfg.model)
    frame = read_items(split_train)
    counts = [
        len(row_prompt_ids(tokenizer, cfg.model, row)) + len(tokenizer(row["solution"], add_special_tokens=False)["input_ids"]) + 1
        for _, row in frame.iterrows() if isinstance(row.get("solution"), str) and row["solution"].strip()
    ]
    return sum(counts) / len(counts) if counts else 0.0


def finish(settings: ServerSettings, store: Store, job: Job, cfg: Any, summary: dict[str, Any]) -> None:
    """Record a succeeded job: model, results file, tokens, events."""
    registered = summary.get("registered")
    result = {
        "model_dir": summary["model_dir"],
        "registered": registered,
        "mlflow_run_id": summary["mlflow_run_id"],
        "metrics": summary["metrics"],
        "gate": summary.get("gate"),
    }
    if job.data.get("method_type") == "supervised":
        split_train = next(iter(sorted(Path(cfg.output_dir, "stages").glob("split-*/train.parquet"))), None)
        if split_train is not None:
            tokens = mean_example_tokens(cfg, summary["model_dir"], str(split_train))
            job = store.transition(job.id, None, mean_example_tokens=tokens) or job
    results.settle_metric_events(settings, store, job)
    csv_path = results.write_metrics_csv(settings, job, settings.files_dir / f".{job.id}.csv.partial")
    result_file = add_result_file(_State(settings, store), csv_path, f"{job.id}_results.csv")
    tokens = results.trained_tokens(settings, job, cfg)
    done = store.transition(
        job.id, ("running",), "succeeded", result=result, fine_tuned_model=job.data["fine_tuned_name"],
        result_files=[result_file["id"]], trained_tokens=tokens, finished_at=now(),
    )
    if done:
        store.add_event(job.id, f"New fine-tuned model created: {job.data['fine_tuned_name']}"
                        + (f" (MLflow {registered['name']} version {registered['version']})" if registered else ""))
        store.add_event(job.id, "The job has successfully completed")


def finish_from_tracking(settings: ServerSettings, store: Store, job: Job) -> None:
    """Record a job whose pipeline ran elsewhere (a run of the Prefect deployment): its summary read
    back from the MLflow parent run started under the job's name and from the job's stage directories."""
    from rft_core.tracking import tags
    from rft_core.tracking.uri import mlflow_client

    cfg = read_config(settings, job.id)
    client = mlflow_client(settings.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    runs = results.job_pipeline_runs(client, experiment.experiment_id, job.id) if experiment else []
    parent = next((run for run in runs if run.info.status == "FINISHED"), None)
    if parent is None:
        raise RuntimeError(f"no finished MLflow run of {job.id} in experiment {cfg.experiment}")
    stage = "sft" if job.data.get("method_type") == "supervised" else "rl"
    models = sorted(Path(cfg.output_dir, "stages").glob(f"{stage}-*/model"), key=lambda p: p.stat().st_mtime)
    if not models:
        raise RuntimeError(f"no {stage} model under {cfg.output_dir}/stages")
    version = parent.data.tags.get(tags.TAG_REGISTERED_VERSION)
    metrics = {key.removeprefix("eval/"): value for key, value in parent.data.metrics.items()
               if key.startswith("eval/") and key.count("/") == 1}
    summary = {
        "model_dir": str(models[-1]),
        "registered": {"name": cfg.registry.model_name, "version": int(version)} if version else None,
        "mlflow_run_id": parent.info.run_id,
        "metrics": {stage: metrics},
        "gate": {"decision": parent.data.tags.get(tags.GATE_DECISION), "reason": parent.data.tags.get(tags.GATE_REASON)},
    }
    finish(settings, store, job, cfg, summary)


EXIT_STOPPED = 130  # as `rft run` exits when stopped
RESUMABLE_CODES = ("interrupted", "orchestrator_unavailable")


def fail(store: Store, job_id: str, code: str, message: str) -> None:
    """Record a failure, unless the server changed the job's status meanwhile (paused, cancelled)."""
    if store.transition(job_id, ("running",), "failed", error={"code": code, "message": message, "param": None},
                        finished_at=now(), resumable=True if code in RESUMABLE_CODES else None):
        store.add_event(job_id, message, level="error")


def run(settings: ServerSettings, job_id: str) -> int:
    from rft.run import _quiet_libraries

    store = Store(settings.db_path)
    # Recorded here too, not only by the server that started it: a server killed right after the
    # start still finds this worker on restart.
    job = store.transition(job_id, ("running",), pid=os.getpid())
    if job is None:
        return 0  # cancelled or paused before it started
    _quiet_libraries()
    cfg = read_config(settings, job_id)
    from flows.pipeline import rft_pipeline
    from flows.server import ServerError, prefect_api
    from rft_core.lifecycle import stop_on_signals

    # As `rft run` runs it: SIGTERM/SIGINT (pause, cancel) stop training at its next step with a
    # checkpoint and end the MLflow runs KILLED; the Prefect API is PREFECT_API_URL's, else a
    # temporary server this process owns.
    try:
        with stop_on_signals(), prefect_api():
            summary = rft_pipeline(config=cfg)
    except KeyboardInterrupt as exc:  # a stop request (TrainingStopped) or an interrupt
        fail(store, job_id, "interrupted", f"The job's run was stopped ({exc}); {RESUMABLE_NOTE.format(id=job_id)}.")
        return EXIT_STOPPED
    except ServerError as exc:
        fail(store, job_id, "orchestrator_unavailable", f"{exc}; {RESUMABLE_NOTE.format(id=job_id)}.")
        return 1
    except BaseException as exc:
        traceback.print_exc()
        fail(store, job_id, "training_failed", f"{type(exc).__name__}: {exc}")
        return 1
    job = store.get_job(job_id) or job
    try:
        finish(settings, store, job, cfg, summary)
    except Exception as exc:
        traceback.print_exc()
        fail(store, job_id, "finalize_failed", f"the pipeline finished but recording its result failed: "
             f"{type(exc).__name__}: {exc}")
        return 1
    print(json.dumps({"job": job_id, "status": "succeeded", "model_dir": summary["model_dir"]}), flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--job-id", required=True)
    args = parser.parse_args()
    raise SystemExit(run(ServerSettings(data_dir=Path(args.data_dir)), args.job_id))


if __name__ == "__main__":
    main()
