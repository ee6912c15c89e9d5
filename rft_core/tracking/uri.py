"""Which MLflow store rft talks to, and whether it can be reached.

The tracking URI is process-wide state in MLflow (model logging and artifact download read it).
Every function of rft_core.tracking takes `tracking_uri=None`; passing one (or calling `configure`)
makes it current for the process, and None means the current one: the last configured, else
`MLFLOW_TRACKING_URI`, else the local default `sqlite:///<cwd>/rft_runs/mlflow.db`.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
import stat
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient

from rft_core.files import kind_of
from rft_core.tracking.errors import TrackingStoreUnusable, TrackingUnavailable

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
        if (problem := sqlite_store_problem(db)) is not None:
            raise TrackingStoreUnusable(
                tracking_uri,
                f"{problem}: move it aside (the next run starts a new store there) or point "
                "tracking.tracking_uri / MLFLOW_TRACKING_URI at the right store",
            )


SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_store_problem(db: Path) -> str | None:
    """What makes the file at `db` unusable as an SQLite store, or None (a missing or empty file is
    fine: SQLite and MLflow create the store). Checked before MLflow opens it, because MLflow's
    answer to a damaged store is a SQLAlchemy traceback from inside its schema migration."""
    try:
        info = db.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{db} cannot be read: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"{db} is {kind_of(info.st_mode)}, not an SQLite database file"
    if info.st_size == 0:
        return None
    try:
        with open(db, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"{db} cannot be read: {exc.strerror or exc}"
    if header != SQLITE_HEADER:
        return f"{db} is not an SQLite database (its first bytes are {header[:8]!r})"
    try:
        # Read-only, no journal created: the schema page and a structural check of every page.
        connection = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            verdict = connection.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            connection.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):  # another process is writing: the store itself is fine
            return None
        return f"{db} is a damaged SQLite database ({exc})"
    except sqlite3.DatabaseError as exc:
        return f"{db} is a damaged SQLite database ({exc})"
    if verdict and verdict[0] != "ok":
        return f"{db} is a damaged SQLite database (quick_check: {' '.join(str(verdict[0]).split())})"
    return None


def create_sqlite_schema(uri: str, db: Path) -> None:
    """Create (or bring up to date) MLflow's tables in the sqlite store `db`, one process at a time.

    MLflow creates a store's schema on first use with alembic migrations that are not safe against a
    second process migrating the same fresh file at the same moment: the loser fails with "Online
    migration expected to match one row ... 0 found" (seen with `rft api`, whose server reads the
    store its jobs' processes create, and with jobs that start together). Under an exclusive lock on
    `<db>.lock`, the first process creates the tables; the next ones find them current and migrate
    nothing. MLflow keeps one store object per URI and process, so this runs once per process."""
    import fcntl

    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # the tracking store: creates the whole schema
            client.search_registered_models(max_results=1)  # the registry store, on the same file
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
            if (db := sqlite_path(uri)) is not None:
                create_sqlite_schema(uri, db)
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
