"""`rft validate FILE`: check a data file before spending compute on it.

Exit status: 0 when every row is valid, 1 when some rows were rejected (they are in the rejects
file), 2 when the file cannot be used at all (the message goes to stderr, without a traceback).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rft_core.config import ConfigError, RFTConfig
from rft_core.data.formats import FORMATS
from rft_core.data.schemas import DataError
from rft_core.data.validate import validate_file

EXIT_VALID, EXIT_REJECTED, EXIT_FATAL = 0, 1, 2


def grader_is_numeric(cfg: RFTConfig) -> bool:
    """Whether the configured grader compares numbers (then every reference must hold one)."""
    try:
        spec = cfg.grader.resolved_spec()
    except Exception:  # an unreadable grader file is `rft run`'s error to report, not validate's
        return False
    return spec.get("type") == "numeric_match"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_FATAL)


def validate_cmd(
    file: Annotated[Path, typer.Argument(help="Data file: JSONL, JSON, CSV or Parquet.", show_default=False)],
    format: Annotated[
        str | None,
        typer.Option("--format", "-f", help=f"Force a format: {', '.join(FORMATS)} (default: detect it)."),
    ] = None,
    rejects: Annotated[
        Path | None,
        typer.Option("--rejects", help="Where to write rejected rows (default: <FILE>.rejects.jsonl)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    numeric: Annotated[
        bool | None,
        typer.Option(
            "--numeric/--no-numeric",
            help="Require a numeric final answer in every reference "
            "(default: when the config's grader is numeric_match, as the default grader is).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file: its data section sets format and CSV/Parquet columns."),
    ] = None,
) -> None:
    """Load FILE, report every problem by line, field and reason, and write the rejected rows."""
    try:
        cfg = RFTConfig.load(config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if format is not None and format != "auto" and format not in FORMATS:
        raise _fail(f"unknown format {format!r}; use one of {', '.join(FORMATS)} or auto")
    if numeric is None:
        numeric = grader_is_numeric(cfg)
    try:
        report = validate_file(file, cfg.data, rejects_path=rejects, numeric=numeric, format=format)
    except DataError as exc:
        raise _fail(str(exc)) from None
    if json_output:
        typer.echo(json.dumps({**report.to_dict(), "numeric": numeric}, ensure_ascii=False, indent=2))
    else:
        # soft_wrap: paths and counts stay on one line, whole, to be copied or grepped.
        Console(soft_wrap=True).print(report.render(), highlight=False)
    raise typer.Exit(EXIT_VALID if report.ok else EXIT_REJECTED)
