"""MLflow for rft: runs, metrics, artifacts, datasets, model logging, the registry and its promotion gate.

This is the only module of rft_core that imports mlflow. Training code receives the callable returned
by `metrics_logger` (`log(metrics, step)`) and never sees MLflow.

Stages run as separate Prefect tasks (other processes, retries), so nothing here relies on MLflow's
fluent "active run": every call names its run by id and goes through `MlflowClient`. One parent run
per pipeline run (`start_pipeline_run`), one child run per stage (`start_stage_run`, reused when a
stage is retried).

The tracking URI is process-wide state in MLflow (model logging and artifact download read it).
Every function takes `tracking_uri=None`; passing one (or calling `configure`) makes it current for
the process, and None means the current one: the last configured, else `MLFLOW_TRACKING_URI`, else
the local default `sqlite:///<cwd>/rft_runs/mlflow.db`.

Models are logged as MLflow pyfunc models whose artifacts are the `save_pretrained` directories
themselves (a full model + tokenizer, or a LoRA adapter + its base model), and `load_model` rebuilds
them with transformers/peft from those files, so a reloaded model is bit-identical to the one logged.

Registry: versions carry tags (`data_digest`, `config_digest`, `git_commit`, `metric.<key>`), each
new version gets alias `challenger`, and `promotion_gate` moves alias `champion` only when the
challenger beats the champion on the same validation data. Alias moves happen under a registry lock
(see `_registry_lock`) with the champion re-read inside it, so racing promotions cannot leave the
alias on the loser. Past champions are kept in a registered-model tag for `rollback`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlflow
import mlflow.pyfunc
import pandas as pd  # already imported by mlflow; needed at runtime for a type hint MLflow evaluates
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from rft_core.config import RFTConfig

__all__ = [
    "ALIAS_CHALLENGER",
    "ALIAS_CHAMPION",
    "DEFAULT_OUTPUT_DIR",
    "GateDecision",
    "RegistryError",
    "TrackingError",
    "TrackingUnavailable",
    "champion_version",
    "check_tracking_available",
    "configure",
    "current_tracking_uri",
    "default_tracking_uri",
    "download_model",
    "end_run",
    "find_pipeline_run",
    "log_metrics_once",
    "reopen_run",
    "run_link",
    "run_tags",
    "ensure_experiment",
    "find_stage_run",
    "git_commit",
    "list_versions",
    "load_model",
    "log_artifact",
    "log_dataset",
    "log_model",
    "log_params",
    "log_table",
    "metrics_logger",
    "promotion_gate",
    "register_model",
    "resolve_tracking_uri",
    "rollback",
    "set_alias",
    "set_tags",
    "sqlite_path",
    "start_pipeline_run",
    "start_stage_run",
    "ui_command",
]

DEFAULT_OUTPUT_DIR = "rft_runs"  # RFTConfig.output_dir's default: the CLI and the pipeline agree

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"

# Run tags.
TAG_STAGE = "rft.stage"
TAG_KIND = "rft.kind"
TAG_ATTEMPTS = "rft.attempts"
TAG_PARENT = "mlflow.parentRunId"
TAG_GIT_COMMIT_RUN = "mlflow.source.git.commit"  # the key MLflow's UI shows as the source version
# Tags shared by runs and model versions.
TAG_CONFIG_DIGEST = "config_digest"
TAG_DATA_DIGEST = "data_digest"
# Model version tags.
TAG_GIT_COMMIT = "git_commit"
METRIC_TAG_PREFIX = "metric."
GATE_DECISION = "gate.decision"
GATE_REASON = "gate.reason"
GATE_METRIC = "gate.metric"
GATE_CHAMPION_VERSION = "gate.champion_version"
GATE_CHAMPION_VALUE = "gate.champion_value"
GATE_TIME = "gate.time"
ROLLED_BACK = "rollback.demoted_at"
# Registered model tags.
HISTORY_TAG = "rft.champion_history"
HISTORY_LIMIT = 100
LOCK_SUFFIX = ".rft-lock"

# MLflow's request limits (mlflow.utils.validation): batches are split to stay under them.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_MAX_KEY = 250
_MAX_DATASET_DIGEST = 36

_RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


class TrackingError(RuntimeError):
    """A tracking or registry operation that cannot be done; the message says why."""


class TrackingUnavailable(TrackingError):
    """The tracking store cannot be reached (a dead server, an unwritable path)."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"MLflow tracking store {uri} is unreachable: {reason}")
        self.uri = uri
        self.reason = reason


class RegistryError(TrackingError):
    """Unknown registered model or version, nothing to roll back to, a lock never acquired."""


# --------------------------------------------------------------------------- tracking URI


def default_tracking_uri(output_dir: str | Path = DEFAULT_OUTPUT_DIR) -> str:
    """The local store of a pipeline: `sqlite:///<absolute output_dir>/mlflow.db`."""
    return "sqlite:///" + (Path(output_dir).expanduser().resolve() / "mlflow.db").as_posix()


def resolve_tracking_uri(cfg: RFTConfig) -> str:
    """`tracking.tracking_uri` of the config, else `MLFLOW_TRACKING_URI`, else the local default."""
    return (
        cfg.tracking.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(cfg.output_dir)
    )


def ui_command(tracking_uri: str) -> str:
    """What to print so the user can look at the runs.

    For a database or file store this is the `mlflow ui` command serving it (artifacts of local
    stores live at absolute paths recorded on each experiment, so no artifact option is needed).
    For a tracking server there is nothing to start: its address is returned.
    """
    if _is_http(tracking_uri):
        return tracking_uri
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (None for other stores and in-memory sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store go next to the database, not into ./mlruns of the cwd."""
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts").as_posix()


def check_tracking_available(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Raise `TrackingUnavailable` unless the store can be used, within about `timeout_s`.

    A tracking server is probed with one GET of `/health` and no retries: MLflow's own client retries
    a dead server with exponential backoff for about two minutes before failing. Any HTTP answer,
    even an error status (a proxy, an auth wall), proves the server is up. For a sqlite store the
    directory of the database is created.
    """
    if _is_http(tracking_uri):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            return
        except OSError as exc:  # URLError and timeouts included
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(tracking_uri, f"GET {url} failed: {reason}") from None
        return
    db = sqlite_path(tracking_uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(tracking_uri, f"cannot create {db.parent}: {exc}") from None


_state_lock = threading.Lock()
_active_uri: str | None = None
_checked_uris: set[str] = set()


def current_tracking_uri() -> str:
    """The last configured URI, else `MLFLOW_TRACKING_URI`, else the local default under the cwd."""
    return _active_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def configure(tracking_uri: str | None = None) -> str:
    """Make `tracking_uri` (or the current one) the process's tracking and registry URI; return it.

    The store is checked once per URI and process (`check_tracking_available`).
    """
    global _active_uri
    uri = tracking_uri or current_tracking_uri()
    with _state_lock:
        if uri not in _checked_uris:
            check_tracking_available(uri)
            _checked_uris.add(uri)
        if _active_uri != uri:
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            _active_uri = uri
    return uri


def _client(tracking_uri: str | None = None) -> MlflowClient:
    uri = configure(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def git_commit(path: str | Path = ".") -> str | None:
    """The commit checked out at `path`, or None outside a git work tree (or without git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit or None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- runs


def ensure_experiment(name: str, *, tracking_uri: str | None = None) -> str:
    """The id of experiment `name`, created (or restored from deletion) when needed."""
    uri = configure(tracking_uri)
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_local_artifact_root(uri))
        except MlflowException as exc:
            # Another stage or process created it between our read and our create.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > _MAX_PARAM_VALUE:
        # MLflow rejects longer values; the full value is in the logged config.yaml.
        suffix = "...[truncated]"
        text = text[: _MAX_PARAM_VALUE - len(suffix)] + suffix
    return text


def _param_key(key: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and space; grader specs can name things freely.
    return re.sub(r"[^\w\-./ ]", "_", key)[:_MAX_KEY]


def log_params(run_id: str, params: Mapping[str, Any], *, tracking_uri: str | None = None) -> None:
    """Log params, nested mappings flattened to `a.b.c`, non-strings as JSON.

    MLflow params are immutable: logging a key again with another value raises.
    """
    client = _client(tracking_uri)
    entries = [Param(_param_key(k), _param_value(v)) for k, v in _flatten(params).items()]
    for chunk in _chunks(entries, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk, synchronous=True)


def set_tags(run_id: str, tags: Mapping[str, Any], *, tracking_uri: str | None = None) -> None:
    """Set (or overwrite) run tags; values are converted with str()."""
    client = _client(tracking_uri)
    entries = [RunTag(k, str(v)) for k, v in tags.items()]
    for chunk in _chunks(entries, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=chunk, synchronous=True)


def start_pipeline_run(
    cfg: RFTConfig,
    *,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create the parent run of a pipeline run and return its id.

    Experiment `cfg.experiment` (created if missing); name `run_name`, else `cfg.run_name`, else
    `rft-<config digest>`; tags: the config digest and the git commit when there is one; the
    resolved config as the artifact `config.yaml`; every field as a param `section.key`.
    """
    uri = tracking_uri or resolve_tracking_uri(cfg)
    client = _client(uri)
    experiment_id = ensure_experiment(cfg.experiment, tracking_uri=uri)
    digest = cfg.digest()
    run_tags = {TAG_KIND: "pipeline", TAG_CONFIG_DIGEST: digest}
    commit = git_commit()
    if commit:
        run_tags[TAG_GIT_COMMIT_RUN] = commit
    run_tags.update(tags or {})
    run = client.create_run(
        experiment_id, run_name=run_name or cfg.run_name or f"rft-{digest[:8]}", tags=run_tags
    )
    run_id = run.info.run_id
    try:
        client.log_text(run_id, cfg.to_yaml(), "config.yaml")
        log_params(run_id, cfg.model_dump(mode="json"), tracking_uri=uri)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id


TAG_FLOW_RUN = "prefect.flow_run_id"


def find_pipeline_run(experiment: str, flow_run_id: str, *, tracking_uri: str | None = None) -> str | None:
    """The pipeline run started for Prefect flow run `flow_run_id` (a retried flow run continues
    it), or None."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{TAG_FLOW_RUN}` = '{flow_run_id}' and tags.`{TAG_KIND}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def reopen_run(run_id: str, *, tracking_uri: str | None = None) -> None:
    """Set a finished or failed run back to RUNNING (its flow run is being retried)."""
    _client(tracking_uri).update_run(run_id, status="RUNNING")


def log_metrics_once(run_id: str, metrics: Mapping[str, Any], *, step: int = 0, tracking_uri: str | None = None) -> None:
    """Log `metrics` (keys as given) at one step."""
    metrics_logger(run_id, "", tracking_uri=tracking_uri)(metrics, step)


def run_tags(run_id: str, *, tracking_uri: str | None = None) -> dict[str, str]:
    return dict(_client(tracking_uri).get_run(run_id).data.tags)


def run_link(run_id: str, tracking_uri: str) -> str:
    """Where a person looks at the run: its page on a tracking server, else the `mlflow ui` command."""
    if _is_http(tracking_uri):
        run = _client(tracking_uri).get_run(run_id)
        return f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"`{ui_command(tracking_uri)}`, then open run {run_id}"


_STAGE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def find_stage_run(parent_run_id: str, stage: str, *, tracking_uri: str | None = None) -> str | None:
    """The newest child run of `parent_run_id` for `stage`, or None."""
    if not _STAGE_NAME.match(stage):
        raise ValueError(f"stage name {stage!r}: use letters, digits, '_', '-', '.'")
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_STAGE}` = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_stage_run(
    parent_run_id: str,
    stage: str,
    params: Mapping[str, Any] | None = None,
    *,
    tracking_uri: str | None = None,
    reuse: bool = True,
) -> str:
    """The child run of `stage` under the pipeline run: reopened if it exists, else created.

    A retried stage (a Prefect retry, a rerun of a failed flow) continues its run: status back to
    RUNNING, `rft.attempts` counted up, its metrics continue at the steps it logs. `reuse=False`
    always creates a new child run.
    """
    client = _client(tracking_uri)
    existing = find_stage_run(parent_run_id, stage, tracking_uri=tracking_uri) if reuse else None
    if existing is not None:
        attempts = int(client.get_run(existing).data.tags.get(TAG_ATTEMPTS, "1")) + 1
        client.update_run(existing, status="RUNNING")
        client.set_tag(existing, TAG_ATTEMPTS, str(attempts))
        run_id = existing
    else:
        parent = client.get_run(parent_run_id)
        tags = {TAG_PARENT: parent_run_id, TAG_STAGE: stage, TAG_ATTEMPTS: "1"}
        for key in (TAG_CONFIG_DIGEST, TAG_GIT_COMMIT_RUN):
            if key in parent.data.tags:
                tags[key] = parent.data.tags[key]
        run_id = client.create_run(parent.info.experiment_id, run_name=stage, tags=tags).info.run_id
    if params:
        log_params(run_id, params, tracking_uri=tracking_uri)
    return run_id


def end_run(run_id: str, status: _RunStatus = "FINISHED", *, tracking_uri: str | None = None) -> None:
    """Mark a run terminated with `status` (FINISHED, FAILED or KILLED)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status {status!r}: expected FINISHED, FAILED or KILLED")
    _client(tracking_uri).set_terminated(run_id, status=status)


def metrics_logger(
    run_id: str, prefix: str, *, tracking_uri: str | None = None
) -> Callable[[Mapping[str, Any], int], None]:
    """A `log(metrics, step)` for training code: keys become `<prefix>/<key>`, one request per call.

    Values may be floats, ints, bools, 0-d tensors or numpy scalars; None values are skipped so a
    caller can pass metrics that only exist on some steps. A key that already carries the prefix is
    kept as it is.
    """
    client = _client(tracking_uri)
    head = prefix.strip("/")

    def log(metrics: Mapping[str, Any], step: int) -> None:
        timestamp = _now_ms()
        entries = []
        for key, value in metrics.items():
            if value is None:
                continue
            name = key if not head or key.startswith(head + "/") else f"{head}/{key}"
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {name!r}: {value!r} is not a number") from None
            entries.append(Metric(name, number, timestamp, int(step)))
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk, synchronous=True)

    return log


def log_artifact(
    run_id: str, path: str | Path, artifact_path: str | None = None, *, tracking_uri: str | None = None
) -> None:
    """Log a file, or a directory's contents, under `artifact_path` of the run."""
    path = Path(path)
    client = _client(tracking_uri)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"{path}: no such file or directory to log")


def log_table(
    run_id: str,
    rows: Sequence[Mapping[str, Any]],
    artifact_file: str,
    *,
    tracking_uri: str | None = None,
) -> None:
    """Log rows (one dict each) as an MLflow table, shown in the UI's table/evaluation view.

    `artifact_file` ends in `.json` (or `.parquet`). MLflow appends to a table that exists already,
    so a retried stage that logs the same file again adds its rows.
    """
    _client(tracking_uri).log_table(run_id, data=pd.DataFrame(list(rows)), artifact_file=artifact_file)


def log_dataset(
    run_id: str,
    data: pd.DataFrame | str | Path,
    name: str,
    digest: str,
    context: str,
    *,
    source: str | Path | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Record a dataset as an input of the run, with our digest and a context (train, validation...).

    A frame is logged with its schema and row count (source: `source` if given); a path is logged as
    a reference to the file. MLflow caps dataset digests at 36 characters: a longer digest is cut
    there and kept whole in the input tag `rft.digest`.
    """
    import mlflow.data
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = _client(tracking_uri)
    short = digest[:_MAX_DATASET_DIGEST]
    with warnings.catch_warnings():
        # The local-file source is registered twice by MLflow itself and it warns about that.
        warnings.simplefilter("ignore", UserWarning)
        if isinstance(data, (str, Path)):
            location = data if isinstance(data, str) and "://" in data else str(Path(data).resolve())
            dataset = MetaDataset(source=resolve_dataset_source(location), name=name, digest=short)
        else:
            src = resolve_dataset_source(str(Path(source).resolve())) if source is not None else None
            dataset = mlflow.data.from_pandas(data, source=src, name=name, digest=short)
    tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
    if short != digest:
        tags.append(InputTag(key="rft.digest", value=digest))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)])


# --------------------------------------------------------------------------- models


_FORMAT_FULL = "full"
_FORMAT_ADAPTER = "lora_adapter"
_META_FORMAT = "rft_format"
_META_BASE = "rft_base_model"


class _TextGenerator(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a logged model (`mlflow.pyfunc.load_model`, `mlflow models serve`):
    prompts in, greedy completions out. The class is pickled by reference, so loading a model this
    way needs rft installed; `load_model` reads the saved files and unpickles nothing."""

    def __init__(self, fmt: str, base_model: str | None) -> None:
        self.fmt = fmt
        self.base_model = base_model

    def load_context(self, context: Any) -> None:
        base = context.artifacts.get("base_model", self.base_model)
        self.model, self.tokenizer = _load_pretrained(context.artifacts["model"], self.fmt, base)

    # The input is hinted as a DataFrame because MLflow infers no signature from that hint: one
    # inferred from `list[str]` would have no params schema and drop `max_new_tokens`, which
    # `_signature()` declares. (Without any hint MLflow warns at class definition.)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        import torch

        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        limit = getattr(self.model.config, "max_position_embeddings", None)
        outputs = []
        for prompt in prompts:
            ids = self.tokenizer(str(prompt), return_tensors="pt")
            length = ids["input_ids"].shape[1]
            # A tiny model's context is short; generating past it gives garbage or an error.
            budget = max_new_tokens if limit is None else max(0, min(max_new_tokens, limit - length))
            with torch.no_grad():
                out = self.model.generate(**ids, max_new_tokens=budget, do_sample=False)
            outputs.append(self.tokenizer.decode(out[0, length:], skip_special_tokens=True))
        return outputs


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
    )


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()


def _load_pretrained(model_path: str | Path, fmt: str, base_model: str | Path | None) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Weights come back in the dtype they were saved in (transformers 5 does this by default;
    # 4.x would upcast a bfloat16 checkpoint to float32 and change the logits).
    dtype = {} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": "auto"}
    model_path = Path(model_path)
    if fmt == _FORMAT_ADAPTER:
        from peft import PeftModel

        if base_model is None:
            raise TrackingError(f"{model_path}: a LoRA adapter was logged without its base model")
        base = AutoModelForCausalLM.from_pretrained(str(base_model), **dtype)
        model = PeftModel.from_pretrained(base, str(model_path))
        tokenizer_source = model_path if _has_tokenizer(model_path) else str(base_model)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **dtype)
        tokenizer_source = model_path
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(tokenizer_source))


def _pip_requirements(adapter: bool) -> list[str]:
    # Given explicitly: MLflow's inference would import-trace the model and, for transformers,
    # add torchvision. torch gets a floor, not a pin, so a CUDA or CPU build both satisfy it.
    from importlib.metadata import version

    def base(pkg: str) -> str:
        return version(pkg).split("+", 1)[0]

    reqs = [
        f"mlflow=={base('mlflow')}",
        f"torch>={base('torch')}",
        f"transformers=={base('transformers')}",
        f"tokenizers=={base('tokenizers')}",
    ]
    if adapter:
        reqs.append(f"peft=={base('peft')}")
    return reqs


def log_model(
    run_id: str,
    model_dir: str | Path,
    *,
    base_model: str | None = None,
    name: str = "model",
    tracking_uri: str | None = None,
) -> str:
    """Log a `save_pretrained` directory as a model of the run; return its `models:/<id>` URI.

    `model_dir` is a full model with its tokenizer, or a LoRA adapter (it has adapter_config.json).
    An adapter needs `base_model`: a local directory (copied into the logged model, so the model
    reloads even when that directory is gone) or a hub id (recorded; reloading fetches it). The
    adapter's own `base_model_name_or_path` is never trusted: loading an adapter on the wrong base
    silently gives another model. The model also loads as `runs:/<run_id>/<name>`.
    """
    from mlflow.models import Model

    model_dir = Path(model_dir)
    adapter = (model_dir / "adapter_config.json").is_file()
    if not adapter and not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no config.json or adapter_config.json; expected a save_pretrained directory"
        )
    if adapter and base_model is None:
        raise ValueError(f"{model_dir} is a LoRA adapter: give base_model (a local directory or hub id)")
    if not adapter and base_model is not None:
        raise ValueError(f"{model_dir} is a full model: base_model is only for LoRA adapters")
    if not adapter and not _has_tokenizer(model_dir):
        raise ValueError(f"{model_dir}: no tokenizer files; save the tokenizer into the model directory")

    client = _client(tracking_uri)
    fmt = _FORMAT_ADAPTER if adapter else _FORMAT_FULL
    artifacts = {"model": str(model_dir.resolve())}
    metadata = {_META_FORMAT: fmt}
    if base_model is not None:
        metadata[_META_BASE] = base_model
        if Path(base_model).is_dir():
            artifacts["base_model"] = str(Path(base_model).resolve())
    experiment_id = client.get_run(run_id).info.experiment_id
    # Created here so that it belongs to the run's experiment: Model.log would otherwise put it in
    # the fluent "current" experiment (Default, artifacts under ./mlruns of the cwd).
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    with warnings.catch_warnings():
        # No input example on purpose: MLflow would run generation with it while logging.
        warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=_TextGenerator(fmt, None if "base_model" in artifacts else base_model),
            artifacts=artifacts,
            pip_requirements=_pip_requirements(adapter),
            signature=_signature(),
            metadata=metadata,
        )
    return info.model_uri


def download_model(
    model_uri: str, dst_path: str | Path | None = None, *, tracking_uri: str | None = None
) -> Path:
    """A local directory holding the logged model (runs:/, models:/<id>, models:/NAME/V, models:/NAME@ALIAS).

    Without `dst_path`, a model in a local store may be returned in place: treat it as read-only.
    """
    configure(tracking_uri)
    if dst_path is not None:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=None if dst_path is None else str(dst_path)
        )
    except MlflowException as exc:
        raise RegistryError(f"cannot fetch model {model_uri}: {exc.message}") from None
    return Path(local)


def load_model(model_uri: str, *, tracking_uri: str | None = None) -> tuple[Any, Any]:
    """`(model, tokenizer)` of a model logged by `log_model`, in eval mode, exactly as it was saved.

    A LoRA adapter comes back as a `PeftModel` on its recorded base model.
    """
    from mlflow.models import Model

    local = download_model(model_uri, tracking_uri=tracking_uri)
    spec = Model.load(str(local / "MLmodel"))
    fmt = (spec.metadata or {}).get(_META_FORMAT)
    if fmt not in (_FORMAT_FULL, _FORMAT_ADAPTER):
        raise TrackingError(f"{model_uri} was not logged by rft_core.tracking.log_model")
    saved = spec.flavors["python_function"]["artifacts"]
    base: str | Path | None = None
    if "base_model" in saved:
        base = local / saved["base_model"]["path"]
    elif fmt == _FORMAT_ADAPTER:
        base = spec.metadata.get(_META_BASE)
    return _load_pretrained(local / saved["model"]["path"], fmt, base)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class GateDecision:
    """What `promotion_gate` decided for a version, and on what numbers."""

    promoted: bool
    reason: str
    challenger_value: float | None
    champion_version: int | None
    champion_value: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _get_registered_model(client: MlflowClient, name: str) -> Any:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            raise RegistryError(f"no registered model named {name!r}") from None
        raise


def _get_version(client: MlflowClient, name: str, version: int | str) -> Any:
    _get_registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _not_found(exc):
            raise RegistryError(f"registered model {name!r} has no version {version}") from None
        raise


def _champion(client: MlflowClient, name: str) -> int | None:
    version = _get_registered_model(client, name).aliases.get(ALIAS_CHAMPION)
    return None if version is None else int(version)


def champion_version(name: str, *, tracking_uri: str | None = None) -> int | None:
    """The version alias `champion` of `name` points at, or None."""
    return _champion(_client(tracking_uri), name)


def _inherited_tag(client: MlflowClient, run_id: str, key: str) -> str | None:
    """A tag of the run, else of its parent (stage runs inherit pipeline-level facts)."""
    run = client.get_run(run_id)
    if key in run.data.tags:
        return run.data.tags[key]
    parent = run.data.tags.get(TAG_PARENT)
    return client.get_run(parent).data.tags.get(key) if parent else None


def register_model(
    model_uri: str,
    name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    data_digest: str | None = None,
    config_digest: str | None = None,
    tracking_uri: str | None = None,
) -> int:
    """Register `model_uri` as a new version of `name`, tag it, point alias `challenger` at it.

    Tags: `metric.<key>` for each validation metric (the gate reads these), `data_digest` (of the
    validation data the metrics were measured on), `config_digest` and `git_commit` (given, else
    taken from the run `run_id` or its pipeline run), plus `tags`.
    """
    client = _client(tracking_uri)
    version_tags: dict[str, str] = {}
    if run_id is not None:
        for key, tag in (
            (TAG_CONFIG_DIGEST, TAG_CONFIG_DIGEST),
            (TAG_DATA_DIGEST, TAG_DATA_DIGEST),
            (TAG_GIT_COMMIT, TAG_GIT_COMMIT_RUN),
        ):
            value = _inherited_tag(client, run_id, tag)
            if value:
                version_tags[key] = value
    if config_digest is not None:
        version_tags[TAG_CONFIG_DIGEST] = config_digest
    if data_digest is not None:
        version_tags[TAG_DATA_DIGEST] = data_digest
    if TAG_GIT_COMMIT not in version_tags and (commit := git_commit()):
        version_tags[TAG_GIT_COMMIT] = commit
    for key, value in (metrics or {}).items():
        version_tags[METRIC_TAG_PREFIX + key] = repr(float(value))
    version_tags.update({k: str(v) for k, v in (tags or {}).items()})
    mv = mlflow.register_model(model_uri, name, tags=version_tags)
    version = int(mv.version)
    client.set_registered_model_alias(name, ALIAS_CHALLENGER, str(version))
    return version


def set_alias(name: str, alias: str, version: int | str, *, tracking_uri: str | None = None) -> None:
    """Point `alias` of registered model `name` at `version` (checked to exist)."""
    client = _client(tracking_uri)
    _get_version(client, name, version)
    client.set_registered_model_alias(name, alias, str(version))


def _metric_tags(tags: Mapping[str, str]) -> dict[str, float]:
    metrics = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            with contextlib.suppress(ValueError):
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(value)
    return metrics


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


@contextlib.contextmanager
def _registry_lock(
    client: MlflowClient, name: str, *, lease_s: float = 60.0, timeout_s: float = 120.0
) -> Iterator[str]:
    """Hold the promotion lock of registered model `name` (yield the owner id).

    The lock is the registered model `<name>.rft-lock`: creating a registered model is the one
    atomic test-and-set MLflow's API offers (the store's unique key on the name; a second create
    fails with RESOURCE_ALREADY_EXISTS), on a sqlite file and through a tracking server alike.
    Tags and a tag-then-read-back lease are not: two writers can both read back their own tag.
    The lock model carries its owner and an expiry; a lock past its expiry (its holder died) is
    deleted by the next waiter. Waiters retry with jittered exponential backoff up to `timeout_s`.
    The lock is held only for the re-read of the champion and the alias/tag writes.
    """
    lock_name = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            client.create_registered_model(
                lock_name,
                tags={"rft.lock.owner": owner, "rft.lock.expires": f"{time.time() + lease_s:.3f}"},
                description=f"Transient promotion lock of {name!r} (rft); safe to delete if stale.",
            )
            break
        except MlflowException as exc:
            # The sqlite/SQL store answers a lost race with "not found" when the holder released
            # the lock between our failed insert and the store's look-up of the existing row.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS") and not _not_found(exc):
                raise
        holder = None
        try:
            held = client.get_registered_model(lock_name)
            holder = held.tags.get("rft.lock.owner")
            if float(held.tags.get("rft.lock.expires", "0")) < time.time():
                client.delete_registered_model(lock_name)
                continue
        except MlflowException as exc:
            if not _not_found(exc):  # released between our create and our read: try again now
                raise
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"timed out after {timeout_s:.0f}s waiting for the lock {lock_name!r} held by {holder}"
            )
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)
    try:
        yield owner
    finally:
        with contextlib.suppress(MlflowException):
            if client.get_registered_model(lock_name).tags.get("rft.lock.owner") == owner:
                client.delete_registered_model(lock_name)


def _history(client: MlflowClient, name: str) -> list[int]:
    raw = _get_registered_model(client, name).tags.get(HISTORY_TAG)
    return [int(v) for v in json.loads(raw)] if raw else []


def _set_history(client: MlflowClient, name: str, history: list[int]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_LIMIT:]))


def _evaluated(metrics: Mapping[str, float], metric: str) -> float:
    """The gate's metric out of an evaluator's result (full key, or the key without its prefix)."""
    for key in (metric, metric.rsplit("/", 1)[-1]):
        if key in metrics:
            return float(metrics[key])
    raise RegistryError(f"the evaluator returned no {metric!r} (it returned {sorted(metrics)})")


def _decide(
    client: MlflowClient,
    name: str,
    version: int,
    challenger_value: float | None,
    champion: int | None,
    *,
    metric: str,
    greater_is_better: bool,
    min_improvement: float,
    data_digest: str | None,
    evaluate: Callable[[str], Mapping[str, float]] | None,
    force: bool,
) -> GateDecision:
    """The decision against `champion`, without writing anything."""
    champion_value: float | None = None
    champion_digest: str | None = None
    if champion is not None:
        champion_tags = client.get_model_version(name, str(champion)).tags
        champion_digest = champion_tags.get(TAG_DATA_DIGEST)
        if data_digest is not None and champion_digest == data_digest:
            champion_value = _metric_tags(champion_tags).get(metric)

    def decision(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(promoted, reason, challenger_value, champion, champion_value)

    if force:
        return decision(True, f"forced over champion {'v' + str(champion) if champion else '(none)'}")
    if challenger_value is None:
        return decision(
            False,
            f"version {version} has no {metric!r} tag ({METRIC_TAG_PREFIX}{metric}); nothing to compare",
        )
    if champion is None:
        return decision(True, f"no champion yet; {metric}={_fmt(challenger_value)}")
    if champion_value is None:
        same_data = data_digest is not None and champion_digest == data_digest
        if evaluate is None:
            why = (
                f"has no {metric!r} tag"
                if same_data
                else f"was validated on data {champion_digest or '(unknown)'}, the challenger on {data_digest or '(unknown)'}"
            )
            return decision(
                False,
                f"champion v{champion} {why}, and no evaluator was given to score it on the current data",
            )
        champion_value = _evaluated(evaluate(f"models:/{name}/{champion}"), metric)
    gain = (challenger_value - champion_value) * (1 if greater_is_better else -1)
    comparison = (
        f"{metric} {_fmt(challenger_value)} vs champion v{champion} {_fmt(champion_value)} "
        f"(gain {gain:+.6g}, min_improvement {min_improvement:g})"
    )
    if gain > min_improvement:
        return decision(True, f"better: {comparison}")
    return decision(False, f"not better by more than min_improvement: {comparison}")


def promotion_gate(
    name: str,
    version: int | str,
    *,
    metric: str,
    greater_is_better: bool = True,
    min_improvement: float = 0.0,
    data_digest: str | None = None,
    evaluate: Callable[[str], Mapping[str, float]] | None = None,
    force: bool = False,
    tracking_uri: str | None = None,
    lock_timeout_s: float = 120.0,
) -> GateDecision:
    """Move alias `champion` to `version` if it beats the current champion; record why either way.

    The challenger's value is its tag `metric.<metric>`. The champion's value must come from the
    same validation data: its tag when its `data_digest` equals `data_digest` (default: the
    challenger's own `data_digest` tag), else `evaluate(models:/NAME/V)` scores it on the current
    data; with no evaluator the gate refuses. It promotes when the gain exceeds `min_improvement`,
    when there is no champion, or with `force`. The version gets tags `gate.decision` (promoted or
    refused), `gate.reason`, `gate.champion_version`, `gate.champion_value`, `gate.metric`.

    The comparison (and any evaluation) runs outside the lock; inside it the champion is read again
    and, if another promotion moved it meanwhile, the decision is made again against the new one.
    """
    client = _client(tracking_uri)
    version = int(version)
    mv = _get_version(client, name, version)
    challenger_value = _metric_tags(mv.tags).get(metric)
    data_digest = data_digest or mv.tags.get(TAG_DATA_DIGEST)
    for _ in range(20):
        champion = _champion(client, name)
        if champion == version:
            return GateDecision(
                False,
                f"version {version} is already the champion",
                challenger_value,
                champion,
                challenger_value,
            )
        decision = _decide(
            client,
            name,
            version,
            challenger_value,
            champion,
            metric=metric,
            greater_is_better=greater_is_better,
            min_improvement=min_improvement,
            data_digest=data_digest,
            evaluate=evaluate,
            force=force,
        )
        with _registry_lock(client, name, timeout_s=lock_timeout_s):
            if _champion(client, name) != champion:
                continue  # another promotion won the race meanwhile: decide against its result
            if decision.promoted:
                client.set_registered_model_alias(name, ALIAS_CHAMPION, str(version))
                if champion is not None:
                    _set_history(client, name, [*_history(client, name), champion])
            for key, value in {
                GATE_DECISION: "promoted" if decision.promoted else "refused",
                GATE_REASON: decision.reason,
                GATE_METRIC: metric,
                GATE_CHAMPION_VERSION: "none" if champion is None else str(champion),
                GATE_CHAMPION_VALUE: _fmt(decision.champion_value),
                GATE_TIME: datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }.items():
                client.set_model_version_tag(name, str(version), key, value)
        return decision
    raise RegistryError(
        f"the champion of {name!r} kept changing during 20 attempts to gate version {version}"
    )


def rollback(name: str, *, tracking_uri: str | None = None, lock_timeout_s: float = 120.0) -> int:
    """Move `champion` back to the previous champion; return that version.

    Past champions whose versions were deleted are skipped. The demoted version is tagged
    `rollback.demoted_at`.
    """
    client = _client(tracking_uri)
    with _registry_lock(client, name, timeout_s=lock_timeout_s):
        current = _champion(client, name)
        if current is None:
            raise RegistryError(f"registered model {name!r} has no champion to roll back from")
        history = _history(client, name)
        while history:
            previous = history.pop()
            try:
                client.get_model_version(name, str(previous))
            except MlflowException as exc:
                if _not_found(exc):
                    continue
                raise
            if previous == current:
                continue
            client.set_registered_model_alias(name, ALIAS_CHAMPION, str(previous))
            _set_history(client, name, history)
            client.set_model_version_tag(
                name, str(current), ROLLED_BACK, datetime.now(timezone.utc).isoformat(timespec="seconds")
            )
            return previous
        raise RegistryError(
            f"registered model {name!r}: champion v{current} has no previous champion to roll back to"
        )


def list_versions(name: str, *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of `name`, oldest first: version, aliases, metrics, digests, gate decision,
    creation time, run id, source."""
    client = _client(tracking_uri)
    registered = _get_registered_model(client, name)
    aliases: dict[int, list[str]] = {}
    for alias, version in registered.aliases.items():
        aliases.setdefault(int(version), []).append(alias)
    escaped = name.replace("'", "\\'")
    versions = []
    page_token = None
    while True:
        page = client.search_model_versions(f"name = '{escaped}'", max_results=1000, page_token=page_token)
        versions.extend(page)
        page_token = page.token
        if not page_token:
            break
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        tags = mv.tags or {}
        rows.append(
            {
                "version": int(mv.version),
                "aliases": sorted(aliases.get(int(mv.version), [])),
                "metrics": _metric_tags(tags),
                "data_digest": tags.get(TAG_DATA_DIGEST),
                "config_digest": tags.get(TAG_CONFIG_DIGEST),
                "git_commit": tags.get(TAG_GIT_COMMIT),
                "gate_decision": tags.get(GATE_DECISION),
                "gate_reason": tags.get(GATE_REASON),
                "created": _iso(mv.creation_timestamp),
                "run_id": mv.run_id,
                "source": mv.source,
            }
        )
    return rows
