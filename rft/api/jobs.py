"""`/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause, resume, events, checkpoints.

The request body follows OpenAI's reference (unknown fields are a 400 naming them); `method.type`
`supervised` runs SFT alone and `reinforcement` RL alone with the job's grader, from `model`: a
supervised job's `fine_tuned_model` is a valid `model` for a reinforcement job, which is ReFT's
warm-up then RL in OpenAI's vocabulary. `dpo` is refused. The job object answered is OpenAI's
`fine_tuning.job`, with `status` also `paused`, as OpenAI's service reports it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

from rft.api import catalog
from rft.api.errors import conflict, invalid, not_found
from rft.api.files import existing_file
from rft.api.pagination import page
from rft.api.results import checkpoint_objects, settle_metric_events, sync_metric_events
from rft.api.store import Job, new_id, now
from rft_core.graders import validate_grader_spec

router = APIRouter()

Auto = Literal["auto"]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
PositiveFloat = Annotated[StrictFloat | StrictInt, Field(gt=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(_Body):
    batch_size: Auto | PositiveInt | None = None
    learning_rate_multiplier: Auto | PositiveFloat | None = None
    n_epochs: Auto | PositiveInt | None = None


class ReinforcementHyperparameters(SupervisedHyperparameters):
    compute_multiplier: Auto | PositiveFloat | None = None
    eval_interval: Auto | PositiveInt | None = None
    eval_samples: Auto | PositiveInt | None = None
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None


class SupervisedMethod(_Body):
    hyperparameters: SupervisedHyperparameters | None = None


class ReinforcementMethod(_Body):
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(_Body):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    reinforcement: ReinforcementMethod | None = None
    dpo: dict[str, Any] | None = None


class JobCreate(_Body):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: SupervisedHyperparameters | None = None
    method: Method | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2147483647)] | None = None
    suffix: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("at most 16 key-value pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError(f"keys are at most 64 characters and values at most 512 ({key!r})")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix_chars(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("letters, digits, '.', '_' and '-' only (it becomes part of the model name)")
        return value


def _hp_dict(model: BaseModel | None) -> dict[str, Any]:
    return {k: v for k, v in (model.model_dump() if model else {}).items() if v is not None}


def _state(request: Request) -> Any:
    return request.app.state.rft


def get_job(state: Any, job_id: str) -> Job:
    job = state.store.get_job(job_id)
    if job is None:
        raise not_found(f"fine-tuning job {job_id} not found", param="fine_tuning_job_id", code="fine_tuning_job_not_found")
    return job


def job_object(job: Job) -> dict[str, Any]:
    """The `fine_tuning.job` object of a job record."""
    d = job.data
    hyperparameters = d.get("hyperparameters") or d.get("hyperparameters_given") or {}
    method: dict[str, Any] = {"type": d["method_type"]}
    if d["method_type"] == "supervised":
        method["supervised"] = {"hyperparameters": hyperparameters}
    else:
        method["reinforcement"] = {"grader": d.get("grader"), "hyperparameters": hyperparameters}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": d.get("error"),
        "fine_tuned_model": d.get("fine_tuned_model"),
        "finished_at": d.get("finished_at"),
        "hyperparameters": {k: hyperparameters.get(k, "auto") for k in ("batch_size", "learning_rate_multiplier", "n_epochs")},
        "model": d["model"],
        "organization_id": "org-rft",
        "result_files": d.get("result_files", []),
        "seed": d["seed"],
        "status": job.status,
        "trained_tokens": d.get("trained_tokens"),
        "training_file": d["training_file"],
        "validation_file": d.get("validation_file"),
        "estimated_finish": None,
        "integrations": [],
        "metadata": d.get("metadata"),
        "method": method,
        "user_provided_suffix": d.get("suffix"),
    }


def registry_name(root_base: str, suffix: str | None) -> str:
    """The MLflow registered model of a job's models: one per base model and suffix, so that a new
    job's model faces the gate against the champion of the same lineage."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"ft-{root_base}" + (f"-{suffix}" if suffix else ""))


@router.post("/v1/fine_tuning/jobs")
def create_job(request: Request, body: JobCreate) -> dict[str, Any]:
    state = _state(request)
    method = body.method or Method(type="supervised", supervised=SupervisedMethod(hyperparameters=body.hyperparameters))
    if method.type == "dpo":
        raise invalid(
            "method.type 'dpo' is not served by rft: it fine-tunes with 'supervised' (SFT on the assistant "
            "answers) and 'reinforcement' (RL with a grader)", param="method.type", code="unsupported_method",
        )
    if body.integrations:
        raise invalid("integrations are not supported here (runs are tracked in MLflow)", param="integrations")
    model = catalog.resolve(state.settings, state.store, body.model)
    existing_file(state, body.training_file, param="training_file")
    if body.validation_file is not None:
        existing_file(state, body.validation_file, param="validation_file")
    grader = None
    if method.type == "reinforcement":
        if method.reinforcement is None:
            raise invalid("method.reinforcement (with its grader) is required for a reinforcement job",
                          param="method.reinforcement")
        problems = validate_grader_spec(method.reinforcement.grader)
        if problems:
            raise invalid("invalid grader: " + "; ".join(problems), param="method.reinforcement.grader",
                          code="invalid_grader")
        grader = method.reinforcement.grader
        given = _hp_dict(method.reinforcement.hyperparameters)
    else:
        given = _hp_dict(method.supervised.hyperparameters if method.supervised else None) or _hp_dict(body.hyperparameters)
    source = model.source
    if model.kind == "checkpoint":
        source = catalog.snapshot_checkpoint(state.settings, model)
    job_id = new_id("ftjob")
    seed = body.seed if body.seed is not None else state.settings.base_config().seed
    data = {
        "model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "method_type": method.type,
        "grader": grader,
        "hyperparameters_given": given,
        "seed": seed,
        "suffix": body.suffix,
        "metadata": body.metadata,
        "root_base": model.root_base,
        "source": source,
        "fine_tuned_name": catalog.fine_tuned_name(model.root_base, body.suffix, job_id),
        "registry_name": registry_name(model.root_base, body.suffix),
        "result_files": [],
    }
    job = Job(job_id, now(), "validating_files", data)
    state.settings.job_dir(job_id).mkdir(parents=True, exist_ok=True)
    state.store.add_job(job)
    state.store.add_event(job_id, f"Created fine-tuning job: {job_id}")
    state.store.add_event(job_id, "Validating training file: " + body.training_file
                          + (f" and validation file: {body.validation_file}" if body.validation_file else ""))
    state.runner.submit_validation(job_id)
    return job_object(job)


def _metadata_filters(request: Request) -> dict[str, str]:
    """`metadata[key]=value` query parameters, as the SDK sends `metadata={...}`."""
    filters = {}
    for key, value in request.query_params.multi_items():
        match = re.fullmatch(r"metadata\[(.+)\]", key)
        if match:
            filters[match[1]] = value
        elif key not in ("after", "limit", "metadata"):
            raise invalid(f"unrecognized query parameter: {key}", param=key)
    return filters


@router.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request, after: str | None = None, limit: int | None = None) -> dict[str, Any]:
    state = _state(request)
    filters = _metadata_filters(request)
    jobs = [
        job_object(job) for job in state.store.list_jobs()
        if all((job.data.get("metadata") or {}).get(k) == v for k, v in filters.items())
    ]
    return page(jobs, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}")
def retrieve_job(request: Request, job_id: str) -> dict[str, Any]:
    return job_object(get_job(_state(request), job_id))


def _change(request: Request, job_id: str, action: str) -> dict[str, Any]:
    state = _state(request)
    job = get_job(state, job_id)
    changed = getattr(state.runner, action)(job)
    if changed is None:
        current = get_job(state, job_id)
        allowed = {
            "cancel": "validating_files, queued, running or paused",
            "pause": "running",
            "resume": "paused (or failed with a resumable interruption)",
        }[action]
        raise conflict(f"cannot {action} job {job_id}: its status is {current.status} (only a job that is "
                       f"{allowed} can be {'cancelled' if action == 'cancel' else action + 'd'})")
    return job_object(changed)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    return _change(request, job_id, "cancel")


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
def pause_job(request: Request, job_id: str) -> dict[str, Any]:
    return _change(request, job_id, "pause")


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
def resume_job(request: Request, job_id: str) -> dict[str, Any]:
    return _change(request, job_id, "resume")


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(request: Request, job_id: str, after: str | None = None, limit: int | None = None) -> dict[str, Any]:
    state = _state(request)
    job = get_job(state, job_id)
    if job.status == "running":
        sync_metric_events(state.settings, state.store, job)
    elif job.data.get("metrics_pending"):  # its run ended while the tracking store could not be read
        settle_metric_events(state.settings, state.store, job)
    return page(state.store.list_events(job_id), after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int | None = None) -> dict[str, Any]:
    state = _state(request)
    job = get_job(state, job_id)
    return page(checkpoint_objects(state.settings, job), after, limit, default=10)
