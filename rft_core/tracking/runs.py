"""MLflow runs of rft: opening and closing them, and what goes into them (params, tags, metrics,
artifacts, tables, datasets).

One parent run per pipeline run, one child run per stage. `pipeline_run` and `stage_run` are the
one place runs are opened and closed: both reopen the run of an earlier attempt (a retried flow
run, a retried stage) and end it FINISHED, or FAILED when their block raises.

Stages run as separate Prefect tasks (other processes, retries), so nothing here relies on MLflow's
fluent "active run": every call names its run by id and goes through `MlflowClient`. Training code
receives the callable returned by `metrics_logger` (`log(metrics, step)`) and never sees MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd  # already imported by mlflow; needed at runtime for a type hint MLflow evaluates
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from rft_core.lifecycle import owner_alive, process_identity
from rft_core.tracking.tags import (
    INPUT_FULL_DIGEST,
    KIND_PIPELINE,
    TAG_ATTEMPTS,
    TAG_CONFIG_DIGEST,
    TAG_ENDED_BECAUSE,
    TAG_FLOW_RUN,
    TAG_GIT_COMMIT_RUN,
    TAG_GRADER_SANDBOX,
    TAG_KIND,
    TAG_NOTE,
    TAG_OWNER_HOST,
    TAG_OWNER_PID,
    TAG_OWNER_STARTED,
    TAG_PARENT,
    TAG_REPLACED_BY,
    TAG_REPLACES,
    TAG_RERUN_OF,
    TAG_RUN_NAME,
    TAG_STAGE,
    TAG_STARTED_AS,
)
from rft_core.tracking.uri import (
    check_tracking_available,
    configure,
    is_http,
    local_artifact_root,
    mlflow_client,
    resolve_tracking_uri,
    ui_command,
)

if TYPE_CHECKING:
    from rft_core.config import RFTConfig

logger = logging.getLogger("rft.tracking")

# MLflow's request limits (mlflow.utils.validation): batches are split to stay under them.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_MAX_KEY = 250
_MAX_DATASET_DIGEST = 36
_MAX_TAG_VALUE = 8000  # MLflow's limit is 8000 characters

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


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


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- opening and closing


def config_tags(cfg: RFTConfig) -> dict[str, str]:
    """The tags a parent run takes from its config; the one place to add another (a setting people
    filter runs by or must see on the run, e.g. the grader's sandbox), with its name in `tags.py`."""
    return {TAG_CONFIG_DIGEST: cfg.digest(), TAG_GRADER_SANDBOX: cfg.grader.sandbox}


@contextlib.contextmanager
def pipeline_run(
    cfg: RFTConfig,
    *,
    tracking_uri: str | None = None,
    flow_run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """The parent run of a pipeline (or of another flow run) for the block; yields its id.

    With `flow_run_id` (the orchestrator's id of this run), the run opened for it by an earlier
    attempt is reopened, so a retried flow run continues its run; otherwise a new run is started
    (`start_pipeline_run`) and tagged with it. Ends FINISHED, or FAILED when the block raises.
    """
    uri = tracking_uri or resolve_tracking_uri(cfg)
    run_id = find_pipeline_run(cfg.experiment, flow_run_id, tracking_uri=uri) if flow_run_id else None
    if run_id is not None:
        reopen_run(run_id, tracking_uri=uri)
    else:
        keyed = {TAG_FLOW_RUN: flow_run_id} if flow_run_id else {}
        run_id = start_pipeline_run(cfg, tracking_uri=uri, run_name=run_name, tags={**keyed, **(tags or {})})
    with _ended(run_id, uri):
        try:
            end_abandoned_runs(run_id, tracking_uri=uri)
        except MlflowException as exc:  # housekeeping: never the reason a pipeline fails
            logger.warning("could not end the runs that killed processes left open: %s", exc)
        yield run_id


@contextlib.contextmanager
def stage_run(
    parent_run_id: str,
    stage: str,
    params: Mapping[str, Any] | None = None,
    *,
    tracking_uri: str | None = None,
) -> Iterator[str]:
    """The child run of `stage` for the block (`start_stage_run`: reopened on a retry); yields its
    id. Ends FINISHED, or FAILED when the block raises."""
    uri = configure(tracking_uri)
    run_id = start_stage_run(parent_run_id, stage, params, tracking_uri=uri)
    with _ended(run_id, uri):
        yield run_id


@contextlib.contextmanager
def _ended(run_id: str, uri: str) -> Iterator[None]:
    """End the run when the block ends: FINISHED, FAILED when it raises, KILLED when it was
    interrupted (Ctrl-C, SIGTERM, a stop requested at a training step: `KeyboardInterrupt`)."""
    try:
        yield
    except BaseException as exc:
        # Not when the tracking store is what failed: ending the run would wait minutes on
        # MLflow's retries and then replace the original error with its own.
        with contextlib.suppress(Exception):
            check_tracking_available(uri)
            if isinstance(exc, KeyboardInterrupt):
                why = f"stopped on request: {str(exc) or type(exc).__name__}"
                set_tags(run_id, {TAG_ENDED_BECAUSE: why}, tracking_uri=uri)
                end_run(run_id, "KILLED", tracking_uri=uri)
            else:
                # The error, on the run: a stage that failed on one of several processes names it here.
                why = f"failed: {type(exc).__name__}: {exc}"[:_MAX_TAG_VALUE]
                set_tags(run_id, {TAG_ENDED_BECAUSE: why}, tracking_uri=uri)
                end_run(run_id, "FAILED", tracking_uri=uri)
        raise
    end_run(run_id, "FINISHED", tracking_uri=uri)


def owner_tags() -> dict[str, str]:
    """The tags naming this process as the one that keeps a run open (`end_abandoned_runs`)."""
    me = process_identity()
    return {TAG_OWNER_HOST: me["host"], TAG_OWNER_PID: me["pid"], TAG_OWNER_STARTED: me["started"]}


def end_abandoned_runs(replaced_by: str, *, tracking_uri: str | None = None) -> list[str]:
    """End KILLED the runs of `replaced_by`'s experiment left RUNNING by a process of this host
    that no longer exists (killed: `kill -9`, out of memory, power loss), and return their ids.

    A run is abandoned when its owner tags (`owner_tags`) name a process of this host that is gone,
    or a pid now held by a process that started later; runs of live processes and of other hosts
    are left alone. Each gets the reason (`rft.ended_because`) and, when it ran the same config,
    the run that replaces it (`rft.replaced_by`); `replaced_by` lists the pipeline runs it
    replaces (`rft.replaces`). Their metrics stay where they were logged: the new run continues
    from the checkpoints, and these links join the two."""
    client = mlflow_client(tracking_uri)
    new = client.get_run(replaced_by)
    digest = new.data.tags.get(TAG_CONFIG_DIGEST)
    running = client.search_runs(
        [new.info.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    ended, replaced = [], []
    for run in running:
        tags = run.data.tags
        owner = {"host": tags.get(TAG_OWNER_HOST, ""), "pid": tags.get(TAG_OWNER_PID, ""),
                 "started": tags.get(TAG_OWNER_STARTED, "")}
        if run.info.run_id == replaced_by or owner_alive(owner) is not False:
            continue
        why = {TAG_ENDED_BECAUSE: f"its process {owner['pid']} on {owner['host']} ended without closing it "
               f"(killed); found by run {replaced_by}"}
        if digest is not None and tags.get(TAG_CONFIG_DIGEST) == digest:
            why[TAG_REPLACED_BY] = replaced_by
            if tags.get(TAG_KIND) == KIND_PIPELINE:
                replaced.append(run.info.run_id)
        set_tags(run.info.run_id, why, tracking_uri=tracking_uri)
        end_run(run.info.run_id, "KILLED", tracking_uri=tracking_uri)
        ended.append(run.info.run_id)
    if replaced:
        previous = new.data.tags.get(TAG_REPLACES)
        set_tags(replaced_by, {TAG_REPLACES: ",".join(filter(None, [previous, *replaced]))}, tracking_uri=tracking_uri)
    return ended


def ensure_experiment(name: str, *, tracking_uri: str | None = None) -> str:
    """The id of experiment `name`, created (or restored from deletion) when needed."""
    uri = configure(tracking_uri)
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=local_artifact_root(uri))
        except MlflowException as exc:
            # Another stage or process created it between our read and our create.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def start_pipeline_run(
    cfg: RFTConfig,
    *,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create the parent run of a pipeline run and return its id (`pipeline_run` also ends it).

    Experiment `cfg.experiment` (created if missing); name `run_name`, else `cfg.run_name`, else
    `rft-<config digest>`, also kept as tag `rft.run_name` (a rerun's name gets a suffix at its end:
    look runs up by the tag); tags: `config_tags(cfg)`, the git commit when there is one, then `tags`;
    the resolved config as the artifact `config.yaml`; every field as a param `section.key`.
    """
    uri = tracking_uri or resolve_tracking_uri(cfg)
    client = mlflow_client(uri)
    experiment_id = ensure_experiment(cfg.experiment, tracking_uri=uri)
    run_tags = {TAG_KIND: KIND_PIPELINE, **config_tags(cfg), **owner_tags()}
    commit = git_commit()
    if commit:
        run_tags[TAG_GIT_COMMIT_RUN] = commit
    run_tags.update(tags or {})
    name = run_name or cfg.run_name or f"rft-{cfg.digest()[:8]}"
    # The name as started stays a tag: `mark_rerun` adds a suffix to the name itself at the end.
    run = client.create_run(experiment_id, run_name=name, tags={**run_tags, TAG_STARTED_AS: name})
    run_id = run.info.run_id
    try:
        client.log_text(run_id, cfg.to_yaml(), "config.yaml")
        log_params(run_id, cfg.model_dump(mode="json"), tracking_uri=uri)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id


def find_pipeline_run(experiment: str, flow_run_id: str, *, tracking_uri: str | None = None) -> str | None:
    """The pipeline run started for Prefect flow run `flow_run_id` (a retried flow run continues
    it), or None."""
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{TAG_FLOW_RUN}` = '{flow_run_id}' and tags.`{TAG_KIND}` = '{KIND_PIPELINE}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def reopen_run(run_id: str, *, tracking_uri: str | None = None) -> None:
    """Set a finished or failed run back to RUNNING (its flow run is being retried), owned by this
    process from now on."""
    mlflow_client(tracking_uri).update_run(run_id, status="RUNNING")
    set_tags(run_id, owner_tags(), tracking_uri=tracking_uri)


_STAGE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def find_stage_run(parent_run_id: str, stage: str, *, tracking_uri: str | None = None) -> str | None:
    """The newest child run of `parent_run_id` for `stage`, or None."""
    if not _STAGE_NAME.match(stage):
        raise ValueError(f"stage name {stage!r}: use letters, digits, '_', '-', '.'")
    client = mlflow_client(tracking_uri)
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
    """The child run of `stage` under the pipeline run: reopened if it exists, else created
    (`stage_run` also ends it).

    A retried stage (a Prefect retry, a rerun of a failed flow) continues its run: status back to
    RUNNING, `rft.attempts` counted up, its metrics continue at the steps it logs. `reuse=False`
    always creates a new child run.
    """
    client = mlflow_client(tracking_uri)
    existing = find_stage_run(parent_run_id, stage, tracking_uri=tracking_uri) if reuse else None
    if existing is not None:
        attempts = int(client.get_run(existing).data.tags.get(TAG_ATTEMPTS, "1")) + 1
        client.update_run(existing, status="RUNNING")
        set_tags(existing, {TAG_ATTEMPTS: str(attempts), **owner_tags()}, tracking_uri=tracking_uri)
        run_id = existing
    else:
        parent = client.get_run(parent_run_id)
        tags = {TAG_PARENT: parent_run_id, TAG_STAGE: stage, TAG_ATTEMPTS: "1", **owner_tags()}
        for key in (TAG_CONFIG_DIGEST, TAG_GIT_COMMIT_RUN):
            if key in parent.data.tags:
                tags[key] = parent.data.tags[key]
        run_id = client.create_run(parent.info.experiment_id, run_name=stage, tags=tags).info.run_id
    if params:
        log_params(run_id, params, tracking_uri=tracking_uri)
    return run_id


def end_run(run_id: str, status: RunStatus = "FINISHED", *, tracking_uri: str | None = None) -> None:
    """Mark a run terminated with `status` (FINISHED, FAILED or KILLED)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status {status!r}: expected FINISHED, FAILED or KILLED")
    mlflow_client(tracking_uri).set_terminated(run_id, status=status)


def run_tags(run_id: str, *, tracking_uri: str | None = None) -> dict[str, str]:
    """The tags of a run."""
    return dict(mlflow_client(tracking_uri).get_run(run_id).data.tags)


_RERUN_SUFFIX = re.compile(r" \((cached rerun|rerun, reused [^)]*)\)$")


def mark_rerun(
    run_id: str,
    reused: Mapping[str, tuple[str, str]],
    *,
    ran: Sequence[str] = (),
    tracking_uri: str | None = None,
) -> str:
    """Say on pipeline run `run_id` that it reused the results of stages of earlier pipeline runs
    (`reused`: stage -> (its stage run, that run's pipeline run)), and which stages it ran itself
    (`ran`). A child run has one parent, so the stage runs stay where they are; this run links them:

    - its name gets ` (cached rerun)` (nothing ran but what is never cached) or
      ` (rerun, reused validate, split, ...)`, so two runs of one config differ in the runs table;
    - tag `rft.rerun_of`: the pipeline runs whose stages it reused (`rft.reused.<stage>`: each run);
    - its description (MLflow's note, on the run's page) lists each reused stage with a link to the
      run that computed it.

    Returns the new run name."""
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    parents = list(dict.fromkeys(parent for _, parent in reused.values()))
    base = _RERUN_SUFFIX.sub("", run.info.run_name or "")
    name = f"{base} (cached rerun)" if not ran else f"{base} (rerun, reused {', '.join(reused)})"

    def link(other: str) -> str:
        found = client.get_run(other)
        return f"[{found.info.run_name or other}](#/experiments/{found.info.experiment_id}/runs/{other}) (`{other}`)"

    lines = [
        f"**Rerun of {', '.join(link(parent) for parent in parents)}**: the results of these stages were "
        "reused from the cache, not computed again; their metrics, samples and models are on the runs "
        "that computed them:",
        "",
        *(f"- `{stage}`: {link(stage_run)}" for stage, (stage_run, _) in reused.items()),
        "",
        f"Ran in this run: {', '.join(f'`{stage}`' for stage in ran) if ran else 'nothing but the training curve'}.",
    ]
    if "evaluate" in reused:
        lines.append("The `eval/*` metrics of this run are those of the reused evaluation.")
    set_tags(run_id, {TAG_RERUN_OF: ",".join(parents), TAG_NOTE: "\n".join(lines), TAG_RUN_NAME: name},
             tracking_uri=tracking_uri)
    return name


def run_link(run_id: str, tracking_uri: str) -> str:
    """Where a person looks at the run: its page on a tracking server, else the `mlflow ui` command."""
    if is_http(tracking_uri):
        run = mlflow_client(tracking_uri).get_run(run_id)
        return f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"`{ui_command(tracking_uri)}`, then open run {run_id}"


# --------------------------------------------------------------------------- params, tags, metrics


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
    client = mlflow_client(tracking_uri)
    entries = [Param(_param_key(k), _param_value(v)) for k, v in _flatten(params).items()]
    for chunk in _chunks(entries, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk, synchronous=True)


def set_tags(run_id: str, tags: Mapping[str, Any], *, tracking_uri: str | None = None) -> None:
    """Set (or overwrite) run tags; values are converted with str()."""
    client = mlflow_client(tracking_uri)
    entries = [RunTag(k, str(v)) for k, v in tags.items()]
    for chunk in _chunks(entries, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=chunk, synchronous=True)


def metrics_logger(
    run_id: str, prefix: str, *, tracking_uri: str | None = None
) -> Callable[[Mapping[str, Any], int], None]:
    """A `log(metrics, step)` for training code: keys become `<prefix>/<key>`, one request per call.

    Values may be floats, ints, bools, 0-d tensors or numpy scalars; None values are skipped so a
    caller can pass metrics that only exist on some steps. A key that already carries the prefix is
    kept as it is.
    """
    client = mlflow_client(tracking_uri)
    head = prefix.strip("/")

    def log(metrics: Mapping[str, Any], step: int) -> None:
        timestamp = int(time.time() * 1000)
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


def log_metrics_once(
    run_id: str, metrics: Mapping[str, Any], *, step: int = 0, tracking_uri: str | None = None
) -> None:
    """Log `metrics` (keys as given) at one step."""
    metrics_logger(run_id, "", tracking_uri=tracking_uri)(metrics, step)


# --------------------------------------------------------------------------- artifacts, tables, datasets


def log_artifact(
    run_id: str, path: str | Path, artifact_path: str | None = None, *, tracking_uri: str | None = None
) -> None:
    """Log a file, or a directory's contents, under `artifact_path` of the run."""
    path = Path(path)
    client = mlflow_client(tracking_uri)
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
    mlflow_client(tracking_uri).log_table(run_id, data=pd.DataFrame(list(rows)), artifact_file=artifact_file)


def table_logger(
    run_id: str, artifact_file: str, *, key: str = "iteration", tracking_uri: str | None = None
) -> Callable[[Sequence[Mapping[str, Any]]], None]:
    """A `log_rows(rows)` for training code: each call appends its rows to the one table
    `artifact_file` of the run (`log_table`: MLflow appends to a table that exists).

    Rows whose `key` value the table already holds are not logged again: a retried stage that
    continues its run redoes the iterations after its last checkpoint with the same seeded
    samples, and the table keeps one copy of each.
    """
    client = mlflow_client(tracking_uri)
    logged: set[Any] = set()
    folder = posixpath.dirname(posixpath.normpath(artifact_file)) or None
    if artifact_file in {a.path for a in client.list_artifacts(run_id, folder)}:
        experiment_id = client.get_run(run_id).info.experiment_id
        existing = client.load_table(experiment_id, artifact_file, run_ids=[run_id])
        if key in existing.columns:
            logged.update(existing[key].tolist())

    def log_rows(rows: Sequence[Mapping[str, Any]]) -> None:
        new = [row for row in rows if row[key] not in logged]
        if new:
            log_table(run_id, new, artifact_file, tracking_uri=tracking_uri)
            logged.update(row[key] for row in new)

    return log_rows


def artifact_link(run_id: str, artifact_path: str, tracking_uri: str) -> str:
    """Where a person finds an artifact of a run: its page on a tracking server, else the
    `mlflow ui` command and where to click."""
    if is_http(tracking_uri):
        run = mlflow_client(tracking_uri).get_run(run_id)
        return (
            f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
            f"/artifactPath/{artifact_path}"
        )
    return f"`{ui_command(tracking_uri)}`, then run {run_id}, Artifacts, {artifact_path}"


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

    client = mlflow_client(tracking_uri)
    short = digest[:_MAX_DATASET_DIGEST]
    with warnings.catch_warnings():
        # The local-file source is registered twice by MLflow itself and it warns about that; the
        # frame's schema, inferred when the entity is made, comes with a hint about integer columns
        # meant for model signatures (a data set record has no inputs to enforce it on).
        warnings.simplefilter("ignore", UserWarning)
        if isinstance(data, (str, Path)):
            location = data if isinstance(data, str) and "://" in data else str(Path(data).resolve())
            dataset = MetaDataset(source=resolve_dataset_source(location), name=name, digest=short)
        else:
            src = resolve_dataset_source(str(Path(source).resolve())) if source is not None else None
            dataset = mlflow.data.from_pandas(data, source=src, name=name, digest=short)
        entity = dataset._to_mlflow_entity()
    tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
    if short != digest:
        tags.append(InputTag(key=INPUT_FULL_DIGEST, value=digest))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset=entity, tags=tags)])
