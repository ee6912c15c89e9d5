"""Flows on registered models: a scheduled regression evaluation, and promotion through the gate.

`evaluate_model` scores a registered model (e.g. `models:/NAME@champion`) on a data set, logs the
result to MLflow and fails the flow run loudly when the score falls below a threshold.
`promote_model` runs the promotion gate for one version (or forces it) through `tracking.promote`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from rft_core import stages, tracking
from rft_core.config import RFTConfig
from rft_core.tracking import tags
from tasks.stages import transient_failure


class RegressionDetected(RuntimeError):
    """The evaluated model scored below the threshold."""


@task(name="load-data", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_failure)
def load_validation(config: RFTConfig) -> stages.SplitRecord:
    """The validation items the config names (validated and split exactly as the pipeline does)."""
    data = stages.validate_stage(config)
    return stages.split_stage(config, data)


@task(name="evaluate-registered", retries=1, retry_delay_seconds=10, retry_condition_fn=transient_failure)
def evaluate_registered(config: RFTConfig, model_uri: str, split: stages.SplitRecord) -> dict[str, float]:
    return stages.model_evaluator(config, split, tracking.resolve_tracking_uri(config))(model_uri)


@flow(name="evaluate-model", log_prints=True)
def evaluate_model(
    config: RFTConfig | None = None,
    model_uri: str | None = None,
    metric: str = "eval/accuracy",
    threshold: float | None = None,
) -> dict[str, float]:
    """Evaluate `model_uri` (default: the champion of `registry.model_name`) on the config's
    validation data; fail when `metric` < `threshold`."""
    config = config or RFTConfig()
    log = get_run_logger()
    uri = tracking.resolve_tracking_uri(config)
    tracking.check_tracking_available(uri)
    model_uri = model_uri or f"models:/{config.registry.model_name}@{tags.ALIAS_CHAMPION}"
    tracking.check_registered(model_uri, tracking_uri=uri)  # a missing model: say where, before any work
    split = load_validation(config)
    metrics = evaluate_registered(config, model_uri, split)
    run_tags = {
        tags.TAG_KIND: tags.KIND_REGRESSION,
        tags.TAG_MODEL_URI: model_uri,
        tags.TAG_DATA_DIGEST: split.val_digest,
    }
    # A regression ends the MLflow run FAILED (the exception leaves the block) as it fails the flow run.
    name = f"evaluate {model_uri}"
    with tracking.pipeline_run(config, tracking_uri=uri, run_name=name, tags=run_tags) as run_id:
        tracking.log_metrics_once(run_id, metrics, tracking_uri=uri)
        value = metrics.get(metric)
        failed = threshold is not None and (value is None or value < threshold)
        verdict = "below threshold" if failed else "ok"
        verdict_tags = {tags.TAG_REGRESSION_VERDICT: verdict, tags.TAG_REGRESSION_THRESHOLD: threshold}
        tracking.set_tags(run_id, verdict_tags, tracking_uri=uri)
        create_markdown_artifact(
            markdown=f"# Evaluation of `{model_uri}`\n\n"
            + stages.evaluation_table({model_uri: metrics})
            + f"\n\n{metric} = {value} (threshold {threshold}): **{verdict}**. MLflow run `{run_id}`.",
            key="rft-regression",
        )
        log.info("%s: %s = %s (threshold %s)", model_uri, metric, value, threshold)
        if failed:
            raise RegressionDetected(
                f"{model_uri}: {metric} = {value} is below the threshold {threshold} (MLflow run {run_id})"
            )
    return metrics


@flow(name="promote-model", log_prints=True)
def promote_model(
    version: int,
    config: RFTConfig | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The promotion gate for `version` of `registry.model_name` (or `force` it to champion).

    The champion is compared on the config's validation data (scored again when it was validated
    on other data).
    """
    config = config or RFTConfig()
    uri = tracking.resolve_tracking_uri(config)
    tracking.check_tracking_available(uri)
    split = None if force else load_validation(config)  # forcing compares nothing: no data needed
    decision = tracking.promote(
        config.registry,
        version,
        data_digest=split.val_digest if split else None,
        evaluate=stages.model_evaluator(config, split, uri) if split else None,
        force=force,
        tracking_uri=uri,
    )
    get_run_logger().info("version %s: %s (%s)", version, "promoted" if decision.promoted else "refused", decision.reason)
    return decision.to_dict()
