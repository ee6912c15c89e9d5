"""`rft api`: serve OpenAI's fine-tuning API (files, jobs, graders, models, chat completions) on this machine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from rft.errors import fail

ModelOption = Annotated[
    list[str] | None,
    typer.Option("--model", metavar="NAME=HUB_ID_OR_LOCAL_DIR", help="A base model jobs may name: NAME=HUB_ID_OR_LOCAL_DIR (repeatable; rft-tiny is built in)."),
]


def parse_models(specs: list[str] | None) -> dict[str, str]:
    models = {}
    for spec in specs or []:
        name, sep, target = spec.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise fail(f"--model {spec!r}: expected NAME=HUB_ID_OR_LOCAL_DIR")
        if name.startswith("ft:") or name.strip() == "rft-tiny":
            raise fail(f"--model {spec!r}: the name {name!r} is reserved")
        models[name.strip()] = target.strip()
    return models


def api_cmd(
    host: Annotated[str, typer.Option(help="Address to listen on (a non-loopback one needs API keys).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Where files, jobs, models and the tracking store live.")] = Path("rft_api"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Base config of every job (default: rft's defaults).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", metavar="SECTION.KEY=VALUE", help="Override a base config field (repeatable).")] = None,
    api_keys_file: Annotated[Path | None, typer.Option("--api-keys-file", help="Accepted bearer keys, one per line (also RFT_API_KEYS).")] = None,
    model: ModelOption = None,
    max_concurrent_jobs: Annotated[int, typer.Option("--max-concurrent-jobs", min=1, help="Jobs running at once; the rest queue.")] = 1,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest file upload.")] = 512.0,
    model_cache_size: Annotated[int, typer.Option("--model-cache-size", min=1, help="Served models kept loaded.")] = 2,
    prefect_deployment: Annotated[str, typer.Option(
        "--prefect-deployment",
        help="Run jobs as flow runs of this deployment when PREFECT_API_URL names a server that has it "
        "('none': always in this server's own worker processes).",
    )] = "rft-pipeline/rft-pipeline",
) -> None:
    """Serve OpenAI's fine-tuning API for the openai SDK: point its base_url at http://HOST:PORT/v1."""
    from rft.api.auth import AuthConfigError, check_bind, load_keys
    from rft.api.settings import ServerSettings
    from rft.run import _quiet_libraries
    from rft_core.config import ConfigError

    _quiet_libraries()
    try:
        keys = load_keys(api_keys_file)
        note = check_bind(host, keys)
    except AuthConfigError as exc:
        raise fail(str(exc)) from None
    settings = ServerSettings(
        data_dir=data_dir, keys=keys, config_path=config, overrides=list(set_ or []), models=parse_models(model),
        max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_concurrent_jobs=max_concurrent_jobs,
        model_cache_size=model_cache_size,
        deployment=None if prefect_deployment.lower() == "none" else prefect_deployment,
    )
    try:
        settings.base_config()
    except ConfigError as exc:
        raise fail(str(exc)) from None
    import uvicorn

    from rft.api.app import create_app

    logging.getLogger("rft.api").setLevel(logging.INFO)
    if note:
        typer.echo(f"warning: {note}", err=True)
    typer.echo(f"rft api: data in {settings.data_dir}; openai SDK base_url http://{host}:{port}/v1", err=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
