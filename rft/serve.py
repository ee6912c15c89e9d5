"""`rft deployments serve` (alias `rft serve`): the Prefect deployments of `deployments/prefect.yaml`
(the pipeline, the champion's evaluation, promotion, rollback) served from this process, on their
schedules and when triggered. It serves flow runs, not a model: a model is served by MLflow
(`mlflow models serve -m models:/NAME@champion`)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rft.errors import fail


def serve_cmd(
    deployment: Annotated[
        list[str] | None,
        typer.Option("--deployment", "-d", metavar="NAME", help="Serve only this deployment (repeatable; default: all)."),
    ] = None,
    prefect_file: Annotated[
        Path, typer.Option("--prefect-file", help="The deployments file (relative to the project root).")
    ] = Path("deployments/prefect.yaml"),
    port: Annotated[
        int,
        typer.Option(help="Port of the local Prefect server used or started when PREFECT_API_URL is unset."),
    ] = 4200,
    limit: Annotated[
        int | None, typer.Option(help="Most flow runs at the same time (default: no limit).")
    ] = None,
) -> None:
    """Run the Prefect deployments of deployments/prefect.yaml (pipeline, evaluate-champion,
    promote-model, rollback-model) from this process: on their schedules and when triggered, with
    no work pool or worker. This serves flow runs, not a model; to serve a registered model over
    HTTP: mlflow models serve -m models:/NAME@champion.

    Run it from the project root. It prints, for each deployment, the command that triggers a run
    from another shell (with the PREFECT_API_URL it needs).
    """
    from flows.serve import ServeError, serve_deployments  # imports Prefect only when the command runs

    console = Console(highlight=False, soft_wrap=True)  # lines whole, to read and grep
    try:
        serve_deployments(prefect_file, deployment, port=port, limit=limit, say=lambda line: console.print(line, markup=False))
    except ServeError as exc:
        raise fail(str(exc)) from None


@functools.wraps(serve_cmd)
def serve_alias_cmd(*args: object, **kwargs: object) -> None:
    serve_cmd(*args, **kwargs)  # type: ignore[arg-type]


serve_alias_cmd.__doc__ = (
    "Alias of `rft deployments serve`, kept for existing scripts: it serves Prefect deployments, "
    "not a model.\n\n" + inspect.cleandoc(serve_cmd.__doc__ or "")
)
