"""`rft deployments serve` (alias `rft serve`) says what it serves and how to trigger it, and the
commands it prints work as printed, in a shell whose Prefect profile names no server; a deployment
that finds no registered model says which store it looked in."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.serve import trigger_command
from rft_core import tracking

ROOT = Path(__file__).resolve().parent.parent


def test_a_trigger_command_names_the_api_and_asks_for_required_parameters() -> None:
    api = "http://127.0.0.1:4321/api"
    assert trigger_command("rollback-model/rollback-model", api) == (
        f"PREFECT_API_URL={api} prefect deployment run rollback-model/rollback-model")
    assert trigger_command("promote-model/promote-model", api, ["version"]).endswith(
        "prefect deployment run promote-model/promote-model -p version=VERSION")


def test_a_missing_registered_model_or_alias_names_the_store(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    for call in (lambda: tracking.champion_version("nothing-here", tracking_uri=store),
                 lambda: tracking.check_registered("models:/nothing-here@champion", tracking_uri=store),
                 lambda: tracking.rollback("nothing-here", tracking_uri=store)):
        with pytest.raises(tracking.RegistryError, match=re.escape(f"no registered model named 'nothing-here' in {store}")):
            call()
    with pytest.raises(tracking.RegistryError, match=f"from {re.escape(store)}"):
        tracking.download_model("models:/nothing-here@champion", tracking_uri=store)


def environment(tmp_path: Path) -> dict[str, str]:
    """A shell with no Prefect API configured, its own Prefect home and no MLflow store set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(log: Path, proc: subprocess.Popen, text: str, within_s: float = 240) -> str:
    deadline = time.monotonic() + within_s
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    return log.read_text()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_served_deployments_trigger_as_printed_and_a_missing_model_names_its_store(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "data": {"synthetic": {"n_train": 40, "n_val": 8}},
        "tracking": {"tracking_uri": store},
        "registry": {"model_name": "nothing-here"},
    }))
    entry = {"entrypoint": "flows/deployments.py:evaluate_from_file",
             "parameters": {"config_path": str(config)}}
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump({"deployments": [{"name": "check-champion", **entry}]}))
    port, env, log = free_port(), environment(tmp_path), tmp_path / "serve.log"
    with log.open("w") as output:
        serve = subprocess.Popen(
            [sys.executable, "-m", "rft", "deployments", "serve", "--prefect-file", str(prefect_file),
             "--port", str(port)],
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        printed = wait_for(log, serve, "Watch the runs:")
        assert "Prefect deployments (flow runs on their schedules or when triggered), not a model server" in printed
        assert "mlflow models serve -m models:/NAME@champion" in printed
        command = next(line.strip() for line in printed.splitlines()
                       if line.strip().endswith("prefect deployment run evaluate-model/check-champion"))
        assert command.startswith(f"PREFECT_API_URL=http://127.0.0.1:{port}/api ")
        # As printed, in a shell that names no Prefect server.
        ran = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=environment(tmp_path),
                             capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", ran.stdout).group(1)
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        deadline = time.monotonic() + 240
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), \
                get_client(sync_client=True) as client:
            while not (run := client.read_flow_run(flow_run_id)).state.is_final():
                assert time.monotonic() < deadline and serve.poll() is None, log.read_text()[-3000:]
                time.sleep(1)
        assert run.state.is_failed()
        assert f"no registered model named 'nothing-here' in {store}" in run.state.message, run.state.message
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
