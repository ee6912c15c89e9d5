"""MLflow for rft: the only package of rft_core that imports mlflow.

One module per concern:

    uri.py        which store (tracking URI), and whether it can be reached
    runs.py       opening and closing runs (`pipeline_run`, `stage_run`); params, tags, metrics,
                  artifacts, tables, datasets
    models.py     logging a `save_pretrained` directory as a pyfunc model, loading it back
    registry.py   versions, aliases, the promotion lock, champion history, rollback, listing
    descriptions.py  a registered version's description: what it is, its figures, the gate's word
    gate.py       the promotion decision, a pure function of numbers and data digests
    promotion.py  `promote`, the one function that moves `champion` (reads, scores, decides, writes)
    tags.py       every tag and alias name rft writes
    errors.py     TrackingError and its kinds

The public API is re-exported here, so callers write `from rft_core import tracking` and
`tracking.pipeline_run(...)`, `tracking.promote(...)`.
"""

from __future__ import annotations

from rft_core.tracking import tags
from rft_core.tracking.descriptions import version_description
from rft_core.tracking.errors import RegistryError, TrackingError, TrackingStoreUnusable, TrackingUnavailable
from rft_core.tracking.gate import GateDecision, Measurement, decide
from rft_core.tracking.models import _TextGenerator as _TextGenerator
from rft_core.tracking.models import (
    download_model,
    load_logged_model,
    log_model,
    logged_model_exists,
    serving_settings,
)
from rft_core.tracking.promotion import Evaluator, promote
from rft_core.tracking.registry import (
    champion_version,
    check_registered,
    list_versions,
    register_model,
    registry_lock,
    rollback,
    set_alias,
)
from rft_core.tracking.runs import (
    artifact_link,
    config_tags,
    end_abandoned_runs,
    end_run,
    ensure_experiment,
    find_pipeline_run,
    find_stage_run,
    git_commit,
    log_artifact,
    log_dataset,
    log_metrics_once,
    log_params,
    log_table,
    mark_rerun,
    metrics_logger,
    pipeline_run,
    reopen_run,
    run_link,
    run_tags,
    set_tags,
    stage_run,
    start_pipeline_run,
    start_stage_run,
    table_logger,
)
from rft_core.tracking.tags import ALIAS_CHALLENGER, ALIAS_CHAMPION, LOCK_SUFFIX
from rft_core.tracking.uri import (
    DEFAULT_OUTPUT_DIR,
    check_tracking_available,
    configure,
    current_tracking_uri,
    default_tracking_uri,
    resolve_tracking_uri,
    sqlite_path,
    ui_command,
)

# `_TextGenerator` is imported above because models logged before tracking became a package were
# pickled as `rft_core.tracking._TextGenerator` (MLflow pickles the pyfunc class by reference):
# the name keeps them loadable with mlflow.pyfunc.

__all__ = [
    "ALIAS_CHALLENGER",
    "ALIAS_CHAMPION",
    "DEFAULT_OUTPUT_DIR",
    "LOCK_SUFFIX",
    "Evaluator",
    "GateDecision",
    "Measurement",
    "RegistryError",
    "TrackingError",
    "TrackingStoreUnusable",
    "TrackingUnavailable",
    "artifact_link",
    "champion_version",
    "check_registered",
    "check_tracking_available",
    "config_tags",
    "configure",
    "current_tracking_uri",
    "decide",
    "default_tracking_uri",
    "download_model",
    "end_abandoned_runs",
    "end_run",
    "ensure_experiment",
    "find_pipeline_run",
    "find_stage_run",
    "git_commit",
    "list_versions",
    "load_logged_model",
    "log_artifact",
    "log_dataset",
    "log_metrics_once",
    "log_model",
    "logged_model_exists",
    "log_params",
    "log_table",
    "mark_rerun",
    "metrics_logger",
    "pipeline_run",
    "promote",
    "register_model",
    "registry_lock",
    "reopen_run",
    "resolve_tracking_uri",
    "rollback",
    "run_link",
    "run_tags",
    "serving_settings",
    "set_alias",
    "set_tags",
    "sqlite_path",
    "stage_run",
    "start_pipeline_run",
    "start_stage_run",
    "table_logger",
    "tags",
    "ui_command",
    "version_description",
]
