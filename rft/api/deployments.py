"""Jobs as runs of rft's Prefect deployment, where `PREFECT_API_URL` names a server that has it.

Then a job is a run of the `rft-pipeline/rft-pipeline` deployment (`deployments/prefect.yaml`,
served by a worker on the work pool or by `rft serve`) on the job's config file: the schedule/worker
story holds, and the Prefect UI shows the job's flow run (named after the job). The server follows
the flow run's state; pause and cancel cancel the flow run (its worker stops the process),
resume starts a new run of the deployment on the same config, which resumes from the last
checkpoint as any rerun does. When the flow run completes, the job's result is read from the
tracking store and the job's directory (`rft.api.worker.finish_from_tracking`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("rft.api")

DEFAULT_DEPLOYMENT = "rft-pipeline/rft-pipeline"


@dataclass
class FlowRunState:
    """What the server needs of a flow run's state."""

    type: str  # Prefect's StateType name: SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CRASHED, ...
    message: str

    @property
    def final(self) -> bool:
        return self.type in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def find_deployment(name: str | None) -> str | None:
    """`name` when `PREFECT_API_URL` is set and the server there has that deployment, else None
    (jobs then run in the server's own worker processes)."""
    if not name or not os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None
    except Exception as exc:  # the server is down or not a Prefect API: say so, run jobs locally
        logger.warning("cannot ask %s for deployment %s (%s): jobs run in local workers",
                       os.environ.get("PREFECT_API_URL"), name, exc)
        return None
    return name


def submit(deployment: str, config_path: Path, job_id: str) -> str:
    """Start a run of the deployment on the job's config; its flow run id."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        name=deployment, parameters={"config_path": str(config_path), "overrides": []}, timeout=0,
        flow_run_name=job_id, tags=["rft-api"],
    )
    return str(flow_run.id)


def state(flow_run_id: str) -> FlowRunState:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    if run.state is None:
        return FlowRunState("PENDING", "")
    return FlowRunState(run.state.type.name, run.state.message or "")


def cancel(flow_run_id: str) -> None:
    """Ask the flow run's worker to stop it (Prefect's cancellation: the process is terminated)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="stopped through rft api"), force=True)
