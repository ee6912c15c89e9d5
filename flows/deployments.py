"""Entrypoints of the deployments in `deployments/prefect.yaml` (and of `rft serve`).

Each flow here runs one flow of `flows/pipeline.py` or `flows/registry.py` on a config *file*: a
path relative to the deployment's working directory (the project root, set by the pull step) plus
`section.key=value` overrides, exactly as `rft run --config FILE --set KEY=VALUE` reads them. A
schedule thus runs a reviewed config from the repository, and a one-off run changes a field or two
(`prefect deployment run rft-pipeline/rft-pipeline -p overrides='["rl.iterations=5"]'`); the pipeline's
`compute` parameter says where training runs (`-p compute='{"processes": 2}'`), a form in the UI.

The flows keep the names of the flows they wrap, so the runs of a deployment and those of `rft run`
are listed under the same flow in the Prefect UI. They call the wrapped flow's function in their
own flow run (not as a subflow): the stage tasks are children of the deployment's flow run, and
`prefect flow-run retry` re-runs that one flow run, reusing every cached stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL

from flows.pipeline import rft_pipeline
from flows.registry import evaluate_model, promote_model
from rft_core import tracking
from rft_core.config import ComputeConfig, RFTConfig

DEFAULT_CONFIG = "deployments/configs/nightly.yaml"
_T = TypeVar("_T")


class ServiceUnreachable(RuntimeError):
    """The Prefect API or the MLflow tracking server went away during a flow run."""


def unreachable(exc: BaseException, config: RFTConfig) -> str | None:
    """Which server is unreachable, when that is why `exc` was raised; else None."""
    if isinstance(exc, tracking.TrackingUnavailable):
        return str(exc) if exc.uri.startswith(("http://", "https://")) else None
    api = PREFECT_API_URL.value()
    if isinstance(exc, httpx.TransportError) and api:
        try:
            url = str(exc.request.url)
        except RuntimeError:  # raised before a request was made: ask the API itself
            url = api if not _answers(api.rstrip("/") + "/health") else ""
        if url.startswith(api.rstrip("/")):
            return f"the Prefect API {api} is unreachable ({type(exc).__name__}: {exc})"
    if isinstance(exc, MlflowException | OSError):
        try:
            tracking.check_tracking_available(tracking.resolve_tracking_uri(config))
        except tracking.TrackingUnavailable as down:
            return str(down)
    return None


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=5.0)
    except httpx.TransportError:
        return False
    return True


def explain_outage(run: Callable[[], _T], config: RFTConfig, *, cached: bool) -> _T:
    """Run `run`; when it fails because a server went away, fail with a message that names the
    server and says how to resume (the original error stays chained)."""
    try:
        return run()
    except Exception as exc:
        reason = unreachable(exc, config)
        if reason is None:
            raise
        what = f"flow run {flow_run.get_id()}" if flow_run.get_id() else "the run"
        resume = (
            f"Nothing computed is lost: completed stages are cached under "
            f"{os.path.abspath(config.output_dir)}/prefect-results. Once it is back, retry {what} "
            f"(prefect flow-run retry {flow_run.get_id()}) or run the deployment again: it continues "
            f"from the cached stages."
            if cached
            else f"Once it is back, retry {what} (prefect flow-run retry {flow_run.get_id()})."
        )
        raise ServiceUnreachable(f"{reason}. {resume}") from exc


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
    compute: ComputeConfig | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline (validate, split, SFT, RL, evaluate, register, promote) on a config
    file; completed stages are reused unless `fresh`. `compute`, when given, replaces the file's
    compute section: where SFT and RL train (processes per machine, machines, ddp or fsdp, the Ray
    cluster's address); the stages' cache keys do not depend on it."""
    config = load_config(config_path, overrides)
    if compute is not None:
        config = RFTConfig.from_dict({**config.model_dump(mode="json"), "compute": compute.model_dump(mode="json")},
                                     source="the compute parameter")
        get_run_logger().info("compute: %s", compute.model_dump(mode="json"))
    return explain_outage(lambda: rft_pipeline.fn(config=config, fresh=fresh), config, cached=True)


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
    config = load_config(config_path, overrides)
    return explain_outage(
        lambda: evaluate_model.fn(config=config, model_uri=model_uri, metric=metric, threshold=threshold),
        config,
        cached=False,
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
    config = load_config(config_path, overrides)
    return explain_outage(
        lambda: promote_model.fn(version=version, config=config, force=force), config, cached=False
    )


@flow(name="rollback-model", log_prints=True)
def rollback_from_file(
    config_path: str = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Move alias `champion` of `registry.model_name` back to the previous champion."""
    config = load_config(config_path, overrides)
    name = config.registry.model_name

    def roll_back() -> dict[str, Any]:
        uri = tracking.resolve_tracking_uri(config)
        tracking.check_tracking_available(uri)
        before = tracking.champion_version(name, tracking_uri=uri)
        after = tracking.rollback(name, tracking_uri=uri)
        get_run_logger().info("rolled back %s: champion v%s -> v%s", name, before, after)
        return {"name": name, "from": before, "to": after}

    return explain_outage(roll_back, config, cached=False)
