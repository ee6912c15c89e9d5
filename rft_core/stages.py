"""The pipeline's stages as plain functions: validate, split, sft, rl, evaluate, register, promote,
and the picture of a run's training (`training_curve`).

Each stage takes the config and the small records of the stages before it, works in a directory of
its own named by its key, tracks itself in MLflow as a child run of the pipeline run (when one is
given), and returns a small JSON-serialisable record (paths, digests, metrics, run ids) for the
next stage. A stage's key hashes the config sections it reads, its inputs' digests and the code
version: the same key means the same result, so orchestration can cache on it, and a training
stage interrupted mid-way finds its checkpoints again in the same directory.

No Prefect here: `tasks/` wraps these functions, `bench/overhead.py` calls them directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rft_core import tracking
from rft_core.checkpoint import hash_of
from rft_core.config import RFTConfig
from rft_core.tracking import tags

logger = logging.getLogger("rft.stages")


# --------------------------------------------------------------------------- keys


def _code_version() -> str:
    """A digest of rft_core's source: editing the code invalidates cached stage results."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


CODE_VERSION = _code_version()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# The config fields each stage reads. A change elsewhere does not invalidate the stage: only what
# changes what a stage computes (its result, or whether it succeeds) enters its key. Nowhere: the
# experiment and run names, the top-level `seed` (no stage reads it), `tracking` and `registry`
# (where results are recorded, not what they are), `grader.workers` (how many processes grade),
# `*.checkpoint_interval` (a resumed run ends with the same weights as a straight one).
_SPLIT_FIELDS = ("val_fraction", "val_size", "seed", "max_items", "near_duplicate_threshold")
# The eval settings that validation during training reads (`evaluate.validation_metrics`): greedy
# completions of every item (or `max_items`), graded against `pass_threshold`, and with
# `sampled_validation` one sampled completion per item. `k` and `num_logged_samples` are the
# evaluate stage's alone.
_VALIDATION_FIELDS = ("max_items", "max_new_tokens", "batch_size", "pass_threshold", "sampled_validation")
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed")
_GRADING_FIELDS = ("timeout_s", "memory_mb", "sandbox", "max_error_share")


def grading_settings(cfg: RFTConfig) -> dict[str, Any]:
    """What decides a grade: the grader JSON itself (a file's content, not its path), the python
    grader's limits and isolation, and the error share past which a stage fails."""
    return {"spec": cfg.grader.resolved_spec(), **{name: getattr(cfg.grader, name) for name in _GRADING_FIELDS}}


def validation_settings(cfg: RFTConfig) -> dict[str, Any]:
    """What validation during a training stage reads (it picks the best checkpoint, and the RL
    guard acts on it): the eval fields above, the sampling fields when it samples, the grading,
    and the prompt cut (`rl.max_prompt_length`, which every rendering of a prompt shares)."""
    fields = _VALIDATION_FIELDS + (_SAMPLING_FIELDS if cfg.eval.sampled_validation else ())
    return {
        "eval": {name: getattr(cfg.eval, name) for name in fields},
        "grading": grading_settings(cfg),
        "max_prompt_length": cfg.rl.max_prompt_length,
    }


def model_settings(cfg: RFTConfig) -> dict[str, Any]:
    """The model section as training reads it: `model.tiny` only for the built-in tiny model, which
    also pretrains on documents of the synthetic task's family (`data.synthetic`)."""
    model = cfg.model.model_dump(mode="json")
    if cfg.model.name_or_path == "tiny":
        model["pretraining_family"] = cfg.data.synthetic.model_dump(mode="json")
    else:
        model.pop("tiny")
    return model


def _without(section: Any, *names: str) -> dict[str, Any]:
    return {key: value for key, value in section.model_dump(mode="json").items() if key not in names}


def validate_key(cfg: RFTConfig) -> str:
    data = cfg.data.model_dump(mode="json")
    for name in _SPLIT_FIELDS:
        data.pop(name)
    files = {}
    for name in ("train_path", "val_path"):
        path = getattr(cfg.data, name)
        if path is not None and Path(path).is_file():
            files[name] = file_digest(path)
    if cfg.data.train_path is not None:
        data.pop("synthetic")
    return hash_of("validate", data, files, numeric_grader(cfg), CODE_VERSION)


def split_key(cfg: RFTConfig, data: DataRecord) -> str:
    fields = {name: getattr(cfg.data, name) for name in _SPLIT_FIELDS}
    return hash_of("split", data.digest, fields, CODE_VERSION)


def sft_key(cfg: RFTConfig, split: SplitRecord) -> str:
    """The split, the model (and the tiny model's pretraining), the sft section, validation."""
    sft = _without(cfg.sft, "checkpoint_interval")
    return hash_of("sft", split.digest, model_settings(cfg), sft, validation_settings(cfg), CODE_VERSION)


def rl_key(cfg: RFTConfig, sft: ModelRecord) -> str:
    """The model RL starts from, the rl section (its guard and validation interval included: they
    decide the weights it ends with), the model section, the grader (the reward) and validation."""
    rl = _without(cfg.rl, "checkpoint_interval")
    return hash_of("rl", sft.key, rl, model_settings(cfg), validation_settings(cfg), CODE_VERSION)


def evaluate_key(cfg: RFTConfig, models: dict[str, ModelRecord]) -> str:
    """The evaluated models, the whole eval section, the grading and the prompt cut."""
    settings = {"eval": cfg.eval.model_dump(mode="json"), "grading": grading_settings(cfg),
                "max_prompt_length": cfg.rl.max_prompt_length}
    return hash_of("evaluate", {k: m.key for k, m in models.items()}, settings, CODE_VERSION)


def register_key(cfg: RFTConfig, evaluation: EvalRecord, tracking_uri: str | None) -> str:
    """One registered version per evaluated model and registry: a rerun does not register twice."""
    return hash_of("register", evaluation.key, cfg.registry.model_name, tracking_uri, CODE_VERSION)


def numeric_grader(cfg: RFTConfig) -> bool:
    """References must hold a number when the grader compares numbers."""
    return cfg.grader.resolved_spec().get("type") == "numeric_match"


def stage_path(cfg: RFTConfig, stage: str, key: str) -> Path:
    """The working directory of a stage's run with key `key`."""
    return Path(cfg.output_dir).resolve() / "stages" / f"{stage}-{key}"


def stage_dir(cfg: RFTConfig, stage: str, key: str) -> Path:
    """`stage_path`, created."""
    path = stage_path(cfg, stage, key)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- records


@dataclass
class DataRecord:
    key: str
    train_items: str  # parquet of the clean training items
    val_items: str | None  # parquet of the clean validation file's items, when one was given
    digest: str
    reports: dict[str, dict[str, Any]]
    run_id: str | None = None

    def outputs(self) -> list[str]:
        """The files this record hands to later stages (`record_problem` checks them)."""
        return [p for p in (self.train_items, self.val_items) if p]


@dataclass
class SplitRecord:
    key: str
    train_items: str
    val_items: str
    manifest: str
    digest: str  # the manifest's digest: names exactly which items are in which set
    val_digest: str  # content digest of the validation items (the registry gate compares on it)
    n_train: int
    n_val: int
    leakage: int
    run_id: str | None = None

    def outputs(self) -> list[str]:
        return [self.train_items, self.val_items, self.manifest]


@dataclass
class ModelRecord:
    key: str
    stage: str
    model_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    run_id: str | None = None
    seconds: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)  # what the RL guard did, in order
    pretrain_seconds: float = 0.0  # of `seconds`: building and pretraining the tiny model (sft only)

    def outputs(self) -> list[str]:
        # An absolute path is a directory rft wrote (a stage's model, the tiny model); anything
        # else is a hub id or the user's own path, not ours to check.
        return [self.model_dir] if Path(self.model_dir).is_absolute() else []


@dataclass
class EvalRecord:
    key: str
    metrics: dict[str, dict[str, float]]  # model name (sft, rl) -> metrics
    report: str  # markdown table
    run_id: str | None = None


@dataclass
class RegisterRecord:
    name: str
    version: int
    model_uri: str


def to_dict(record: Any) -> dict[str, Any]:
    return asdict(record)


def record_problem(record: Any) -> str | None:
    """Why a stage's record (e.g. a cached result) cannot be handed on, or None: a file or
    directory it names is gone or damaged (`integrity.directory_problem`: a model directory against
    its manifest; a Parquet file by its framing). Names the path."""
    from rft_core.integrity import directory_problem, file_problem

    for path in getattr(record, "outputs", list)():
        problem = directory_problem(path) if Path(path).is_dir() else file_problem(path)
        if problem is not None:
            return f"{path}: {problem}"
    return None


# --------------------------------------------------------------------------- tracking glue


@dataclass
class Tracking:
    """Where a stage reports: the pipeline's parent run, or nowhere (parent None)."""

    parent_run_id: str | None = None
    tracking_uri: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str, params: dict[str, Any] | None = None) -> Iterator[str | None]:
        """The stage's child run for the block (`tracking.stage_run`), or None without a parent."""
        if self.parent_run_id is None:
            yield None
            return
        with tracking.stage_run(self.parent_run_id, name, params, tracking_uri=self.tracking_uri) as run_id:
            yield run_id

    def logger(self, run_id: str | None, prefix: str):
        return tracking.metrics_logger(run_id, prefix, tracking_uri=self.tracking_uri) if run_id else None


def _log_metrics(track: Tracking, run_id: str | None, prefix: str, metrics: dict[str, float], step: int = 0) -> None:
    log = track.logger(run_id, prefix)
    if log is not None:
        log(metrics, step)


# --------------------------------------------------------------------------- stages


def validate_stage(cfg: RFTConfig, track: Tracking | None = None) -> DataRecord:
    """Validate the training (and validation) file; clean items go on, rejects are kept aside.

    With no `data.train_path`, the built-in synthetic task is generated first (train + validation).
    """
    from rft_core.data import DataError, frame_digest, validate_file, write_items
    from rft_core.data.synthetic import write_synthetic

    track = track or Tracking()
    key = validate_key(cfg)
    work = stage_dir(cfg, "validate", key)
    train_path, val_path = cfg.data.train_path, cfg.data.val_path
    if train_path is None:
        train_path, val_path = (str(p) for p in write_synthetic(cfg.data.synthetic, work / "synthetic"))
    numeric = numeric_grader(cfg)
    with track.stage("validate", {"data": cfg.data.model_dump(mode="json")}) as run_id:
        reports, frames = {}, {}
        for role, path in (("train", train_path), ("validation", val_path)):
            if path is None:
                continue
            report = validate_file(path, cfg.data, rejects_path=work / f"{role}.rejects.jsonl", numeric=numeric)
            reports[role] = {k: v for k, v in report.to_dict().items() if k != "problems"} | {
                "problems": report.to_dict()["problems"][:200]
            }
            if report.valid == 0:
                raise DataError(f"{path}: no valid rows ({report.rejected} rejected; see {report.rejects_path})")
            frames[role] = report.frame
            (work / f"{role}.report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
            if report.rejected:
                logger.warning("%s: %d of %d rows rejected (see %s)", path, report.rejected, report.rows, report.rejects_path)
        _check_solutions(cfg, frames["train"], train_path)
        write_items(frames["train"], work / "train.parquet")
        if "validation" in frames:
            write_items(frames["validation"], work / "validation.parquet")
        digest = hash_of({role: frame_digest(frame) for role, frame in frames.items()})
        record = DataRecord(
            key=key,
            train_items=str(work / "train.parquet"),
            val_items=str(work / "validation.parquet") if "validation" in frames else None,
            digest=digest,
            reports=reports,
            run_id=run_id,
        )
        if run_id:
            metrics = {}
            for role, rep in reports.items():
                metrics.update({f"{role}_rows": rep["rows"], f"{role}_valid": rep["valid"], f"{role}_rejected": rep["rejected"]})
            _log_metrics(track, run_id, "validate", metrics)
            for role, path in (("train", train_path), ("validation", val_path)):
                if path is not None:
                    tracking.log_dataset(
                        run_id, str(path), name=f"{role}:{Path(path).name}", digest=file_digest(path),
                        context=role, tracking_uri=track.tracking_uri,
                    )
            for report_file in work.glob("*.json*"):
                tracking.log_artifact(run_id, report_file, "validation", tracking_uri=track.tracking_uri)
            tracking.set_tags(run_id, {tags.TAG_DATA_DIGEST: digest}, tracking_uri=track.tracking_uri)
    return record


def _check_solutions(cfg: RFTConfig, train: Any, path: str | Path) -> None:
    """Warm-up SFT trains on worked solutions: refuse, before any training, data that has none."""
    from rft_core.data import DataError

    if cfg.sft.enabled and ("solution" not in train or not train["solution"].notna().any()):
        raise DataError(
            f"{path}: no item has a worked solution, which warm-up SFT trains on; add one to some items "
            "(OpenAI format: an assistant message after the user's; CSV/Parquet: data.columns.solution), "
            "or set sft.enabled=false to run RL alone from the base model"
        )


def _check_rl_batch(cfg: RFTConfig, n_train: int) -> None:
    """An RL iteration samples `rl.prompts_per_iteration` distinct training items at most."""
    from rft_core.data import DataError

    if cfg.rl.enabled and cfg.rl.prompts_per_iteration > n_train:
        raise DataError(
            f"rl.prompts_per_iteration ({cfg.rl.prompts_per_iteration}) is more than the {n_train} training "
            f"items: set it to at most {n_train} (each iteration samples that many distinct items)"
        )


def split_stage(cfg: RFTConfig, data: DataRecord, track: Tracking | None = None) -> SplitRecord:
    """Split into train and validation (or take the validation file), save the manifest."""
    from rft_core.data import frame_digest, read_items, split_items, write_items

    track = track or Tracking()
    key = split_key(cfg, data)
    work = stage_dir(cfg, "split", key)
    with track.stage("split") as run_id:
        frame = read_items(data.train_items)
        val_frame = read_items(data.val_items) if data.val_items else None
        result = split_items(frame, cfg.data, val_frame)
        _check_rl_batch(cfg, len(result.train))
        write_items(result.train, work / "train.parquet")
        write_items(result.val, work / "validation.parquet")
        result.manifest.save(work / "manifest.json")
        (work / "split.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
        if result.leakage:
            logger.warning("%d possible train/validation leaks (near-duplicates); see %s", len(result.leakage), work / "split.json")
        record = SplitRecord(
            key=key,
            train_items=str(work / "train.parquet"),
            val_items=str(work / "validation.parquet"),
            manifest=str(work / "manifest.json"),
            digest=result.manifest.digest,
            val_digest=frame_digest(result.val),
            n_train=len(result.train),
            n_val=len(result.val),
            leakage=len(result.leakage),
            run_id=run_id,
        )
        if run_id:
            uri = track.tracking_uri
            _log_metrics(track, run_id, "split", {"train_items": record.n_train, "val_items": record.n_val, "leakage_pairs": record.leakage})
            tracking.log_artifact(run_id, work / "manifest.json", "split", tracking_uri=uri)
            tracking.log_artifact(run_id, work / "split.json", "split", tracking_uri=uri)
            tracking.log_dataset(run_id, result.train, "train", frame_digest(result.train), "train", source=work / "train.parquet", tracking_uri=uri)
            tracking.log_dataset(run_id, result.val, "validation", record.val_digest, "validation", source=work / "validation.parquet", tracking_uri=uri)
            tracking.set_tags(run_id, {tags.TAG_DATA_DIGEST: record.val_digest}, tracking_uri=uri)
            tracking.set_tags(track.parent_run_id, {tags.TAG_DATA_DIGEST: record.val_digest}, tracking_uri=uri)
    return record


def base_model_path(cfg: RFTConfig, split: SplitRecord, log=None) -> str:
    """The model training starts from: the hub id / path, or the built (cached) tiny model."""
    if cfg.model.name_or_path != "tiny":
        return cfg.model.name_or_path
    from rft_core.data import read_items
    from rft_core.tiny import prepare_tiny_model

    train, val = read_items(split.train_items), read_items(split.val_items)
    texts = list(train["prompt"]) + [s for s in train["solution"] if isinstance(s, str)]
    cache = Path(cfg.output_dir).resolve() / "cache"
    return str(prepare_tiny_model(cfg, texts, cache, exclude_prompts=set(val["prompt"]), log=log))


def sft_stage(cfg: RFTConfig, split: SplitRecord, track: Tracking | None = None) -> ModelRecord:
    """Warm-up SFT on the items with worked solutions (or the base model when SFT is off)."""
    from rft_core.compute import StageJob, run_stage

    track = track or Tracking()
    key = sft_key(cfg, split)
    work = stage_dir(cfg, "sft", key)
    started = time.perf_counter()
    params = {"model": cfg.model.model_dump(mode="json"), "sft": cfg.sft.model_dump(mode="json"),
              "compute": cfg.compute.model_dump(mode="json")}
    with track.stage("sft", params) as run_id:
        building = time.perf_counter()
        base = base_model_path(cfg, split, log=track.logger(run_id, "pretrain"))
        # The tiny model's pretraining runs here, before SFT: timed apart, so that the run's
        # stage times show it as what it is.
        pretrain = time.perf_counter() - building if cfg.model.name_or_path == "tiny" else 0.0
        if not cfg.sft.enabled:
            return ModelRecord(key, "sft", base, run_id=run_id, seconds=time.perf_counter() - started,
                               pretrain_seconds=pretrain)
        # In this process or on several (`compute`): the same update, so the same key.
        result = run_stage(StageJob("sft", cfg, split.train_items, split.val_items, base, str(work),
                                    run_id=run_id, tracking_uri=track.tracking_uri))
        record = ModelRecord(key, "sft", result.model_dir, result.metrics, run_id=run_id, pretrain_seconds=pretrain)
        if run_id:
            _log_metrics(track, run_id, "sft", {f"final_{k}": v for k, v in result.metrics.items() if k != "step"})
            if cfg.tracking.log_models:
                record.model_uri = tracking.log_model(
                    run_id, result.model_dir, serving=tracking.serving_settings(cfg), tracking_uri=track.tracking_uri
                )
        record.seconds = time.perf_counter() - started
    return record


# The rl run's table of rollout samples (prompt, completion, reward, sub-rewards) at a few iterations.
ROLLOUT_SAMPLES = "rollout_samples.json"


def rl_stage(cfg: RFTConfig, split: SplitRecord, sft: ModelRecord, track: Tracking | None = None) -> ModelRecord:
    """PPO or GRPO with the grader, from the warm-up model; samples of a few iterations go to the
    rl run's table `rollout_samples.json`."""
    from rft_core.compute import StageJob, run_stage

    track = track or Tracking()
    key = rl_key(cfg, sft)
    work = stage_dir(cfg, "rl", key)
    started = time.perf_counter()
    _check_rl_batch(cfg, split.n_train)  # also here: a cached split did not see this rl section
    params = {"rl": cfg.rl.model_dump(mode="json"), "grader": cfg.grader.resolved_spec(),
              "compute": cfg.compute.model_dump(mode="json")}
    with track.stage("rl", params) as run_id:
        # In this process or on several (`compute`): the same update, so the same key.
        result = run_stage(StageJob("rl", cfg, split.train_items, split.val_items, sft.model_dir, str(work),
                                    run_id=run_id, tracking_uri=track.tracking_uri, samples_table=ROLLOUT_SAMPLES))
        record = ModelRecord(key, "rl", result.model_dir, result.metrics, run_id=run_id, events=result.events)
        signals = _plot_rl_signals(cfg, work)
        if run_id:
            tracking.log_artifact(run_id, signals, tracking_uri=track.tracking_uri)
            if result.events:  # the guard acted: say so where people look, on the stage and the pipeline run
                said = {tags.TAG_GUARD: guard_summary(result.events)}
                tracking.set_tags(run_id, said, tracking_uri=track.tracking_uri)
                tracking.set_tags(track.parent_run_id, said, tracking_uri=track.tracking_uri)
        if run_id and cfg.tracking.log_models:
            record.model_uri = tracking.log_model(
                run_id, result.model_dir, serving=tracking.serving_settings(cfg), tracking_uri=track.tracking_uri
            )
        record.seconds = time.perf_counter() - started
    return record


RL_SIGNALS = "rl_signals.png"


def _plot_rl_signals(cfg: RFTConfig, work: Path) -> Path:
    """The RL run's health in one picture (`rl_signals.png` in the stage directory and on the rl
    run): training reward against validation, KL to the warm-up model, entropy, response length."""
    from rft_core.curves import plot_rl_signals

    result = json.loads((work / "result.json").read_text())
    return plot_rl_signals(result.get("signals", []), result.get("guard", []), work / RL_SIGNALS,
                           title=f"RL signals ({cfg.experiment}, {cfg.rl.algorithm.upper()})")


def guard_summary(events: list[dict[str, Any]]) -> str:
    """The guard's events as one line each (MLflow tag, Prefect artifact, the CLI's summary)."""
    return "\n".join(event["message"] for event in events)


def evaluate_model_dir(
    cfg: RFTConfig, model_dir: str | Path, frame: Any, grader: Any = None, progress_task: str | None = None
):
    """Load a model directory and evaluate it on `frame` with the config's eval section."""
    import torch

    from rft_core.models import load_model, load_tokenizer

    # Float32 weights computed in the configured precision: as validation during training saw them.
    model = load_model(model_dir, cfg.model, dtype=torch.float32)
    return evaluate_loaded(cfg, model, load_tokenizer(model_dir, cfg.model), frame, grader, progress_task)


def evaluate_loaded(
    cfg: RFTConfig, model: Any, tokenizer: Any, frame: Any, grader: Any = None, progress_task: str | None = None
):
    from rft_core.evaluate import evaluate
    from rft_core.graders import configured_grader
    from rft_core.models import compute_in, pick_device, pick_dtype

    device = pick_device(cfg.model.device)
    model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    own = grader is None
    grader = grader or configured_grader(cfg.grader)
    try:
        with compute_in(device, pick_dtype(cfg.model.dtype, device)):
            return evaluate(model, tokenizer, frame, grader, cfg, progress_task=progress_task)
    finally:
        if own:
            grader.close()


def evaluation_table(metrics: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per model, one column per metric."""
    names = list(metrics)
    keys = sorted({k for m in metrics.values() for k in m})
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name in names:
        cells = [f"{metrics[name][k]:.4g}" if k in metrics[name] else "" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_stage(
    cfg: RFTConfig, split: SplitRecord, models: dict[str, ModelRecord], track: Tracking | None = None
) -> EvalRecord:
    """Evaluate each model (e.g. sft and rl) on the validation set with the full eval section."""
    from rft_core.data import read_items
    from rft_core.graders import configured_grader

    track = track or Tracking()
    key = evaluate_key(cfg, models)
    work = stage_dir(cfg, "evaluate", key)
    val = read_items(split.val_items)
    results: dict[str, dict[str, float]] = {}
    with track.stage("evaluate", {"eval": cfg.eval.model_dump(mode="json")}) as run_id:
        grader = configured_grader(cfg.grader)
        try:
            for name, record in models.items():
                report = evaluate_model_dir(cfg, record.model_dir, val, grader, progress_task=f"evaluate {name}")
                report.check_grader_errors(cfg.grader.max_error_share, f"evaluation of the {name} model")
                results[name] = report.metrics
                (work / f"samples_{name}.json").write_text(json.dumps(report.samples, indent=1))
                if run_id:
                    final = name == list(models)[-1]
                    prefix = "eval" if final else f"eval/{name}"
                    _log_metrics(track, run_id, prefix, report.metrics)
                    if final:
                        _log_metrics(track, track.parent_run_id, "eval", report.metrics)
                    tracking.log_table(run_id, report.samples, f"samples_{name}.json", tracking_uri=track.tracking_uri)
        finally:
            grader.close()
        table = evaluation_table(results)
        (work / "report.md").write_text(table + "\n")
        (work / "metrics.json").write_text(json.dumps(results, indent=1))
        if run_id:
            tracking.log_artifact(run_id, work / "report.md", tracking_uri=track.tracking_uri)
            tracking.log_artifact(run_id, work / "metrics.json", tracking_uri=track.tracking_uri)
    return EvalRecord(key, results, table, run_id)


def register_stage(
    cfg: RFTConfig, split: SplitRecord, final: ModelRecord, evaluation: EvalRecord, track: Tracking
) -> RegisterRecord:
    """Register the trained model as a new version (alias `challenger`), tagged with its metrics.
    The model is the one its stage logged, or logged now when this store does not hold it
    (`model_in_store`)."""
    if track.parent_run_id is None:
        raise ValueError("registering needs MLflow tracking")
    from rft_core.guards import weights_finite

    model_uri, model_run = model_in_store(cfg, final, track)

    metrics = {f"eval/{k}": v for k, v in evaluation.metrics[final.stage].items()}
    # What the gate checks whatever the champion (tracking.gate.Health): the figures of the model
    # training started from (the warm-up model, on the same data) and whether every weight is finite.
    health = {tags.TAG_WEIGHTS_FINITE: str(weights_finite(final.model_dir)).lower()}
    if final.stage == "rl" and "sft" in evaluation.metrics:
        health |= {f"{tags.START_METRIC_TAG_PREFIX}eval/{k}": repr(float(v)) for k, v in evaluation.metrics["sft"].items()}
    description = tracking.version_description(
        cfg, data_digest=split.val_digest, metrics=evaluation.metrics, split_digest=split.digest,
        run_id=track.parent_run_id,
    )
    version = tracking.register_model(
        model_uri,
        cfg.registry.model_name,
        run_id=model_run,
        metrics=metrics,
        data_digest=split.val_digest,
        config_digest=cfg.digest(),
        description=description,
        tags=health,
        tracking_uri=track.tracking_uri,
    )
    return RegisterRecord(cfg.registry.model_name, version, f"models:/{cfg.registry.model_name}/{version}")


def model_in_store(cfg: RFTConfig, record: ModelRecord, track: Tracking) -> tuple[str, str | None]:
    """(model URI, run id) of the stage's model in this pipeline run's store. A cached stage logged
    its model where it ran: in another store (tracking.tracking_uri changed since), or nowhere
    (tracking.log_models was off). Neither changes the model, so training is not run again: the
    model directory is logged here, on this pipeline run's child run of the stage."""
    if record.model_uri and tracking.logged_model_exists(record.model_uri, tracking_uri=track.tracking_uri):
        return record.model_uri, record.run_id
    with track.stage(record.stage) as run_id:
        assert run_id is not None  # track has a parent run
        uri = tracking.log_model(run_id, record.model_dir, serving=tracking.serving_settings(cfg),
                                 tracking_uri=track.tracking_uri)
    logger.info("logged the %s model %s to %s (its cached stage logged it elsewhere, or not at all)",
                record.stage, record.model_dir, track.tracking_uri)
    return uri, run_id


def model_evaluator(cfg: RFTConfig, split: SplitRecord, tracking_uri: str | None) -> tracking.Evaluator:
    """For the gate: score a registered model on this run's validation items."""
    from rft_core.data import read_items

    def evaluate_uri(model_uri: str) -> dict[str, float]:
        model, tokenizer = tracking.load_logged_model(model_uri, tracking_uri=tracking_uri)
        report = evaluate_loaded(cfg, model, tokenizer, read_items(split.val_items))
        return {f"eval/{k}": v for k, v in report.metrics.items()}

    return evaluate_uri


def promote_stage(
    cfg: RFTConfig, split: SplitRecord, registered: RegisterRecord, track: Tracking
) -> tracking.GateDecision:
    """The gate: move `champion` to the new version only if it beats the champion on this data."""
    decision = tracking.promote(
        cfg.registry,
        registered.version,
        data_digest=split.val_digest,
        evaluate=model_evaluator(cfg, split, track.tracking_uri),
        tracking_uri=track.tracking_uri,
    )
    if track.parent_run_id:
        tracking.set_tags(
            track.parent_run_id,
            {
                tags.TAG_REGISTERED_VERSION: registered.version,
                tags.GATE_DECISION: "promoted" if decision.promoted else "refused",
                tags.GATE_REASON: decision.reason,
            },
            tracking_uri=track.tracking_uri,
        )
    return decision


def mark_rerun(
    track: Tracking,
    reused: dict[str, tuple[str, str]],
    computed: list[str],
    split: SplitRecord,
    models: dict[str, ModelRecord],
    evaluation: EvalRecord,
) -> str | None:
    """A pipeline run that reused stages of earlier runs: put on its MLflow run what those stages
    put on the pipeline run that computed them (the validation data's digest, the RL guard's
    events, the final model's `eval/*` metrics), so that it reads like a whole run in the runs
    table, and link the runs that did the work (`tracking.mark_rerun`: its name, description and
    `rft.rerun_of` say it is a rerun). Returns the run's new name, or None (nothing was reused)."""
    if not reused or track.parent_run_id is None:
        return None
    parent, uri = track.parent_run_id, track.tracking_uri
    if "split" in reused:
        tracking.set_tags(parent, {tags.TAG_DATA_DIGEST: split.val_digest}, tracking_uri=uri)
    rl = models.get("rl")
    if "rl" in reused and rl is not None and rl.events:
        tracking.set_tags(parent, {tags.TAG_GUARD: guard_summary(rl.events)}, tracking_uri=uri)
    if "evaluate" in reused:
        final = list(models)[-1]
        _log_metrics(track, parent, "eval", evaluation.metrics[final])
    ran = [stage for stage in computed if stage != "promote"]  # the gate is never cached
    return tracking.mark_rerun(parent, reused, ran=ran, tracking_uri=uri)


# --------------------------------------------------------------------------- the picture

TRAINING_CURVE = "training_curve.png"


def stage_result(cfg: RFTConfig, record: ModelRecord) -> dict[str, Any]:
    """The `result.json` a training stage wrote in its directory (`{"metrics", "history"}`), or
    empty when it trained nothing (SFT off: the record is the base model)."""
    path = stage_path(cfg, record.stage, record.key) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def training_curve_path(cfg: RFTConfig, parent_run_id: str | None) -> Path:
    """Where a pipeline run's picture goes: `<output_dir>/runs/<MLflow parent run id>/`."""
    return Path(cfg.output_dir).resolve() / "runs" / (parent_run_id or "untracked") / TRAINING_CURVE


def training_curve(cfg: RFTConfig, models: dict[str, ModelRecord], track: Tracking | None = None) -> str:
    """Draw validation accuracy and sampled reward over SFT steps then RL iterations from the
    stages' `result.json` (on disk, so cached stages draw too); log it on the parent run as
    `training_curve.png`. The SFT marker is the step RL started from (SFT's chosen metrics)."""
    from rft_core.curves import plot_training

    track = track or Tracking()
    sft, rl = (stage_result(cfg, models[name]) if name in models else {} for name in ("sft", "rl"))
    chosen = sft.get("metrics", {}).get("step")
    path = plot_training(
        sft.get("history", []), rl.get("history", []), training_curve_path(cfg, track.parent_run_id),
        sft_chosen_step=None if chosen is None else int(chosen),
        title=f"Validation during training ({cfg.experiment})",
    )
    if track.parent_run_id:
        tracking.log_artifact(track.parent_run_id, path, tracking_uri=track.tracking_uri)
    return str(path)
