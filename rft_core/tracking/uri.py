"""Which MLflow store rft talks to, and whether it can be reached.

The tracking URI is process-wide state in MLflow (model logging and artifact download read it).
Every function of rft_core.tracking takes `tracking_uri=None`; passing one (or calling `configure`)
makes it current for the process, and None means the current one: the last configured, else
`MLFLOW_TRACKING_URI`, else the local default `sqlite:///<cwd>/rft_runs/mlflow.db`.
"""

from __future__ import annotations

import os
import shlex
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient

from rft_core.tracking.errors import TrackingUnavailable

if TYPE_CHECKING:
    from rft_core.config import RFTConfig

DEFAULT_OUTPUT_DIR = "rft_runs"  # RFTConfig.output_dir's default: the CLI and the pipeline agree


def default_tracking_uri(output_dir: str | Path = DEFAULT_OUTPUT_DIR) -> str:
    """The local store of a pipeline: `sqlite:///<absolute output_dir>/mlflow.db`."""
    return "sqlite:///" + (Path(output_dir).expanduser().resolve() / "mlflow.db").as_posix()


def resolve_tracking_uri(cfg: RFTConfig) -> str:
    """`tracking.tracking_uri` of the config, else `MLFLOW_TRACKING_URI`, else the local default."""
    return (
        cfg.tracking.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(cfg.output_dir)
    )


def ui_command(tracking_uri: str) -> str:
    """What to print so the user can look at the runs.

    For a database or file store this is the `mlflow ui` command serving it (artifacts of local
    stores live at absolute paths recorded on each experiment, so no artifact option is needed).
    For a tracking server there is nothing to start: its address is returned.
    """
    if is_http(tracking_uri):
        return tracking_uri
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def is_http(uri: str) -> bool:
    """Whether `uri` names a tracking server (rather than a local store)."""
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (None for other stores and in-memory sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store go next to the database, not into ./mlruns of the cwd."""
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts").as_posix()


def check_tracking_available(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Raise `TrackingUnavailable` unless the store can be used, within about `timeout_s`.

    A tracking server is probed with one GET of `/health` and no retries: MLflow's own client retries
    a dead server with exponential backoff for about two minutes before failing. Any HTTP answer,
    even an error status (a proxy, an auth wall), proves the server is up. For a sqlite store the
    directory of the database is created.
    """
    if is_http(tracking_uri):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            return
        except OSError as exc:  # URLError and timeouts included
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(tracking_uri, f"GET {url} failed: {reason}") from None
        return
    db = sqlite_path(tracking_uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(tracking_uri, f"cannot create {db.parent}: {exc}") from None


_MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_state_lock = threading.Lock()
_active_uri: str | None = None
_checked_uris: set[str] = set()


def current_tracking_uri() -> str:
    """The last configured URI, else `MLFLOW_TRACKING_URI`, else the local default under the cwd."""
    return _active_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def configure(tracking_uri: str | None = None) -> str:
    """Make `tracking_uri` (or the current one) the process's tracking and registry URI; return it.

    The store is checked once per URI and process (`check_tracking_available`).
    """
    global _active_uri
    uri = tracking_uri or current_tracking_uri()
    with _state_lock:
        if uri not in _checked_uris:
            check_tracking_available(uri)
            _checked_uris.add(uri)
        if _active_uri != uri:
            # MLflow also exports the URIs as environment variables (for its subprocesses). Here
            # MLFLOW_TRACKING_URI is the user's choice (`resolve_tracking_uri`): the store of one
            # pipeline must not become the default of the next one in this process, or of a child
            # process such as `rft run`. So the variables are put back as they were.
            saved = {name: os.environ.get(name) for name in _MLFLOW_URI_VARIABLES}
            try:
                mlflow.set_tracking_uri(uri)
                mlflow.set_registry_uri(uri)
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
            _active_uri = uri
    return uri


def mlflow_client(tracking_uri: str | None = None) -> MlflowClient:
    """A client of the store `tracking_uri` (configured first, see `configure`)."""
    uri = configure(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
