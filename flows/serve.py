"""The Prefect deployments of `deployments/prefect.yaml` served from this one process
(`rft deployments serve`, alias `rft serve`): scheduled and triggered flow runs, not a model server.

The local alternative to a work pool and a worker, for a single machine: the same flows, schedules,
parameters and concurrency limits as `prefect deploy --prefect-file deployments/prefect.yaml --all`
(they are read from that file), run as subprocesses of `rft serve` (Prefect's `serve`). Scheduled
runs need a Prefect server, which runs the scheduler: `rft serve` uses the one `PREFECT_API_URL`
names, else the one answering at http://127.0.0.1:PORT, else it starts `prefect server start` there
for as long as it runs (in its own session, and sent SIGTERM by Linux when `rft serve` dies, even
by `kill -9`). Stopping `rft serve` (Ctrl-C, SIGTERM) pauses the schedules it served.

A `kill -9` cannot pause anything: the deployments stay active in the server's database, and a
server that outlives `rft serve` keeps scheduling runs that nobody starts. The next `rft serve`
tidies up first (`tidy_abandoned`): every deployment of the file that it serves itself (no work
pool), still active and polled by nobody, has its overdue scheduled runs cancelled and is paused;
then the deployments it serves now are made active again.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rft_core.files import FileProblem, read_text, yaml_error
from rft_core.lifecycle import die_with_parent

DEFAULT_PREFECT_FILE = Path("deployments/prefect.yaml")


class ServeError(RuntimeError):
    """A deployments file, server or deployment state that serving cannot use; the message says why."""


def read_deployments(prefect_file: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """The deployment entries of a prefect.yaml (YAML anchors resolved), optionally only `names`."""
    if not prefect_file.exists() and not prefect_file.is_symlink():
        raise ServeError(
            f"{prefect_file}: not found (run rft serve from the project root, or pass --prefect-file)"
        )
    try:
        spec = yaml.safe_load(read_text(prefect_file, "deployments file")) or {}
    except FileProblem as exc:  # a directory, a FIFO, too large, not UTF-8
        raise ServeError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise ServeError(f"{prefect_file}: not valid YAML: {yaml_error(exc)}") from None
    deployments = _deployment_entries(prefect_file, spec)
    known = [d.get("name") for d in deployments]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ServeError(f"{prefect_file}: no deployment named {', '.join(unknown)} (it has {', '.join(known)})")
    return [d for d in deployments if not names or d.get("name") in names]


def _deployment_entries(prefect_file: Path, spec: Any) -> list[dict[str, Any]]:
    """The `deployments:` list of a parsed prefect.yaml, checked for the shape Prefect gives it."""
    layout = "a mapping with a 'deployments:' list (as deployments/prefect.yaml)"
    if not isinstance(spec, dict):
        raise ServeError(f"{prefect_file}: a deployments file is {layout}, got a YAML {_yaml_type(spec)}")
    deployments = spec.get("deployments") or []
    if not isinstance(deployments, list):
        raise ServeError(f"{prefect_file}: 'deployments' must be a list, got a YAML {_yaml_type(deployments)}")
    for number, entry in enumerate(deployments, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ServeError(
                f"{prefect_file}: deployment {number} must be a mapping with a 'name' and an 'entrypoint'"
            )
        if not isinstance(entry.get("entrypoint"), str):
            raise ServeError(f"{prefect_file}: deployment {entry['name']!r} has no 'entrypoint' (module:flow)")
        schedules = entry.get("schedules") or []
        if not isinstance(schedules, list) or not all(isinstance(spec, dict) for spec in schedules):
            raise ServeError(
                f"{prefect_file}: deployment {entry['name']!r}: 'schedules' must be a list of mappings "
                "(each with a cron, interval or rrule)"
            )
    if not deployments:
        raise ServeError(f"{prefect_file}: no deployments to serve (its 'deployments:' list is empty)")
    return deployments


def _yaml_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def schedules_of(entry: dict[str, Any]) -> list[Any]:
    """The `schedules:` of a prefect.yaml deployment as Prefect schedule objects."""
    from prefect.schedules import Cron, Interval, RRule

    result = []
    for spec in entry.get("schedules") or []:
        common = {"active": spec.get("active", True), "parameters": spec.get("parameters") or {}}
        if "cron" in spec:
            result.append(
                Cron(spec["cron"], timezone=spec.get("timezone"), day_or=spec.get("day_or", True), **common)
            )
        elif "interval" in spec:
            result.append(Interval(spec["interval"], timezone=spec.get("timezone"), **common))
        elif "rrule" in spec:
            result.append(RRule(spec["rrule"], timezone=spec.get("timezone"), **common))
        else:
            raise ServeError(f"deployment {entry.get('name')}: schedule {spec} has no cron, interval or rrule")
    return result


def to_runner_deployment(entry: dict[str, Any]) -> Any:
    """One prefect.yaml deployment as a deployment served by this process (no work pool)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.flows import load_flow_from_entrypoint

    try:
        flow = load_flow_from_entrypoint(entry["entrypoint"])
    except Exception as exc:  # a missing module or flow: Prefect raises import and attribute errors alike
        raise ServeError(
            f"deployment {entry['name']}: cannot load its entrypoint {entry['entrypoint']!r} "
            f"({type(exc).__name__}: {exc}); run rft serve from the project root"
        ) from None
    limit = entry.get("concurrency_limit")
    if isinstance(limit, dict):
        limit = ConcurrencyLimitConfig(**limit)
    return flow.to_deployment(
        name=entry["name"],
        schedules=schedules_of(entry),
        parameters=entry.get("parameters") or {},
        concurrency_limit=limit,
        description=entry.get("description"),
        tags=entry.get("tags"),
    )


def missing_parameters(entry: dict[str, Any]) -> list[str]:
    """The parameters a deployment's flow requires and its entry does not set (a run must be given them)."""
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(entry["entrypoint"])  # imported already by to_runner_deployment
    return [name for name in flow.parameters.required if name not in (entry.get("parameters") or {})]


def trigger_command(full_name: str, api_url: str, missing: list[str] = ()) -> str:
    """The shell command that triggers a run of served deployment `full_name` (flow/deployment),
    whatever the shell's Prefect profile: the API is named (`PREFECT_API_URL=...`), and a parameter
    the run needs is asked for (`-p version=VERSION`)."""
    asks = "".join(f" -p {name}={name.upper()}" for name in missing)
    return f"PREFECT_API_URL={api_url} prefect deployment run {full_name}{asks}"


def trigger_help(deployments: list[Any], entries: list[dict[str, Any]], api_url: str) -> list[str]:
    """What `rft deployments serve` prints once it serves: how to trigger each deployment from
    another shell, where to watch the runs, and how to serve a model (which this is not)."""
    ui = api_url.rstrip("/").removesuffix("/api")
    commands = [
        trigger_command(f"{deployment.flow_name}/{deployment.name}", api_url, missing_parameters(entry))
        for deployment, entry in zip(deployments, entries, strict=True)
    ]
    return [
        "Trigger a run from another shell (PREFECT_API_URL tells the prefect command which server):",
        *(f"  {command}" for command in commands),
        f"Watch the runs: {ui}/runs",
        "To serve a registered model over HTTP instead: mlflow models serve -m models:/NAME@champion "
        "--env-manager local -p 5001 (README: Serve the champion)",
    ]


PREFECT, HTTP, SILENT, NOTHING = "prefect", "http", "silent", "nothing"


def probe(api_url: str, timeout_s: float = 2.0) -> tuple[str, str]:
    """Who answers GET /health at `api_url`, and what it did: PREFECT (a Prefect API's `200 true`),
    HTTP (another answer over HTTP), SILENT (a connection, but no HTTP answer) or NOTHING (no one
    listens)."""
    url = api_url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read(64)
    except urllib.error.HTTPError as exc:
        return HTTP, f"GET {url} answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            return SILENT, f"GET {url} got no answer within {timeout_s:g} s"
        return NOTHING, str(exc.reason)
    except TimeoutError:
        return SILENT, f"GET {url} got no answer within {timeout_s:g} s"
    except (OSError, http.client.HTTPException) as exc:  # a connection reset, a reply that is not HTTP
        return SILENT, f"GET {url} got no HTTP answer ({type(exc).__name__})"
    if response.status == 200 and body.strip() == b"true":
        return PREFECT, url
    return HTTP, f"GET {url} answered {response.status} {body[:40]!r}, not a Prefect API's 200 true"


def _healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    """Whether a server answers at `api_url` over HTTP (an API the user names may sit behind a proxy
    or an auth wall that answers /health with an error status)."""
    return probe(api_url, timeout_s)[0] in (PREFECT, HTTP)


def _start_server(port: int, say: Callable[[str], None]) -> subprocess.Popen[bytes]:
    """`prefect server start` on 127.0.0.1:PORT (its database: PREFECT_HOME's, as usual)."""
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    if prefect is None:
        raise ServeError("the prefect command is not installed next to this Python")
    api_url = f"http://127.0.0.1:{port}/api"
    say(f"Starting a Prefect server at http://127.0.0.1:{port} (stops with rft serve)")
    # Its own session: a Ctrl-C in the terminal reaches rft serve, which stops it last. Bound to
    # this process's life: a kill -9 of rft serve takes it along.
    server = subprocess.Popen(
        die_with_parent([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while probe(api_url)[0] != PREFECT:
        if server.poll() is not None:
            raise ServeError(f"prefect server start exited with code {server.returncode} (is port {port} free?)")
        if time.monotonic() > deadline:
            _stop(server)
            raise ServeError(f"the Prefect server at {api_url} did not answer within 120 s")
        time.sleep(0.5)
    return server


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started in its own session, and everything it started."""
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def _refuse_worker_deployments(deployments: list[Any]) -> None:
    """Serving a name that `prefect deploy` gave to a work pool would leave a deployment neither
    the worker nor this process can run: say so instead."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            full_name = f"{deployment.flow_name}/{deployment.name}"
            try:
                existing = client.read_deployment_by_name(full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                taken.append((full_name, existing.work_pool_name))
    if taken:
        names = ", ".join(f"{name} (work pool {pool})" for name, pool in taken)
        deletes = "; ".join(f"prefect deployment delete {name}" for name, _ in taken)
        raise ServeError(
            f"already deployed to a work pool: {names}. Serve them or deploy them, not both: {deletes}"
        )


def _poll_seconds() -> float:
    from prefect.settings import PREFECT_RUNNER_POLL_FREQUENCY

    return float(PREFECT_RUNNER_POLL_FREQUENCY.value())


def tidy_abandoned(
    names: list[str], *, own_server: bool, say: Callable[[str], None] = print
) -> dict[str, int]:
    """Deployments named `names` that a stopped-uncleanly `rft serve` left active: served from a
    process (no work pool), not paused, and polled by nobody (never, or not for three poll
    intervals; any of them when this process had to start the server, as nobody could poll a
    server that was down). Each has its scheduled runs that are already due cancelled (they fell
    due while nobody served them; run all at once later, they would pile up) and is paused.
    Returns {deployment: cancelled runs}."""
    from datetime import datetime, timedelta, timezone

    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    now = datetime.now(timezone.utc)
    stale = timedelta(seconds=3 * _poll_seconds())
    tidied: dict[str, int] = {}
    with get_client(sync_client=True) as client:
        found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
        for deployment in found:
            polled = deployment.last_polled
            if deployment.work_pool_name or deployment.paused:
                continue
            if not own_server and polled is not None and now - polled < stale:
                continue  # another rft serve is serving it
            overdue = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                    expected_start_time=FlowRunFilterExpectedStartTime(before_=now),
                ),
            )
            message = "cancelled by rft serve: it fell due while no rft serve was running"
            for run in overdue:
                client.set_flow_run_state(run.id, Cancelled(message=message), force=True)
            client.pause_deployment(deployment.id)
            tidied[deployment.name] = len(overdue)
            say(
                f"Deployment {deployment.name} was left active by an rft serve that did not stop cleanly: "
                f"paused, {len(overdue)} overdue scheduled run(s) cancelled"
            )
    return tidied


def serve_deployments(
    prefect_file: Path = DEFAULT_PREFECT_FILE,
    names: list[str] | None = None,
    *,
    port: int = 4200,
    limit: int | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Serve the deployments of `prefect_file` (or only `names`) from this process until stopped.

    The Prefect API is the one `PREFECT_API_URL` names, else the one answering at
    http://127.0.0.1:PORT, else a `prefect server start` there for as long as this runs.
    """
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }.items():
        os.environ.setdefault(key, value)
    entries = read_deployments(prefect_file, names)
    # Served runs are subprocesses of this process: the environment a work pool's job variables
    # would give them is set here instead (a variable already set in the shell wins).
    for entry in entries:
        env = ((entry.get("work_pool") or {}).get("job_variables") or {}).get("env") or {}
        for key, value in env.items():
            os.environ.setdefault(key, str(value))
    server = None
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
    if not api_url:
        api_url = f"http://127.0.0.1:{port}/api"
        state, detail = probe(api_url)
        if state in (HTTP, SILENT):
            raise ServeError(
                f"port {port} of 127.0.0.1 is taken by a program that is not a Prefect server ({detail}): "
                "stop it, or pass rft serve --port with a free port (or set PREFECT_API_URL to your server)"
            )
        if state == NOTHING:
            server = _start_server(port, say)
    elif not _healthy(api_url):
        raise ServeError(f"the Prefect API at {api_url} (PREFECT_API_URL) is unreachable")
    os.environ["PREFECT_API_URL"] = api_url  # for the flow-run subprocesses
    try:
        from prefect import serve
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url}):
            deployments = [to_runner_deployment(entry) for entry in entries]
            _refuse_worker_deployments(deployments)
            every = [d.get("name") for d in read_deployments(prefect_file)]
            tidy_abandoned(every, own_server=server is not None, say=say)
            say(f"Serving {', '.join(e['name'] for e in entries)} with the Prefect API at {api_url}: Prefect "
                "deployments (flow runs on their schedules or when triggered), not a model server")
            for line in trigger_help(deployments, entries, api_url):
                say(line)
            # Prefect's own start message suggests `prefect deployment run` without the server it
            # needs (a shell without PREFECT_API_URL answers "not found" and exits 0): ours says it.
            serve(*deployments, limit=limit, print_starting_message=False)
    finally:
        if server is not None:
            _stop(server)
