"""The registry commands of `rft`: `rft promote`, `rft rollback`, `rft models`.

Plain typer-annotated functions; `rft.cli` registers them. Each talks to the MLflow store named
by `--tracking-uri` (default: `MLFLOW_TRACKING_URI`, else the pipeline's local store
`sqlite:///<cwd>/rft_runs/mlflow.db`). Expected failures (unknown model or version, an unreachable
server, a missing local store) print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

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
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else escape(str(value))


def models_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name.")] = _DEFAULTS.model_name,
    tracking_uri: TrackingUriOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the versions of a registered model: aliases, metrics, data digest, gate decision."""
    from rft_core import tracking

    rows = _run(tracking_uri, lambda uri: tracking.list_versions(name, tracking_uri=uri))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    metric_keys = sorted({key for row in rows for key in row["metrics"]})
    table = Table(title=f"{name}: {len(rows)} version(s)")
    for column in ("version", "aliases", *metric_keys, "data digest", "gate", "created", "run"):
        # Fold, not ellipsis: a narrow terminal or a pipe should still show whole values.
        justify = "right" if column in metric_keys or column == "version" else "left"
        table.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(
            str(row["version"]),
            ", ".join(row["aliases"]),
            *(_cell(row["metrics"].get(key)) for key in metric_keys),
            _cell(row["data_digest"]),
            _cell(row["gate_decision"]),
            _cell(row["created"]),
            (row["run_id"] or "")[:12],
        )
    Console().print(table)
