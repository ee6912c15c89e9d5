"""The RFT pipeline flow: validate -> split -> warm-up SFT -> RL -> evaluate -> register -> promote.

One MLflow parent run per flow run (a retried flow run continues its parent run); one child run
per stage. Stage results are cached on their keys under `<output_dir>/prefect-results`, so a rerun
of the same config, or `prefect flow-run retry`, recomputes only what failed and what follows.
After evaluation each run draws its training curve (`<output_dir>/runs/<MLflow run id>/`, logged
on the parent run); the Prefect artifact `rft-evaluation` tables the results and links it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.filesystems import LocalFileSystem
from prefect.runtime import flow_run

from rft_core import preflight, stages, tracking
from rft_core.config import RFTConfig
from rft_core.graders.sandbox import sandbox_warning
from rft_core.tracking import tags
from rft_core.tracking.gate import verdict
from tasks.stages import (
    evaluate_models,
    plot_training_curve,
    promote,
    register_model,
    reinforce,
    split_data,
    validate_data,
    warmup_sft,
)


def _results_storage(config: RFTConfig) -> str:
    """A saved LocalFileSystem block under output_dir: any process or worker that runs this config
    finds the cached stage results there."""
    path = Path(config.output_dir).resolve() / "prefect-results"
    path.mkdir(parents=True, exist_ok=True)
    name = "rft-results-" + stages.hash_of(str(path))
    LocalFileSystem(basepath=str(path)).save(name, overwrite=True)
    return f"local-file-system/{name}"


@dataclass
class _StageRunner:
    """`run(task)(*args)` calls a stage task of this flow run: with the results storage (and
    `fresh`: recompute, refreshing the cache), reporting to the MLflow parent run, timed into
    `seconds[task.name]` (the tiny model's pretraining, timed by the sft stage, apart as
    `seconds["pretrain"]`). A cache hit whose files are gone or damaged (`stages.record_problem`)
    is computed again. A cache hit whose stage run belongs to an earlier pipeline run is tagged
    `rft.reused.<stage>` on the parent run and kept in `reused` (stage -> (stage run, its pipeline
    run)), so the parent points at the run that did the work; `computed` lists the stages that ran."""

    parent_run_id: str
    tracking_uri: str
    storage: str
    fresh: bool
    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, tuple[str, str]] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)

    def __call__(self, stage_task: Task[..., Any]) -> Callable[..., Any]:
        options: dict[str, Any] = {"result_storage": self.storage}
        if self.fresh:
            options["refresh_cache"] = True
        configured = stage_task.with_options(**options)
        name = stage_task.name

        def call(*args: Any) -> Any:
            started = time.perf_counter()
            kwargs = {"parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri}
            state = configured(*args, **kwargs, return_state=True)
            record = state.result()
            cached = state.name == "Cached"
            if cached and (problem := stages.record_problem(record)):
                # The cache holds a record, not the files it names: files deleted or damaged since
                # would fail a later stage with a message about something else. Run it again.
                get_run_logger().warning("the cached %s result cannot be reused (%s): running %s again",
                                         name, problem, name)
                record = configured.with_options(refresh_cache=True)(*args, **kwargs)
                cached = False
            seconds = time.perf_counter() - started
            pretrain = getattr(record, "pretrain_seconds", 0.0) if not cached else 0.0
            if pretrain:
                self.seconds["pretrain"] = pretrain
            self.seconds[name] = seconds - pretrain
            stage_run = getattr(record, "run_id", None)
            parent = _parent_of(stage_run, self.tracking_uri) if cached and stage_run else None
            if cached:
                get_run_logger().info("%s: reused the cached result (MLflow run %s)", name, stage_run or "none")
            else:
                self.computed.append(name)
            if parent not in (self.parent_run_id, None):
                self.reused[name] = (stage_run, parent)
                tracking.set_tags(self.parent_run_id, {tags.TAG_REUSED_PREFIX + name: stage_run},
                                  tracking_uri=self.tracking_uri)
            return record

        return call


@flow(name="rft-pipeline", log_prints=True)
def rft_pipeline(config: RFTConfig | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run every stage of reinforcement fine-tuning on `config`; returns a summary."""
    config = config or RFTConfig()
    log = get_run_logger()
    logging.getLogger("rft").setLevel(logging.INFO)
    preflight.check(config)  # what needs no training to find fails now, not after it
    uri = tracking.resolve_tracking_uri(config)
    tracking.check_tracking_available(uri)
    if warning := sandbox_warning(config.grader.sandbox):
        log.warning(warning)  # every run, and the parent run carries the mode as a tag
    # A retried flow run continues the MLflow run of its first attempt.
    with tracking.pipeline_run(config, tracking_uri=uri, flow_run_id=flow_run.get_id()) as parent:
        log.info("MLflow run %s at %s (look: %s)", parent, uri, tracking.ui_command(uri))
        run = _StageRunner(parent, uri, _results_storage(config), fresh)

        data = run(validate_data)(config)
        split = run(split_data)(config, data)
        sft = run(warmup_sft)(config, split)
        models = {"sft": sft}
        if config.rl.enabled:
            models["rl"] = run(reinforce)(config, split, sft)
        final = models.get("rl", sft)
        evaluation = run(evaluate_models)(config, split, models)
        # Not a stage (not timed, not cached): the picture belongs to this run, whatever was reused.
        # A picture that cannot be drawn is reported, and does not cost the run its registration.
        curve_state = plot_training_curve(
            config, models, parent_run_id=parent, tracking_uri=uri, return_state=True
        )
        curve = curve_state.result() if curve_state.is_completed() else None
        if curve is None:
            log.warning("the training curve could not be drawn: %s", curve_state.message)
        summary: dict[str, Any] = {
            "mlflow_run_id": parent,
            "tracking_uri": uri,
            "metrics": evaluation.metrics,
            "seconds": run.seconds,
            "split": {"train": split.n_train, "validation": split.n_val, "leakage_pairs": split.leakage},
            "rejected": {role: rep["rejected"] for role, rep in data.reports.items()},
            "model_dir": final.model_dir,
            "training_curve": curve,
            "guard": [event["message"] for event in getattr(models.get("rl"), "events", None) or []],
        }
        for message in summary["guard"]:
            log.warning("RL guard: %s", message)
        # A model trained by this config (not the base model of a run with every training stage
        # off), logged by its stage, or to be logged by the register stage (`model_in_store`).
        trained = final.stage == "rl" or config.sft.enabled
        if config.registry.enabled and trained and (final.model_uri or config.tracking.log_models):
            registered = run(register_model)(config, split, final, evaluation)
            summary["registered"] = {"name": registered.name, "version": registered.version}
            summary["gate_metric"] = config.registry.metric
            if config.registry.promote:
                summary["gate"] = run(promote)(config, split, registered)

        tracking.log_metrics_once(parent, {f"time/{k}": v for k, v in run.seconds.items()}, tracking_uri=uri)
        if run.reused:  # a rerun: say so on its MLflow run, link the runs that did the work
            summary["reused"] = {stage: stage_run for stage, (stage_run, _) in run.reused.items()}
            stages.mark_rerun(stages.Tracking(parent, uri), run.reused, run.computed, split, models, evaluation)
        create_markdown_artifact(
            markdown=_report(summary, uri), key="rft-evaluation", description="SFT vs RL on the validation set"
        )
    return summary


def _parent_of(run_id: str, uri: str) -> str | None:
    """The pipeline run a stage run belongs to; None when this store does not know the run (a
    cached stage logged to another MLflow store)."""
    try:
        return tracking.run_tags(run_id, tracking_uri=uri).get(tags.TAG_PARENT)
    except Exception:
        return None


def _report(summary: dict[str, Any], uri: str) -> str:
    table = dict(summary["metrics"])
    gate = summary.get("gate") or {}
    if gate.get("champion_version") is not None and gate.get("champion_value") is not None:
        # The champion before this run, on the same validation data (the gate's metric only).
        metric = summary.get("gate_metric", "eval/accuracy").rsplit("/", 1)[-1]
        table[f"champion v{gate['champion_version']}"] = {metric: gate["champion_value"]}
    lines = ["# RFT evaluation (validation set)", "", stages.evaluation_table(table), ""]
    if summary.get("guard"):
        lines += ["**The RL guard acted**:", *(f"- {message}" for message in summary["guard"]), ""]
    if "registered" in summary:
        reg = summary["registered"]
        lines.append(f"Registered **{reg['name']}** version **{reg['version']}**.")
    if "gate" in summary:
        gate = summary["gate"]
        lines.append(f"Gate: **{verdict(gate)}**: {gate['reason']}")
    run_id = summary["mlflow_run_id"]
    if curve := summary.get("training_curve"):
        name = Path(curve).name
        lines += [
            "",
            f"Training curve: [{curve}]({Path(curve).as_uri()}); in MLflow `runs:/{run_id}/{name}`: "
            f"{tracking.artifact_link(run_id, name, uri)}",
        ]
    lines += ["", f"MLflow run `{run_id}` at `{uri}`: {tracking.run_link(run_id, uri)}"]
    return "\n".join(lines)
