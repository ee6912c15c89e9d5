"""Prefect tasks: one per pipeline stage, each a thin wrapper around one `rft_core.stages` function.

Tasks take the config and the small records of earlier stages (paths, digests, metrics, run ids),
never models. Each result is persisted and cached on the stage's key (config sections it reads +
digests of its inputs + code version), so rerunning a config, or retrying a failed flow run,
reuses every completed stage and runs only what failed and what follows.

Retries: where a retry can help (reading data, MLflow and registry calls), and there only for
failures that may pass by themselves (`rft_core.retries.transient`: a connection refused, a timeout,
a locked database); a missing file or an invalid name fails at once. Training is not retried: its
failures are deterministic (a rerun resumes from the checkpoint instead).
"""

from __future__ import annotations

import os
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from rft_core import stages
from rft_core.config import RFTConfig
from rft_core.retries import transient


class InjectedFault(RuntimeError):
    """Raised where RFT_FAIL_STAGE names the stage: lets tests and drills fail a stage on purpose."""


def _maybe_fail(stage: str) -> None:
    if os.environ.get("RFT_FAIL_STAGE") == stage:
        raise InjectedFault(f"RFT_FAIL_STAGE={stage}: failing the {stage} stage on purpose")


def _key(fn):
    """A Prefect cache_key_fn from a stage-key function of the task's parameters."""

    def cache_key(_: TaskRunContext, params: dict[str, Any]) -> str:
        return fn(params)

    return cache_key


def transient_failure(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry a failed stage only when its error may pass by itself."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # no exception to look at: nothing says a retry would help
        return False
    return isinstance(exc, BaseException) and transient(exc)


def _track(parent_run_id: str | None, tracking_uri: str | None) -> stages.Tracking:
    return stages.Tracking(parent_run_id, tracking_uri)


@task(name="validate", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_failure,
      persist_result=True,
      cache_key_fn=_key(lambda p: "validate-" + stages.validate_key(p["config"])))
def validate_data(config: RFTConfig, parent_run_id: str | None = None, tracking_uri: str | None = None) -> stages.DataRecord:
    """Validate the data files; rejects go to a file beside the report."""
    _maybe_fail("validate")
    return stages.validate_stage(config, _track(parent_run_id, tracking_uri))


@task(name="split", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_failure,
      persist_result=True,
      cache_key_fn=_key(lambda p: "split-" + stages.split_key(p["config"], p["data"])))
def split_data(
    config: RFTConfig, data: stages.DataRecord, parent_run_id: str | None = None, tracking_uri: str | None = None
) -> stages.SplitRecord:
    """Deterministic train/validation split with a saved manifest."""
    _maybe_fail("split")
    return stages.split_stage(config, data, _track(parent_run_id, tracking_uri))


@task(name="sft", persist_result=True,
      cache_key_fn=_key(lambda p: "sft-" + stages.sft_key(p["config"], p["split"])))
def warmup_sft(
    config: RFTConfig, split: stages.SplitRecord, parent_run_id: str | None = None, tracking_uri: str | None = None
) -> stages.ModelRecord:
    """Warm-up SFT on the items with worked solutions."""
    _maybe_fail("sft")
    return stages.sft_stage(config, split, _track(parent_run_id, tracking_uri))


@task(name="rl", persist_result=True,
      cache_key_fn=_key(lambda p: "rl-" + stages.rl_key(p["config"], p["sft"])))
def reinforce(
    config: RFTConfig,
    split: stages.SplitRecord,
    sft: stages.ModelRecord,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> stages.ModelRecord:
    """PPO or GRPO against the grader, from the warm-up model."""
    _maybe_fail("rl")
    return stages.rl_stage(config, split, sft, _track(parent_run_id, tracking_uri))


@task(name="evaluate", persist_result=True,
      cache_key_fn=_key(lambda p: "evaluate-" + stages.evaluate_key(p["config"], p["models"])))
def evaluate_models(
    config: RFTConfig,
    split: stages.SplitRecord,
    models: dict[str, stages.ModelRecord],
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> stages.EvalRecord:
    """Greedy accuracy, mean reward, pass@k / maj@k of each model on the validation set."""
    _maybe_fail("evaluate")
    return stages.evaluate_stage(config, split, models, _track(parent_run_id, tracking_uri))


@task(name="register", retries=3, retry_delay_seconds=10, retry_condition_fn=transient_failure,
      persist_result=True,
      cache_key_fn=_key(lambda p: "register-" + stages.register_key(p["config"], p["evaluation"], p["tracking_uri"])))
def register_model(
    config: RFTConfig,
    split: stages.SplitRecord,
    final: stages.ModelRecord,
    evaluation: stages.EvalRecord,
    parent_run_id: str | None,
    tracking_uri: str | None,
) -> stages.RegisterRecord:
    """A new registry version with its metrics and digests; alias challenger."""
    _maybe_fail("register")
    return stages.register_stage(config, split, final, evaluation, _track(parent_run_id, tracking_uri))


@task(name="promote", retries=3, retry_delay_seconds=10, retry_condition_fn=transient_failure)
def promote(
    config: RFTConfig,
    split: stages.SplitRecord,
    registered: stages.RegisterRecord,
    parent_run_id: str | None,
    tracking_uri: str | None,
) -> dict[str, Any]:
    """The promotion gate: champion moves only to a better model on the same validation data."""
    _maybe_fail("promote")
    return stages.promote_stage(config, split, registered, _track(parent_run_id, tracking_uri)).to_dict()


@task(name="training-curve", cache_policy=NO_CACHE)
def plot_training_curve(
    config: RFTConfig,
    models: dict[str, stages.ModelRecord],
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """The run's picture of validation during SFT and RL; not cached: each pipeline run draws its
    own (from the stages' histories on disk) and logs it on its own MLflow run."""
    return stages.training_curve(config, models, _track(parent_run_id, tracking_uri))
