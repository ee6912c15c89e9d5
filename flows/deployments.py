"""Entrypoints of the deployments in `deployments/prefect.yaml` (and of `rft serve`).

Each flow here runs one flow of `flows/pipeline.py` or `flows/registry.py` on a config *file*: a
path relative to the deployment's working directory (the project root, set by the pull step) plus
`section.key=value` overrides, exactly as `rft run --config FILE --set KEY=VALUE` reads them. A
schedule thus runs a reviewed config from the repository, and a one-off run changes a field or two
(`prefect deployment run rft-pipeline/rft-pipeline -p overrides='["rl.iterations=5"]'`).

The flows keep the names of the flows they wrap, so the runs of a deployment and those of `rft run`
are listed under the same flow in the Prefect UI. They call the wrapped flow's function in their
own flow run (not as a subflow): the stage tasks are children of the deployment's flow run, and
`prefect flow-run retry` re-runs that one flow run, reusing every cached stage.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger

from flows.pipeline import rft_pipeline
from flows.registry import evaluate_model, promote_model
from rft_core import tracking
from rft_core.config import RFTConfig

DEFAULT_CONFIG = "deployments/configs/nightly.yaml"


def load_config(config_path: str, overrides: list[str] | None = None) -> RFTConfig:
    """The config file (relative to the working directory) with its overrides applied."""
    config = RFTConfig.from_yaml(config_path, list(overrides or []))
    get_run_logger().info(
        "config %s%s (digest %s) in %s",
        config_path,
        f" with {' '.join(overrides)}" if overrides else "",
        config.digest(),
        os.getcwd(),
    )
    return config


@flow(name="rft-pipeline", log_prints=True)
def pipeline_from_file(
    config_path: str = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run the whole pipeline (validate, split, SFT, RL, evaluate, register, promote) on a config
    file; completed stages are reused unless `fresh`."""
    return rft_pipeline.fn(config=load_config(config_path, overrides), fresh=fresh)


@flow(name="evaluate-model", log_prints=True)
def evaluate_from_file(
    config_path: str = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    model_uri: str | None = None,
    metric: str = "eval/accuracy",
    threshold: float | None = None,
) -> dict[str, float]:
    """Evaluate `model_uri` (default: `models:/<registry.model_name>@champion`) on the config's
    validation data, log the result to MLflow, and fail when `metric` is below `threshold`."""
    return evaluate_model.fn(
        config=load_config(config_path, overrides), model_uri=model_uri, metric=metric, threshold=threshold
    )


@flow(name="promote-model", log_prints=True)
def promote_from_file(
    version: int,
    force: bool = False,
    config_path: str = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Move alias `champion` of `registry.model_name` to `version` if it beats the champion on the
    config's validation data (the gate), or unconditionally with `force`."""
    return promote_model.fn(version=version, config=load_config(config_path, overrides), force=force)


@flow(name="rollback-model", log_prints=True)
def rollback_from_file(
    config_path: str = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Move alias `champion` of `registry.model_name` back to the previous champion."""
    config = load_config(config_path, overrides)
    uri = tracking.resolve_tracking_uri(config)
    tracking.check_tracking_available(uri)
    name = config.registry.model_name
    before = tracking.champion_version(name, tracking_uri=uri)
    after = tracking.rollback(name, tracking_uri=uri)
    get_run_logger().info("rolled back %s: champion v%s -> v%s", name, before, after)
    return {"name": name, "from": before, "to": after}
