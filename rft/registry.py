"""The registry commands of `rft`: `rft promote`, `rft rollback`, `rft models`.

Plain typer-annotated functions; `rft.cli` registers them. Each talks to the MLflow store named
by `--tracking-uri` (default: `MLFLOW_TRACKING_URI`, else the pipeline's local store
`sqlite:///<cwd>/rft_runs/mlflow.db`). Expected failures (unknown model or version, an unreachable
server, a missing local store) print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from rft.errors import EXIT_NEGATIVE, fail
from rft_core.config import RegistryConfig

_DEFAULTS = RegistryConfig()
_T = TypeVar("_T")

TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        show_envvar=True,
        help="MLflow tracking URI (default: sqlite:///<cwd>/rft_runs/mlflow.db, the pipeline's store).",
    ),
]
NameArgument = Annotated[str, typer.Argument(help="Registered model name (registry.model_name).")]


def _run(uri: str | None, action: Callable[[str], _T]) -> _T:
    """Call `action(resolved uri)`, turning expected failures into a message and exit code 2."""
    from mlflow.exceptions import MlflowException

    from rft_core import tracking

    resolved = uri or tracking.default_tracking_uri()
    db = tracking.sqlite_path(resolved)
    if db is not None and not db.exists():
        # Opening a missing sqlite file would create an empty store here and then report the
        # model as unknown; say where we looked instead.
        raise fail(f"no MLflow store at {db} (run the pipeline first, or pass --tracking-uri)")
    try:
        return action(resolved)
    except tracking.TrackingError as exc:
        raise fail(str(exc)) from None
    except MlflowException as exc:
        raise fail(exc.message) from None


def promote_cmd(
    name: NameArgument,
    version: Annotated[int, typer.Argument(help="Version to promote to champion.", min=1)],
    force: Annotated[
        bool, typer.Option("--force", help="Move champion to this version without comparing.")
    ] = False,
    metric: Annotated[str, typer.Option(help="Validation metric the gate compares.")] = _DEFAULTS.metric,
    greater_is_better: Annotated[
        bool, typer.Option("--greater-is-better/--lower-is-better", help="Direction of the metric.")
    ] = _DEFAULTS.greater_is_better,
    min_improvement: Annotated[
        float, typer.Option(help="How much the version must beat the champion by.", min=0.0)
    ] = _DEFAULTS.min_improvement,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Run the promotion gate: move alias `champion` to VERSION if it beats the champion.

    The champion's value must be on the same validation data (same data_digest tag); if it is not,
    the gate refuses (score the champion on the new data with the pipeline's evaluation, or --force).
    Exit code 0: promoted; 1: refused; 2: error.
    """
    from rft_core import tracking

    rules = RegistryConfig(
        model_name=name, metric=metric, greater_is_better=greater_is_better, min_improvement=min_improvement
    )
    decision = _run(tracking_uri, lambda uri: tracking.promote(rules, version, force=force, tracking_uri=uri))
    console = Console(highlight=False)
    if decision.promoted:
        console.print(f"[green]promoted[/green] {name} v{version} to champion: {escape(decision.reason)}")
        return
    console.print(f"[yellow]not promoted[/yellow] {name} v{version}: {escape(decision.reason)}")
    raise typer.Exit(code=EXIT_NEGATIVE)


def rollback_cmd(name: NameArgument, tracking_uri: TrackingUriOption = None) -> None:
    """Move alias `champion` back to the previous champion."""
    from rft_core import tracking

    def action(uri: str) -> tuple[int | None, int]:
        before = tracking.champion_version(name, tracking_uri=uri)
        return before, tracking.rollback(name, tracking_uri=uri)

    before, after = _run(tracking_uri, action)
    Console(highlight=False).print(f"rolled back {name}: champion v{before} -> v{after}")


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _when(iso: str | None) -> str:
    """`2026-12-06 05:24` of an ISO time (UTC, as the registry's tags record it)."""
    return "" if not iso else iso.replace("T", " ")[:16]


def status_text(row: dict[str, Any]) -> str:
    """What a version is now, in a few words: `champion since ...`, `rolled back ...`,
    `replaced by v4 ...`, `refused ... (not-better)`, `not gated`."""
    status, since, detail = row["status"], _when(row.get("since")), row.get("status_detail")
    if status == "champion":
        return f"champion since {since}" if since else "champion"
    if status == "replaced":
        return f"replaced {detail} {since}".strip() if detail else "replaced"
    if status == "rolled back":
        return f"rolled back {since}"
    return f"{status} {since} ({detail})" if detail else f"{status} {since}".strip()


def version_page(uri: str, name: str, version: int) -> str:
    """The version's page in the MLflow UI: on a tracking server, its address; for a local store,
    where `mlflow ui` serves it by default (http://127.0.0.1:5000)."""
    from urllib.parse import quote

    from rft_core.tracking.uri import is_http

    base = uri.rstrip("/") if is_http(uri) else "http://127.0.0.1:5000"
    return f"{base}/#/models/{quote(name, safe='')}/versions/{version}"


def models_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name.")] = _DEFAULTS.model_name,
    tracking_uri: TrackingUriOption = None,
    metric: Annotated[str, typer.Option(help="The metric the table shows (all are in the details).")] = _DEFAULTS.metric,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the versions of a registered model: aliases, what each is now (champion, replaced,
    rolled back, refused), its metrics, run, data digest, gate decisions and page in the MLflow UI."""
    from rft_core import tracking
    from rft_core.tracking.uri import is_http

    uri = tracking_uri or tracking.default_tracking_uri()
    rows = _run(uri, lambda resolved: tracking.list_versions(name, tracking_uri=resolved))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console(highlight=False)
    whole = {"soft_wrap": True, "markup": False}  # ids, links and commands: one line each, as they are
    console.print(f"{name}: {len(rows)} version(s) in {uri}", **whole)
    # Short cells only (a word never has to fold): the rest goes on the lines below the table.
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column, justify in (("version", "right"), ("aliases", "left"), ("status", "left"), (metric, "right")):
        table.add_column(column, justify=justify)
    for row in reversed(rows):  # newest first
        table.add_row(str(row["version"]), escape(", ".join(row["aliases"])), escape(status_text(row)),
                      _cell(row["metrics"].get(metric)))
    with console.capture() as captured:  # a cell folded on narrow terminals pads its line with spaces
        console.print(table)
    for line in captured.get().splitlines():
        text = Text.from_ansi(line)
        text.rstrip()
        console.print(text, soft_wrap=True)
    for row in reversed(rows):
        console.print()
        console.print(f"v{row['version']}  run {row['run_id'] or '-'}", **whole)
        # Indented paragraphs wrapped between words; a figure is one word (name=value).
        details = [f"registered {_when(row['created'])}, data {row['data_digest'] or '-'}"]
        figures = ", ".join(f"{key}={_cell(value)}" for key, value in sorted(row["metrics"].items()))
        if figures:
            details.append(figures)
        if row["gate_history"]:
            latest = row["gate_history"][-1]
            rule = f" ({latest['gate.rule']})" if latest.get("gate.rule") else ""
            details.append(f"last decision{rule}: {latest.get('gate.decision', '?')}, "
                           f"{_when(latest.get('gate.time'))}: {latest.get('gate.reason', '')}")
        for detail in details:  # wrapped here: rich's Padding fills the last line with spaces
            console.print(textwrap.fill(detail, width=max(console.width, 40), initial_indent="  ",
                                        subsequent_indent="  ", break_long_words=False, break_on_hyphens=False),
                          **whole)
        console.print(f"  page {version_page(uri, name, row['version'])}", **whole)
    if not is_http(uri):
        console.print()
        console.print(f"The pages open once the MLflow UI runs: {tracking.ui_command(uri)}", **whole)
