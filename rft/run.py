"""`rft run` (the whole pipeline as a Prefect flow) and `rft train` (one training stage, for
`accelerate launch` on several processes or GPUs)."""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rft.errors import fail
from rft.progress import live_progress
from rft_core.config import ConfigError, RFTConfig
from rft_core.files import FileProblem, refuse_inputs

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (default: the built-in demo).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="SECTION.KEY=VALUE", help="Override a field (repeatable)."),
]


def load_config(config: Path | None, overrides: list[str] | None) -> RFTConfig:
    """The config of the command line, with everything that needs no training checked
    (`rft_core.preflight`: the files it names, the grader spec, a local model directory, the
    output directory): a FIFO, a missing file or an invalid spec is one line each here, not a
    failed task later."""
    from rft_core.preflight import preflight

    try:
        cfg = RFTConfig.load(config, overrides or [])
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if problems := preflight(cfg):
        raise fail("\n".join(problems))
    return cfg


def _quiet_libraries() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Stage progress lines (rft.*) go to the terminal and, inside a flow, to Prefect's logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "rft")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    from rft import logs

    logs.setup()  # `HH:MM:SS sft: ...`: each line names its stage
    # MLflow's per-model notes and download bars would bury the stage progress lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)


def run_cmd(
    config: ConfigOption = None,
    set_: SetOption = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore cached stage results; recompute everything.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run the pipeline: validate, split, SFT, RL, evaluate, register, promote.

    Ctrl-C (or SIGTERM) stops training at its next step with a checkpoint, ends the MLflow runs
    KILLED and prints the command that resumes; a second Ctrl-C stops at once."""
    _quiet_libraries()
    cfg = load_config(config, set_)
    from rft_core import tracking
    from rft_core.compute import ComputeError
    from rft_core.lifecycle import stop_on_signals

    try:
        # Before the flow starts (and Prefect is imported): inside it, Prefect would log the
        # error's traceback first.
        tracking.check_tracking_available(tracking.resolve_tracking_uri(cfg))
    except tracking.TrackingUnavailable as exc:
        raise fail(str(exc)) from None
    from flows.pipeline import rft_pipeline
    from flows.server import ServerError, prefect_api

    # The shutdown order is this block's: the flow ends (training stopped, runs closed), then the
    # temporary Prefect server goes; Ctrl-C never reaches the server itself.
    try:
        with stop_on_signals(), prefect_api(), live_progress():
            summary = rft_pipeline(config=cfg, fresh=fresh)
    except tracking.TrackingUnavailable as exc:
        raise fail(str(exc)) from None
    except ServerError as exc:
        raise fail(str(exc)) from None
    except guard_errors() as exc:  # training met what rft refuses to go on with; the message says what to change
        raise fail(str(exc)) from None
    except ComputeError as exc:  # a stage's processes failed or could not start (rank, error)
        resume = f"\nResume with: {resume_command(config, set_, as_json)}" if resumable(exc) else ""
        raise fail(f"{exc}{resume}") from None
    except KeyboardInterrupt as exc:
        raise stopped(exc, resume_command(config, set_, as_json)) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))
        return
    print_summary(summary)


def guard_errors() -> tuple[type[BaseException], ...]:
    """rft's own stops on what training met (non-finite numbers, a grader failing on most samples):
    one `error:` line, as for a stage on several processes (`rft_core.launch`), never a traceback.
    (Imported when an error is matched: rft_core.guards imports torch.)"""
    from rft_core.guards import GraderFailing, TrainingDiverged

    return TrainingDiverged, GraderFailing


def resumable(exc: BaseException) -> bool:
    """Whether rerunning the same command goes on from the failed stage's last checkpoint (not
    when a rank of it stopped on one of rft's guards: it would stop the same way)."""
    return getattr(exc, "resumable", True)


EXIT_STOPPED = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C


def resume_command(config: Path | None, overrides: list[str] | None, as_json: bool = False) -> str:
    """The `rft run` command line that continues this run: same config and overrides (cached stages
    are reused, an interrupted training stage resumes from its last checkpoint)."""
    args = ["rft", "run"]
    if config is not None:
        args += ["--config", str(config)]
    for override in overrides or []:
        args += ["--set", override]
    if as_json:
        args.append("--json")
    return shlex.join(args)


def stopped(exc: BaseException, resume: str) -> typer.Exit:
    """Say what a stop left (the checkpoint, when training stopped at a step) and how to go on."""
    from rft_core.lifecycle import TrainingStopped

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    what = str(exc) if isinstance(exc, TrainingStopped) else "the run was interrupted"
    console.print(f"stopped: {what}", markup=False)
    console.print(f"Resume with: {resume}", markup=False)
    return typer.Exit(code=EXIT_STOPPED)


def summary_console(file: Any = None) -> Console:
    """Where the run's summary goes. A terminal wraps prose between words at its width; a file, a
    pipe or CI get whole lines (no width to fit, and a command or a path cut in two would not run),
    with tables at their natural width."""
    console = Console(file=file, highlight=False)
    if console.is_terminal:
        return console
    return Console(file=file, highlight=False, soft_wrap=True, width=1000)


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """The end of `rft run`: the validation figures (a row per figure, a column per model: narrow
    at any number of figures), the gain, time per stage, where the run and the model are, and the
    commands to copy (printed whole, never wrapped)."""
    console = console or summary_console()
    metrics = summary["metrics"]
    keys = [k for k in ("accuracy", "reward_mean", "grader_errors", "response_length") if any(k in m for m in metrics.values())]
    keys += sorted({k for m in metrics.values() for k in m if k.startswith(("pass_at_", "maj_at_"))})
    table = Table(title="Validation set", title_justify="left")
    table.add_column("")
    for name in metrics:
        table.add_column(name, justify="right")
    for key in keys:
        table.add_row(key, *(f"{values[key]:.3f}" if key in values else "" for values in metrics.values()))
    console.print(table)
    if "sft" in metrics and "rl" in metrics:
        gain = 100 * (metrics["rl"]["accuracy"] - metrics["sft"]["accuracy"])
        console.print(f"RL vs warm-up SFT: {gain:+.1f} points of validation accuracy")
    for message in summary.get("guard") or []:
        console.print(f"RL guard: {message}", markup=False)
    seconds = summary["seconds"]
    times = ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
    console.print(f"Time per stage: {times} (total {sum(seconds.values()):.1f} s)", markup=False)
    if summary.get("reused"):
        console.print(f"Reused from earlier runs (cached): {', '.join(summary['reused'])}", markup=False)
    from rft_core.tracking import ui_command

    whole = {"soft_wrap": True, "markup": False}  # commands, ids and paths: one line each, as they are
    console.print(f"MLflow run: {summary['mlflow_run_id']} in {summary['tracking_uri']}", **whole)
    console.print(f"Look at it: {ui_command(summary['tracking_uri'])}", **whole)
    if "registered" in summary:
        reg = summary["registered"]
        console.print(f"Registered {reg['name']} version {reg['version']} (alias challenger)", markup=False)
    if "gate" in summary:
        from rft_core.tracking.gate import verdict

        gate = summary["gate"]
        console.print(f"Gate: {verdict(gate)}: {gate['reason']}", markup=False)
    console.print(f"Model directory: {summary['model_dir']}", **whole)
    if "training_curve" in summary:
        console.print(f"Training curve: {summary['training_curve']}", **whole)


def train_cmd(
    stage: Annotated[str, typer.Argument(help="sft or rl")],
    config: ConfigOption = None,
    set_: SetOption = None,
    init_model: Annotated[
        str | None, typer.Option("--init-model", help="rl: the model to start from (default: the sft stage's result).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Stage directory (default: under output_dir).")] = None,
) -> None:
    """Run one training stage without the orchestrator: where the config's `compute` section says
    (this process, several on this machine, a Ray cluster), or, under `accelerate launch`, on the
    processes it started (`sft.batch_size` is then per process)."""
    _quiet_libraries()
    if stage not in ("sft", "rl"):
        raise fail(f"stage {stage!r}: expected sft or rl")
    cfg = load_config(config, set_)
    from rft_core.preflight import model_path_problem

    if init_model is not None and (problem := model_path_problem(init_model, "--init-model")):
        raise fail(problem)  # before the data stages and the tiny model are prepared
    if out is not None:
        # Before any training: the stage fills --out (model/, checkpoints/, best/), so no input
        # may be it or lie inside it.
        local = {"--init-model directory": init_model, "model directory": cfg.model.name_or_path}
        try:
            refuse_inputs(out, {"config file": config, "data file": cfg.data.train_path,
                                "validation file": cfg.data.val_path, "grader file": cfg.grader.file},
                          what="--out directory")
            refuse_inputs(out, {k: v for k, v in local.items() if v is not None and Path(v).exists()},
                          what="--out directory", fills_directory=True)
        except FileProblem as exc:
            raise fail(str(exc)) from None
    from rft_core import compute
    from rft_core.lifecycle import stop_on_signals

    try:
        with stop_on_signals():
            if compute.launched_by_hand() or compute.in_process(cfg):
                result, main = _train_here(stage, cfg, init_model, out)
            else:
                result, main = _train_on_ray(stage, cfg, init_model, out), True
    except KeyboardInterrupt as exc:
        raise stopped(exc, "the same command (it resumes from the last checkpoint)") from None
    except guard_errors() as exc:  # training met what rft refuses to go on with; the message says what to change
        raise fail(str(exc)) from None
    except compute.ComputeError as exc:  # the stage's processes failed or could not start
        resume = " (the same command resumes from the last checkpoint)" if resumable(exc) else ""
        raise fail(f"{exc}{resume}") from None
    except ConfigError as exc:  # settings that do not split over the processes Ray gave
        raise fail(str(exc)) from None
    if main:
        typer.echo(json.dumps({"model_dir": result.model_dir, "metrics": result.metrics}, indent=1))


def _train_here(stage: str, cfg: RFTConfig, init_model: str | None, out: Path | None) -> tuple[Any, bool]:
    """One stage in this process, one of the processes `accelerate launch` started (or the only
    one); returns its result and whether this is the main process."""
    from rft_core import stages
    from rft_core.data import read_items
    from rft_core.models import pick_device
    from rft_core.rl.trainer import run_rl
    from rft_core.sft import run_sft
    from rft_core.training import make_accelerator

    accelerator = make_accelerator(pick_device(cfg.model.device))
    # Data stages and the tiny model are prepared once, by the main process; the others wait.
    with accelerator.main_process_first():
        data = stages.validate_stage(cfg)
        split = stages.split_stage(cfg, data)
        # The sft stage starts from the base model; RL from the sft result, checked before anything is built.
        start = stages.base_model_path(cfg, split) if stage == "sft" else rl_start(cfg, split, init_model)
    train, val = read_items(split.train_items), read_items(split.val_items)
    if stage == "sft":
        work = out or stages.stage_dir(cfg, "sft", stages.sft_key(cfg, split))
        return run_sft(cfg, train, val, start, work, accelerator=accelerator), accelerator.is_main_process
    work = out or stages.stage_dir(cfg, "rl", stages.rl_key(cfg, start))
    return run_rl(cfg, train, val, start.model_dir, work, accelerator=accelerator), accelerator.is_main_process


def _train_on_ray(stage: str, cfg: RFTConfig, init_model: str | None, out: Path | None) -> Any:
    """One stage on the processes the `compute` section asks for (`rft_core.compute`), as the
    pipeline runs it (no MLflow tracking here)."""
    from rft_core import stages
    from rft_core.compute import StageJob, run_stage

    split = stages.split_stage(cfg, stages.validate_stage(cfg))
    if stage == "sft":
        work = out or stages.stage_dir(cfg, "sft", stages.sft_key(cfg, split))
        base = stages.base_model_path(cfg, split)
        return run_stage(StageJob("sft", cfg, split.train_items, split.val_items, base, str(work)))
    start = rl_start(cfg, split, init_model)
    work = out or stages.stage_dir(cfg, "rl", stages.rl_key(cfg, start))
    return run_stage(StageJob("rl", cfg, split.train_items, split.val_items, start.model_dir, str(work)))


def rl_start(cfg: RFTConfig, split: Any, init_model: str | None) -> Any:
    """The model RL starts from: `--init-model`, else the sft stage's result for this config (the
    base model when sft.enabled is false), as the pipeline would hand it on (its record, so that
    the RL stage directory is the pipeline's too: either resumes the other's checkpoints). Checked
    before anything is built: a missing sft result costs no tiny-model pretraining."""
    from rft_core import stages
    from rft_core.integrity import directory_problem

    if init_model is not None:
        return stages.ModelRecord(stages.hash_of(init_model), "sft", init_model)
    key = stages.sft_key(cfg, split)
    if not cfg.sft.enabled:
        return stages.ModelRecord(key, "sft", stages.base_model_path(cfg, split))
    model_dir = stages.stage_path(cfg, "sft", key) / "model"
    if (problem := directory_problem(model_dir)) is not None:
        raise fail(
            f"rl starts from the sft stage's result for this config, {model_dir}, but {problem}: run "
            "`rft train sft` with the same config first (or rft run), or name the model with --init-model"
        )
    return stages.ModelRecord(key, "sft", str(model_dir))
