"""`rft validate FILE`: check a data file before spending compute on it.

Exit status: 0 when every row is valid, 1 when some rows were rejected (they are in the rejects
file, under the output directory: `<output_dir>/rejects/`, or where `--rejects` says; its path is
printed), 2 when the file cannot be used at all (the message goes to stderr, without a traceback).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from rft.errors import EXIT_NEGATIVE, EXIT_OK, fail
from rft_core.config import ConfigError, RFTConfig
from rft_core.data import FORMATS, DataError, ValidationReport, validate_file
from rft_core.data.schemas import NO_NUMERIC_ANSWER

# The command's own way to give what a library error names (DataError.setting).
_OPTION_FOR_SETTING = {
    "data.format": "--format FORMAT",
    "data.columns": "--config FILE with data.columns",
    "data.csv_delimiter": "--config FILE with data.csv_delimiter",
}


def grader_is_numeric(cfg: RFTConfig) -> bool:
    """Whether the configured grader compares numbers (then every reference must hold one)."""
    try:
        spec = cfg.grader.resolved_spec()
    except Exception:  # an unreadable grader file is `rft run`'s error to report, not validate's
        return False
    return spec.get("type") == "numeric_match"


def validate_cmd(
    file: Annotated[Path, typer.Argument(help="Data file: JSONL, JSON, CSV or Parquet.", show_default=False)],
    format: Annotated[
        str | None,
        typer.Option("--format", "-f", help=f"Force a format: {', '.join(FORMATS)} (default: detect it)."),
    ] = None,
    rejects: Annotated[
        Path | None,
        typer.Option("--rejects", help="Where to write rejected rows (default: <output_dir>/rejects/<FILE name>"
                     ".rejects.jsonl, output_dir from --config, else rft_runs: your outputs, not your data's directory)."),
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
        raise fail(str(exc)) from None
    if format is not None and format != "auto" and format not in FORMATS:
        raise fail(f"unknown format {format!r}; use one of {', '.join(FORMATS)} or auto")
    if numeric is None:
        numeric = grader_is_numeric(cfg)
    try:
        report = validate_file(file, cfg.data, rejects_path=rejects, rejects_dir=Path(cfg.output_dir).resolve() / "rejects",
                               numeric=numeric, format=format,
                               inputs={"config file": config, "grader file": cfg.grader.file})
    except DataError as exc:
        option = _OPTION_FOR_SETTING.get(getattr(exc, "setting", None) or "")
        raise fail(f"{exc} On the command line: {option}." if option else str(exc)) from None
    if json_output:
        typer.echo(json.dumps({**report.to_dict(), "numeric": numeric}, ensure_ascii=False, indent=2))
    else:
        # soft_wrap: paths and counts stay on one line, whole, to be copied or grepped.
        Console(soft_wrap=True).print(render_report(report), highlight=False)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_NEGATIVE)


def render_report(report: ValidationReport, max_problems: int = 20) -> RenderableType:
    """The report as a rich renderable: counts, the first problems by line and field, where the rejects went."""
    status = "[green]all rows valid[/]" if report.ok else f"[red]{report.rejected} rejected[/]"
    header = Text.from_markup(
        f"[bold]{escape(str(report.path))}[/] ({report.format}): {report.rows} rows, "
        f"[green]{report.valid} valid[/], {status}"
    )
    parts: list[RenderableType] = [header]
    if report.problems:
        table = Table(show_edge=False, header_style="bold", pad_edge=False)
        table.add_column("line", justify="right")
        table.add_column("field")
        table.add_column("reason", overflow="fold")
        for p in report.problems[:max_problems]:
            where = str(p.line) if p.index is None else f"{p.line if p.line is not None else '-'} [{p.index}]"
            # Text, not markup: fields and reasons quote the file, and '[/x]' in it is not a style.
            table.add_row(Text(where), Text(p.field or "-"), Text(p.reason))
        parts.append(table)
        if len(report.problems) > max_problems:
            # The table shows only the first ones, so say what the rest are.
            parts.append(Text(f"... and {len(report.problems) - max_problems} more problems"))
            kinds = ", ".join(f"{kind} x{n}" for kind, n in report.reason_counts().items())
            parts.append(Text(f"problems by kind: {kinds}"))
    if any(p.reason.startswith(NO_NUMERIC_ANSWER) for p in report.problems):
        parts.append(Text("references must hold a number (--numeric, the default with a numeric_match grader); "
                          "--no-numeric accepts text references"))
    if report.rejects_path:
        parts.append(Text(f"rejected rows written to {report.rejects_path}"))
    return Group(*parts)
