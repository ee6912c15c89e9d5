"""The FastAPI app: OpenAI's paths under `/v1`, every route behind the bearer-key check, errors in
OpenAI's shape, and the job runner started and stopped with the app."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI

from rft.api import chat, files, graders, jobs
from rft.api.auth import BearerAuth
from rft.api.errors import install_handlers
from rft.api.runner import JobRunner
from rft.api.serving import ModelCache
from rft.api.settings import ServerSettings
from rft.api.store import Store

logger = logging.getLogger("rft.api")


@dataclass
class AppState:
    """What every route reaches through `request.app.state.rft`."""

    settings: ServerSettings
    store: Store
    runner: JobRunner
    models: ModelCache


def create_app(settings: ServerSettings, *, run_jobs: bool = True) -> FastAPI:
    """The server for `settings`; with `run_jobs` the job runner follows jobs while the app runs."""
    settings.ensure_dirs()
    store = Store(settings.db_path)
    state = AppState(settings, store, JobRunner(settings, store), ModelCache(settings, store))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if run_jobs:
            state.runner.start()
        try:
            yield
        finally:
            state.runner.stop()

    app = FastAPI(title="rft api", description="OpenAI's fine-tuning API, self-hosted", lifespan=lifespan,
                  dependencies=[Depends(BearerAuth(settings.keys))])
    app.state.rft = state
    install_handlers(app)
    for module in (files, jobs, graders, chat):
        app.include_router(module.router)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    return app
