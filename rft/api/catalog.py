"""Model names and what they point at: base models, fine-tuned models, checkpoints.

- `rft-tiny`: rft's built-in tiny model (config `model.name_or_path: tiny`), built per job.
- a name from the server's `--model NAME=PATH_OR_HUB_ID` list (hub ids and local paths are served
  only when the server's operator allows them this way).
- `ft:<base>:<suffix>:<job id>`: the model a succeeded job produced (its MLflow registered version;
  `<base>` is the root base model, also when the job started from another fine-tuned model, as
  OpenAI names them).
- `ft:<base>:<suffix>:<job id>:ckpt-step-<N>`: a checkpoint of a job, while it is kept on disk
  (the training stage keeps its last checkpoints).

Each resolves to a `ResolvedModel`: what a job starts from (`model.name_or_path`), and for
fine-tuned models and checkpoints what chat completions load.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rft.api.errors import not_found
from rft.api.settings import TINY_MODEL, ServerSettings
from rft.api.store import Job, Store

_CKPT = re.compile(r"^(?P<model>ft:.*):ckpt-step-(?P<step>\d+)$")
_JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
# The training stage whose checkpoints a job lists: SFT for supervised jobs, RL for reinforcement.
TRAINING_STAGE = {"supervised": "sft", "reinforcement": "rl"}


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{suffix or ''}:{job_id}"


def checkpoint_name(fine_tuned: str, step: int) -> str:
    return f"{fine_tuned}:ckpt-step-{step}"


def checkpoint_id(job_id: str, step: int) -> str:
    """A stable id for a job's checkpoint at `step` (the same on every listing)."""
    return "ftckpt-" + hashlib.sha256(f"{job_id}:{step}".encode()).hexdigest()[:24]


@dataclass
class ResolvedModel:
    """What a model name means here."""

    name: str
    kind: str  # base | fine_tuned | checkpoint
    root_base: str  # the base model at the root of its lineage (rft-tiny, or a server model name)
    source: str  # model.name_or_path for a job: "tiny", a hub id, or a local directory
    job_id: str | None = None
    step: int | None = None
    created_at: int = 0


def checkpoint_created(model_dir: Path) -> int | None:
    """When a checkpoint was written (its state.json, written last), or None once it is pruned."""
    try:
        return int((model_dir.parent / "state.json").stat().st_mtime)
    except OSError:
        return None


def checkpoint_dirs(settings: ServerSettings, job: Job) -> dict[int, Path]:
    """The job's training checkpoints on disk, by step (the `model/` directory of each). A running
    job prunes its old checkpoints: callers treat one that vanishes as gone (`checkpoint_created`)."""
    from rft_core.checkpoint import checkpoint_dirs as complete_checkpoints

    stage = TRAINING_STAGE.get(job.data.get("method_type", ""), "rl")
    found: dict[int, Path] = {}
    stages = settings.job_dir(job.id) / "out" / "stages"
    for root in sorted(stages.glob(f"{stage}-*/checkpoints")):
        for step_dir in complete_checkpoints(root):
            if (step_dir / "model").is_dir():
                found[int(step_dir.name.removeprefix("step-"))] = step_dir / "model"
    return dict(sorted(found.items()))


def base_models(settings: ServerSettings) -> dict[str, str]:
    """Base model name -> `model.name_or_path`."""
    return {TINY_MODEL: "tiny", **settings.models}


def resolve(settings: ServerSettings, store: Store, name: str, param: str = "model") -> ResolvedModel:
    """The model `name` names; 404 `model_not_found` when it names none this server has."""
    bases = base_models(settings)
    if name in bases:
        return ResolvedModel(name, "base", name, bases[name])
    missing = not_found(f"The model '{name}' does not exist or you do not have access to it.", param=param,
                        code="model_not_found")
    if not name.startswith("ft:"):
        raise missing
    match = _CKPT.match(name)
    model_name, step = (match["model"], int(match["step"])) if match else (name, None)
    job_id = model_name.rsplit(":", 1)[-1]
    job = store.get_job(job_id) if _JOB_ID.match(job_id) else None
    if job is None or job.data.get("fine_tuned_name") != model_name:
        raise missing
    if step is None:
        result = job.data.get("result")
        if job.status != "succeeded" or not result:
            raise missing
        return ResolvedModel(name, "fine_tuned", job.data["root_base"], result["model_dir"], job.id,
                             created_at=job.data.get("finished_at") or job.created_at)
    checkpoint = checkpoint_dirs(settings, job).get(step)
    created = checkpoint_created(checkpoint) if checkpoint is not None else None
    if checkpoint is None or created is None:
        raise missing
    return ResolvedModel(name, "checkpoint", job.data["root_base"], str(checkpoint), job.id, step, created)


def snapshot_checkpoint(settings: ServerSettings, model: ResolvedModel) -> str:
    """A copy of a checkpoint's model that stays while its job prunes old checkpoints: what a job
    started from a checkpoint trains from."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.name)
    target = settings.models_dir / slug
    if not (target / "config.json").is_file():
        partial = settings.models_dir / f".{slug}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            shutil.copytree(model.source, partial)
        except (OSError, shutil.Error):  # pruned by its running job while being copied
            shutil.rmtree(partial, ignore_errors=True)
            raise not_found(f"The checkpoint '{model.name}' is no longer kept.", param="model",
                            code="model_not_found") from None
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return str(target)


def model_object(name: str, created: int, owned_by: str) -> dict[str, Any]:
    """A `model` object of `/v1/models`."""
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def list_models(settings: ServerSettings, store: Store) -> list[dict[str, Any]]:
    """Base models, then every succeeded job's model and its kept checkpoints, newest job first."""
    models = [model_object(name, 0, "rft") for name in base_models(settings)]
    for job in store.list_jobs():
        name = job.data.get("fine_tuned_name")
        if not name:
            continue
        if job.status == "succeeded" and job.data.get("result"):
            models.append(model_object(name, job.data.get("finished_at") or job.created_at, "user"))
        for step, path in checkpoint_dirs(settings, job).items():
            created = checkpoint_created(path)
            if created is not None:
                models.append(model_object(checkpoint_name(name, step), created, "user"))
    return models
