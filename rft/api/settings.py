"""The server's settings (`rft api` options) and where its data lives under the data directory.

```
<data_dir>/api.sqlite        files, jobs, events (rft.api.store)
<data_dir>/files/<file id>   uploaded and result files, named by their generated ids only
<data_dir>/jobs/<job id>/    config.yaml (the job's RFTConfig), data/ (the files as the job reads
                             them), out/ (the job's output_dir: stages, checkpoints, caches),
                             worker.log, outcome.json
<data_dir>/models/           copies of checkpoints used as the base of a later job
<data_dir>/mlflow.db         the MLflow store every job tracks to (runs, registry); artifacts in
<data_dir>/mlartifacts/
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft_core.config import RFTConfig

TINY_MODEL = "rft-tiny"


@dataclass
class ServerSettings:
    """What `rft api` was started with."""

    data_dir: Path
    keys: frozenset[str] = frozenset()
    config_path: Path | None = None  # the base config every job starts from (rft's defaults when None)
    overrides: list[str] = field(default_factory=list)  # `section.key=value` on top of it
    models: dict[str, str] = field(default_factory=dict)  # model name a job may give -> hub id or local path
    max_upload_bytes: int = 512 * 1024 * 1024
    max_concurrent_jobs: int = 1
    model_cache_size: int = 2
    poll_interval_s: float = 1.0
    # Jobs run as flow runs of this Prefect deployment when PREFECT_API_URL names a server that has it
    # (None: always in the server's own worker processes).
    deployment: str | None = "rft-pipeline/rft-pipeline"

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()

    # ---- paths

    @property
    def db_path(self) -> Path:
        return self.data_dir / "api.sqlite"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.data_dir / 'mlflow.db'}"

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.files_dir, self.data_dir / "jobs", self.models_dir):
            path.mkdir(parents=True, exist_ok=True)

    # ---- the base config of every job

    def base_config(self) -> RFTConfig:
        """The server's config (file + overrides); a job's settings are applied on top of it."""
        return RFTConfig.load(self.config_path, self.overrides)

    def base_config_dict(self) -> dict[str, Any]:
        return self.base_config().model_dump(mode="json")
