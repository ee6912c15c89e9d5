"""What `rft run` prints around the progress display: log lines that name their stage and go above
the bars, a summary that fits a terminal of any width and keeps its commands whole in a file or a
pipe, and no library warning in the middle of a run."""

from __future__ import annotations

import io
import logging
import re
import warnings

import pandas as pd
import pytest
from rich.console import Console

from rft import logs
from rft.progress import live_progress
from rft.run import print_summary, summary_console
from rft_core import tracking
from rft_core.config import RFTConfig
from rft_core.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(message: str, **extra: str) -> logging.LogRecord:
    made = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, message, None, None)
    made.__dict__.update(extra)
    return made


def test_log_lines_name_the_stage_a_prefect_task_record_comes_from() -> None:
    formatter = logs.WhereFormatter()
    cached = record("Finished in state Cached(type=COMPLETED)", task_name="sft", task_run_name="sft-0a1",
                    flow_name="rft-pipeline")
    assert formatter.format(cached).endswith(" sft: Finished in state Cached(type=COMPLETED)")
    flow = record("Finished in state Completed()", task_name="<unknown>", flow_name="rft-pipeline")
    assert formatter.format(flow).endswith(" rft-pipeline: Finished in state Completed()")
    plain = logging.LogRecord("rft.stages", logging.WARNING, __file__, 1, "3 rows rejected", None, None)
    assert formatter.format(plain).endswith(" rft.stages: 3 rows rejected")


def test_log_lines_printed_during_the_live_display_go_above_it_whole() -> None:
    out = Terminal()
    console = Console(file=out, force_terminal=True, width=80, color_system=None)
    logger = logging.getLogger("rft.test-above")
    handler = logs.CurrentStderr()
    handler.setFormatter(logs.WhereFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with live_progress(enabled=True, console=console), progress("sft", 4, "steps") as bar:
            bar.update(1, loss=0.5)
            console.file.flush()
            logger.warning("a line written while the bars are drawn")
            bar.update(4, loss=0.25)
    finally:
        logger.removeHandler(handler)
    # Cursor movements aside, the log line is a line of its own: not glued to a bar, not cut.
    lines = out.getvalue().replace("\x1b[2K", "\n").replace("\x1b[1A", "\n").replace("\r", "\n").splitlines()
    shown = [line for line in lines if "a line written" in line]
    assert shown and all(line.endswith("rft.test-above: a line written while the bars are drawn") for line in shown)
    assert all("━" not in line for line in shown)


SUMMARY = {
    "metrics": {
        "sft": {"accuracy": 0.417, "reward_mean": 0.52, "grader_errors": 0.0, "response_length": 23.1,
                "pass_at_4": 0.61, "maj_at_4": 0.45},
        "rl": {"accuracy": 0.670, "reward_mean": 0.71, "grader_errors": 0.0, "response_length": 21.4,
               "pass_at_4": 0.77, "maj_at_4": 0.69},
    },
    "seconds": {"validate": 0.5, "split": 0.4, "pretrain": 301.0, "sft": 95.2, "rl": 52.0, "evaluate": 9.6,
                "register": 0.3, "promote": 0.4},
    "mlflow_run_id": "82f399e68d144823a145442f0600f1b5",
    "tracking_uri": "sqlite:////home/someone/projects/a/rather/deep/directory/where/rft/runs/live/rft_runs/mlflow.db",
    "registered": {"name": "rft-model", "version": 3},
    "gate": {"promoted": False, "reason": "not better by more than min_improvement: eval/accuracy 0.67 vs "
             "champion v2 0.67 (same validation data)"},
    "model_dir": "/home/someone/projects/a/rather/deep/directory/where/rft/runs/live/rft_runs/stages/rl-b81a27d6131ed2aa/model",
    "training_curve": "/home/someone/projects/a/rather/deep/directory/where/rft/runs/live/rft_runs/runs/82f3/training_curve.png",
}
UI_COMMAND = tracking.ui_command(SUMMARY["tracking_uri"])


def test_in_a_file_or_a_pipe_the_summary_keeps_every_line_whole() -> None:
    out = io.StringIO()  # not a terminal
    print_summary(SUMMARY, summary_console(out))
    lines = out.getvalue().splitlines()
    assert f"Look at it: {UI_COMMAND}" in lines
    assert f"Model directory: {SUMMARY['model_dir']}" in lines
    assert f"Training curve: {SUMMARY['training_curve']}" in lines
    assert any(line == f"Gate: refused: {SUMMARY['gate']['reason']}" for line in lines)
    assert any(line.startswith("Time per stage: validate 0.5 s, split 0.4 s, pretrain 301.0 s, sft 95.2 s")
               for line in lines)
    assert "…" not in out.getvalue()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_on_a_terminal_the_summary_fits_and_commands_stay_whole(width: int) -> None:
    out = Terminal()
    print_summary(SUMMARY, Console(file=out, force_terminal=True, width=width, color_system=None))
    text = out.getvalue()
    lines = text.splitlines()
    whole = [f"Look at it: {UI_COMMAND}", f"Model directory: {SUMMARY['model_dir']}",
             f"Training curve: {SUMMARY['training_curve']}"]
    for line in whole:
        assert line in lines  # one line: the terminal wraps it on screen, a copy is one command
    rest = [line for line in lines if line not in whole and not line.startswith("MLflow run: ")]
    assert all(len(line) <= width for line in rest), text
    assert "…" not in text
    for figure in ("accuracy", "reward_mean", "pass_at_4", "maj_at_4", "0.670", "0.417"):
        assert figure in text.split() or f" {figure} " in text


def test_logging_a_data_set_with_integer_columns_warns_nothing(tmp_path) -> None:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_pipeline_run(RFTConfig(experiment="quiet"), tracking_uri=store)
    frame = pd.DataFrame({"id": ["a", "b"], "prompt": ["1+1?", "2+2?"], "steps": [1, 2]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracking.log_dataset(run_id, frame, "train", "0123456789abcdef", "train", source=tmp_path / "t.parquet",
                             tracking_uri=store)
    assert [str(w.message) for w in caught if "Inferred schema" in str(w.message)] == []


# --------------------------------------------------------------------------- help


def commands(group, path=()):
    """(command path, click command) of every command of the rft CLI, groups walked."""
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if hasattr(command, "commands"):  # a group (typer's click types are its own)
            yield from commands(command, (*path, name))


def test_every_help_shows_flags_as_flags_and_options_with_what_they_take() -> None:
    import typer
    from typer.testing import CliRunner

    from rft.cli import app

    root = typer.main.get_command(app)
    seen, flags_seen = 0, set()
    for path, command in commands(root):
        result = CliRunner(env={"COLUMNS": "100"}).invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output and "list[" not in result.output, (path, result.output)
        for param in command.params:
            if param.param_type_name != "option" or param.hidden:
                continue
            names = ", ".join(param.opts)
            line = next((line for line in result.output.splitlines() if line.strip().startswith(
                tuple(param.opts + param.secondary_opts))), None)
            assert line is not None, (path, names, result.output)
            if param.is_flag:
                # `--fresh   Ignore cached ...`: nothing between the flag and its help.
                flags = " / ".join(", ".join(group) for group in (param.opts, param.secondary_opts) if group)
                assert re.match(rf"\s*{re.escape(flags)}(\s{{2,}}|$)", line), (path, line)
                flags_seen.add(max(param.opts, key=len))
            else:
                after = line.strip().split(max(param.opts, key=len), 1)[1]
                assert after.startswith(" ") and after.split()[0], (path, line)
        seen += 1
    assert seen >= 10  # run, validate, grade, train, promote, rollback, models, serve, deployments (serve)
    assert {"--fresh", "--json", "--force", "--numeric"} <= flags_seen


def test_serve_says_it_serves_prefect_deployments_not_a_model() -> None:
    from typer.testing import CliRunner

    from rft.cli import app

    listing = CliRunner(env={"COLUMNS": "100"}).invoke(app, ["--help"]).output
    assert "Alias of rft deployments serve (not a model server)." in listing
    for args in (["serve", "--help"], ["deployments", "serve", "--help"]):
        text = " ".join(CliRunner(env={"COLUMNS": "100"}).invoke(app, args).output.split())
        assert "Prefect deployments" in text and "not a model" in text, text
        assert "mlflow models serve -m models:/NAME@champion" in text


def test_a_rerun_that_registers_the_champion_again_says_unchanged_not_refused() -> None:
    from rft_core.tracking.gate import RULE_ALREADY_CHAMPION

    summary = {**SUMMARY, "gate": {"promoted": False, "reason": "version 3 is already the champion",
                                   "rule": RULE_ALREADY_CHAMPION}}
    out = io.StringIO()
    print_summary(summary, summary_console(out))
    assert "Gate: unchanged: version 3 is already the champion" in out.getvalue().splitlines()
    promoted = {**SUMMARY, "gate": {"promoted": True, "reason": "no champion yet", "rule": "no-champion"}}
    out = io.StringIO()
    print_summary(promoted, summary_console(out))
    assert "Gate: promoted to champion: no champion yet" in out.getvalue().splitlines()
