"""`rft api` end to end with the real openai SDK as the client against a real server on loopback.

The server runs as a subprocess (`python -m rft api`), as a user starts it: a test can `kill -9`
it and start it again on the same data directory, and its job workers are real processes running
the pipeline flow against a real Prefect API (the test harness, shared through PREFECT_API_URL) and
a real MLflow store (sqlite under the data directory), on tiny models.

One server for the module. Jobs run one at a time (`--max-concurrent-jobs 1`), in the order the
tests need: a supervised job on rft-tiny, a reinforcement job from its fine-tuned model with a
python grader (run in rft's sandbox), then cancel, pause/resume and restarts on longer
reinforcement jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from rft.api import hyperparameters as hp_map
from rft.api.auth import AuthConfigError, check_bind, load_keys
from rft.api.uploads import receive_upload
from rft_core.config import SyntheticConfig
from rft_core.data.synthetic import generate_arithmetic

KEY = "sk-test-rft-api"
REPO = Path(__file__).resolve().parents[1]

# Every job starts from this base config (the server's --config): tiny model, few steps.
BASE = {
    "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                       "vocab_size": 320, "pretrain_steps": 5}},
    "sft": {"batch_size": 8, "max_steps": 4, "checkpoint_interval": 2, "eval_interval": 2},
    "rl": {"iterations": 2, "prompts_per_iteration": 4, "samples_per_prompt": 2, "minibatch_size": 8,
           "max_new_tokens": 16, "eval_interval": 0, "checkpoint_interval": 1, "lr": 1e-3, "critic_warmup": 0},
    "eval": {"max_new_tokens": 16, "k": 0},
    "grader": {"timeout_s": 2.0},
}
PYTHON_GRADER = {
    "type": "python",
    "name": "final_answer",
    "source": "def grade(sample, item):\n"
              "    answer = sample['output_text'].split('####')[-1].strip()\n"
              "    return 1.0 if answer == item['reference_answer'] else 0.0\n",
}
TERMINAL = ("succeeded", "failed", "cancelled")


# --------------------------------------------------------------------------- data


def _items() -> tuple[list[dict], list[dict]]:
    return generate_arithmetic(SyntheticConfig(n_train=48, n_val=6, solution_fraction=1.0, max_steps=2, seed=3))


def sft_row(item: dict) -> dict:
    """OpenAI's chat format: the assistant's worked answer last."""
    return {"messages": [{"role": "system", "content": "Answer with '#### <number>'."},
                         {"role": "user", "content": item["question"]},
                         {"role": "assistant", "content": item["answer"]}]}


def rft_row(item: dict) -> dict:
    """OpenAI's RFT format: the user's turn last, the reference beside it."""
    return {"messages": [{"role": "user", "content": item["question"]}],
            "reference_answer": item["answer"].rsplit("####", 1)[1].strip()}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    train, val = _items()
    files = {
        "sft_train": jsonl([sft_row(r) for r in train[:32]]),
        "sft_val": jsonl([sft_row(r) for r in val]),
        "rft_train": jsonl([rft_row(r) for r in train]),
        "rft_val": jsonl([rft_row(r) for r in val]),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_bytes(content)
    return paths


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`rft api` as a subprocess on a data directory; stoppable gracefully or with kill -9."""

    def __init__(self, data_dir: Path, config: Path, prefect_api: str, extra: list[str] | None = None) -> None:
        self.data_dir, self.config, self.prefect_api = data_dir, config, prefect_api
        self.extra = extra or []
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        env = {**os.environ, "RFT_API_KEYS": f"{KEY},second-key", "PREFECT_API_URL": self.prefect_api,
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "rft", "api", "--port", str(self.port), "--data-dir", str(self.data_dir),
               "--config", str(self.config), "--max-upload-mb", "1", *self.extra]
        self.log = self.data_dir.parent / f"server-{self.port}.log"
        log = open(self.data_dir.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115 - kept for the process
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir.parent)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.data_dir.parent / f"server-{self.port}.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise AssertionError("rft api did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()


def worker_pids(data_dir: Path) -> dict[str, int]:
    """Job id -> the pid of its worker, as the server recorded it."""
    from rft.api.store import Store

    return {job.id: job.data["pid"] for job in Store(data_dir / "api.sqlite").list_jobs() if job.data.get("pid")}


def worker_of(data_dir: Path, job_id: str) -> int:
    """The pid of the job's worker once the server has recorded it (a job reads 'running' a moment before its
    worker's pid is on it: the server starts the worker after taking the job)."""
    return wait_for(lambda: worker_pids(data_dir).get(job_id), timeout=30, what=f"the worker of {job_id}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def server(tmp_path_factory, prefect_api):
    root = tmp_path_factory.mktemp("api")
    config = root / "base.yaml"
    config.write_text(yaml.safe_dump(BASE))
    # Jobs in the server's own workers (the harness has no deployment; the last test adds one).
    srv = Server(root / "data", config, prefect_api, extra=["--prefect-deployment", "none"])
    srv.start()
    yield srv
    srv.stop()
    for pid in worker_pids(srv.data_dir).values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def wait_for(predicate, timeout: float = 300, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def finished(client: OpenAI, job_id: str, timeout: float = 400):
    job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in TERMINAL and j, timeout,
                   f"job {job_id} to finish")
    return job


def upload(client: OpenAI, path: Path):
    with open(path, "rb") as handle:
        return client.files.create(file=handle, purpose="fine-tune")


def job_config(server: Server, job_id: str) -> dict:
    return yaml.safe_load((server.data_dir / "jobs" / job_id / "config.yaml").read_text())


# --------------------------------------------------------------------------- files


def test_files_upload_list_retrieve_content_delete(client, data_files):
    created = upload(client, data_files["rft_val"])
    assert created.id.startswith("file-") and created.object == "file"
    assert created.bytes == data_files["rft_val"].stat().st_size
    assert created.filename == "rft_val.jsonl" and created.purpose == "fine-tune" and created.status == "processed"
    assert isinstance(created.created_at, int)
    assert client.files.retrieve(created.id) == created
    assert created.id in [f.id for f in client.files.list()]
    assert client.files.content(created.id).read() == data_files["rft_val"].read_bytes()
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "file")
    assert created.id not in [f.id for f in client.files.list()]
    with pytest.raises(openai.NotFoundError) as err:
        client.files.retrieve(created.id)
    assert err.value.body["param"] == "file_id" and err.value.body["code"] == "file_not_found"


def test_a_filename_never_reaches_the_file_system(client, server):
    for name in ("../../escape.jsonl", "/etc/passwd", "a/b\\c.jsonl"):
        created = client.files.create(file=(name, b'{"x": 1}\n'), purpose="fine-tune")
        assert client.files.content(created.id).read() == b'{"x": 1}\n'
        assert (server.data_dir / "files" / created.id).is_file()
    assert not (server.data_dir.parent / "escape.jsonl").exists()
    assert sorted(p.name for p in (server.data_dir / "files").iterdir() if not p.name.startswith("file-")) == []


def test_uploads_over_the_limit_or_without_purpose_are_refused_and_leave_nothing(client, server):
    before = set((server.data_dir / "files").iterdir())
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.jsonl", b"x" * (1024 * 1024 + 1)), purpose="fine-tune")
    assert err.value.status_code == 413 and err.value.body["code"] == "file_too_large"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="assistants")
    assert err.value.body["param"] == "purpose"
    response = httpx.post(server.url + "/files", headers={"Authorization": f"Bearer {KEY}"},
                          files={"file": ("a.jsonl", b"{}\n")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    assert set((server.data_dir / "files").iterdir()) == before


def test_an_upload_is_streamed_to_disk_not_held_in_memory(tmp_path):
    """50 MB through the upload parser in 64 KiB chunks: the file is whole, the peak of memory
    allocated while parsing stays near one chunk."""
    boundary = "rftboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    chunk, n_chunks = b"0123456789abcdef" * 4096, 800

    async def body():
        yield head
        for _ in range(n_chunks):
            yield chunk
        yield tail

    target = tmp_path / "upload"
    tracemalloc.start()
    upload_result = asyncio.run(receive_upload(f"multipart/form-data; boundary={boundary}", body(), target,
                                               max_bytes=1 << 30))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert upload_result.size == len(chunk) * n_chunks == target.stat().st_size
    assert upload_result.fields == {"purpose": "fine-tune"} and upload_result.filename == "big.jsonl"
    assert peak < 4 * len(chunk) + (1 << 20), f"peak {peak} bytes while streaming {upload_result.size}"


# --------------------------------------------------------------------------- auth and errors


def test_a_bad_or_missing_key_is_401_in_openais_shape(server):
    for key in ("wrong-key", ""):
        bad = OpenAI(base_url=server.url, api_key=key or "x", max_retries=0,
                     default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as err:
            bad.files.list()
        assert err.value.status_code == 401
        assert set(err.value.body) == {"message", "type", "param", "code"} and err.value.body["code"] == "invalid_api_key"
    second = OpenAI(base_url=server.url, api_key="second-key", max_retries=0)
    assert second.models.list().data[0].id == "rft-tiny"


def test_keys_and_bind_address_rules(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nk1\n\n k2 \n")
    assert load_keys(keys_file, {"RFT_API_KEYS": "k3, k4"}) == {"k1", "k2", "k3", "k4"}
    assert load_keys(None, {}) == frozenset()
    (tmp_path / "empty").write_text("# none\n")
    with pytest.raises(AuthConfigError):
        load_keys(tmp_path / "empty", {})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert "loopback" in check_bind(host, frozenset())
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        with pytest.raises(AuthConfigError, match="not a loopback address"):
            check_bind(host, frozenset())
        assert check_bind(host, frozenset({"k"})) is None


def test_rft_api_refuses_a_public_address_without_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RFT_API_KEYS"}
    result = subprocess.run([sys.executable, "-m", "rft", "api", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error:" in result.stderr and "not a loopback address" in result.stderr and "Traceback" not in result.stderr


def test_malformed_bodies_are_400_naming_the_field(client, server, data_files):
    train = upload(client, data_files["rft_train"])
    cases = [
        (dict(model="rft-tiny", training_file=train.id, extra_body={"epochs": 3}), "epochs"),
        (dict(model="rft-tiny", training_file=train.id, seed="zero"), "seed"),
        (dict(model="rft-tiny", training_file=train.id, suffix="has space"), "suffix"),
        (dict(model="rft-tiny", training_file=train.id,
              method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}),
         "method.supervised.hyperparameters.n_epochs"),
        (dict(model="rft-tiny", training_file=train.id,
              method={"type": "reinforcement", "reinforcement": {"grader": PYTHON_GRADER,
                                                                  "hyperparameters": {"reasoning_effort": "max"}}}),
         "method.reinforcement.hyperparameters.reasoning_effort"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(**kwargs)
        assert err.value.body["param"] == param, err.value.body
        assert err.value.body["type"] == "invalid_request_error"
    raw = httpx.post(server.url + "/fine_tuning/jobs", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    missing = httpx.post(server.url + "/fine_tuning/jobs", json={"model": "rft-tiny"},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "training_file"


def test_unknown_files_models_jobs_are_404_and_dpo_and_bad_graders_are_400(client, data_files):
    train = upload(client, data_files["rft_train"])
    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.create(model="rft-tiny", training_file="file-000000000000000000000000")
    assert err.value.body["param"] == "training_file" and err.value.body["code"] == "file_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.create(model="rft-tiny", training_file=train.id, validation_file="file-nope")
    assert err.value.body["param"] == "validation_file"
    for model in ("gpt-4o-mini", "ft:rft-tiny::ftjob-000000000000000000000000", "/etc", "ft:rft-tiny:x:y:ckpt-step-1"):
        with pytest.raises(openai.NotFoundError) as err:
            client.fine_tuning.jobs.create(model=model, training_file=train.id)
        assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="rft-tiny", training_file=train.id, method={"type": "dpo", "dpo": {}})
    assert err.value.body["param"] == "method.type" and "dpo" in err.value.body["message"]
    bad_graders = [
        {"type": "string_check", "name": "x", "operation": "eqq", "input": "{{ sample.output_text }}", "reference": "a"},
        {"type": "python", "name": "p", "source": "def grade(sample, item) return 1"},
        {"type": "multi", "name": "m", "calculate_output": "a +", "graders": {"a": PYTHON_GRADER}},
        {"name": "no type"},
    ]
    for grader in bad_graders:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model="rft-tiny", training_file=train.id,
                                           method={"type": "reinforcement", "reinforcement": {"grader": grader}})
        assert err.value.body["param"] == "method.reinforcement.grader" and err.value.body["code"] == "invalid_grader"


def test_a_file_with_bad_rows_fails_the_job_naming_file_line_and_field(client, data_files):
    rows = data_files["rft_train"].read_bytes().splitlines()
    rows[2] = b'{"messages": [{"role": "assistant", "content": "hi"}], "reference_answer": "3"}'
    rows[4] = b'{"messages": [{"role": "user", "content": "q"}]}'
    rows[6] = b"{broken json"
    bad = client.files.create(file=("bad.jsonl", b"\n".join(rows) + b"\n"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="rft-tiny", training_file=bad.id,
                                         method={"type": "reinforcement", "reinforcement": {"grader": PYTHON_GRADER}})
    assert job.status == "validating_files"
    job = finished(client, job.id, timeout=120)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert job.error.param == "training_file" and job.error.code == "invalid_file"
    message = job.error.message
    assert f"training_file {bad.id} (bad.jsonl)" in message and "3 of 48 rows are invalid" in message
    assert "line 3, field 'messages'" in message and "line 5, field 'reference'" in message and "line 7" in message
    assert any(e.level == "error" and "line 3" in e.message for e in client.fine_tuning.jobs.list_events(job.id))


# --------------------------------------------------------------------------- supervised, then reinforcement


@pytest.fixture(scope="module")
def supervised(client, data_files):
    train, val = upload(client, data_files["sft_train"]), upload(client, data_files["sft_val"])
    created = client.fine_tuning.jobs.create(
        model="rft-tiny", training_file=train.id, validation_file=val.id, suffix="warmup", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}},
        metadata={"experiment": "chain", "step": "sft"},
    )
    return created, finished(client, created.id)


@pytest.fixture(scope="module")
def reinforcement(client, data_files, supervised):
    _, sft = supervised
    train, val = upload(client, data_files["rft_train"]), upload(client, data_files["rft_val"])
    created = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model, training_file=train.id, validation_file=val.id, suffix="rl",
        method={"type": "reinforcement", "reinforcement": {
            "grader": PYTHON_GRADER,
            "hyperparameters": {"n_epochs": 1, "batch_size": 16, "eval_interval": 1, "compute_multiplier": 1.0,
                                "learning_rate_multiplier": 0.5, "reasoning_effort": "medium"},
        }},
        metadata={"experiment": "chain", "step": "rl"},
    )
    return created, finished(client, created.id)


def test_a_supervised_job_on_rft_tiny_succeeds_with_its_fields_filled_in(supervised, server):
    created, job = supervised
    assert created.status == "validating_files" and created.fine_tuned_model is None and created.finished_at is None
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:rft-tiny:warmup:{job.id}"
    assert job.model == "rft-tiny" and job.seed == 7 and job.user_provided_suffix == "warmup"
    assert job.method.type == "supervised"
    # The values used, written back: 32 examples in batches of 8 for one epoch.
    assert job.hyperparameters.model_dump() == {"batch_size": 8, "learning_rate_multiplier": 1.0, "n_epochs": 1}
    assert job.method.supervised.hyperparameters.n_epochs == 1
    assert job.finished_at >= job.created_at and job.trained_tokens > 0 and job.error is None
    assert job.metadata == {"experiment": "chain", "step": "sft"}
    cfg = job_config(server, job.id)
    assert cfg["rl"]["enabled"] is False and cfg["sft"]["epochs"] == 1 and cfg["sft"]["max_steps"] is None
    assert cfg["seed"] == cfg["sft"]["seed"] == 7 and cfg["model"]["name_or_path"] == "tiny"


def test_a_job_is_backed_by_its_registered_mlflow_version(supervised, server):
    from mlflow import MlflowClient

    _, job = supervised
    mlflow = MlflowClient(f"sqlite:///{server.data_dir / 'mlflow.db'}")
    version = mlflow.get_model_version("ft-rft-tiny-warmup", "1")
    assert version.tags["gate.decision"] == "promoted" and "config_digest" in version.tags
    assert version.description
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("rft").experiment_id],
                              f"tags.`mlflow.runName` = '{job.id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_events_are_messages_and_per_step_metrics(client, supervised):
    _, job = supervised
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert all(e.object == "fine_tuning.job.event" and e.id.startswith("ftevent-") for e in events)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    messages = [e.message for e in events if e.type == "message"]
    assert messages[0] == "The job has successfully completed" and messages[-1] == f"Created fine-tuning job: {job.id}"
    assert f"New fine-tuned model created: {job.fine_tuned_model}" in messages[1]
    metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert [d["step"] for d in metrics] == [0, 1, 2, 3, 4]
    assert all(d["total_steps"] == 4 for d in metrics)
    assert all(isinstance(d["train_loss"], float) for d in metrics[1:])
    assert all(isinstance(metrics[s]["valid_loss"], float) for s in (0, 2, 4))
    # Paging: `after` continues where the last page ended, `has_more` says when to stop.
    first = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert first.has_more and len(first.data) == 3
    rest = client.fine_tuning.jobs.list_events(job.id, after=first.data[-1].id, limit=100)
    assert [e.id for e in first.data + rest.data] == [e.id for e in events]


def _tracked_job(data_dir: Path, steps: int):
    """A job's tracking as a worker leaves it: the parent run named after the job, its `rl` child
    run with `steps` steps; the API's store with the job, running."""
    from mlflow import MlflowClient

    from rft.api.settings import ServerSettings
    from rft.api.store import Job, Store

    settings = ServerSettings(data_dir=data_dir)
    settings.ensure_dirs()
    mlflow = MlflowClient(settings.tracking_uri)
    experiment = mlflow.create_experiment("rft")
    parent = mlflow.create_run(experiment, run_name="ftjob-1")
    child = mlflow.create_run(experiment, run_name="rl", tags={"mlflow.parentRunId": parent.info.run_id})
    for step in range(1, steps + 1):
        mlflow.log_metric(child.info.run_id, "rl/reward_mean", step / 10, step=step)
    store = Store(settings.db_path)
    job = Job("ftjob-1", 0, "running", {"experiment": "rft", "method_type": "reinforcement", "total_steps": steps})
    store.add_job(job)
    return settings, store, job


def test_the_end_of_a_job_publishes_every_step_even_when_the_tracking_store_cannot_be_read(tmp_path, monkeypatch):
    """The final sync of a job's metrics events tries again while the store cannot be read; when it
    never could, the job says its events are pending and listing them publishes them."""
    import shutil
    import threading

    from fastapi.testclient import TestClient

    from rft.api import results
    from rft.api.app import create_app

    settings, store, job = _tracked_job(tmp_path, 4)
    db, real = tmp_path / "mlflow.db", tmp_path / "mlflow.db.real"

    def unreadable() -> None:
        shutil.move(db, real)
        db.write_text("not a database")

    def readable() -> None:
        db.unlink()
        shutil.move(real, db)

    # Readable again during the tries: every step, nothing pending.
    unreadable()
    monkeypatch.setattr(results, "FINAL_SYNC_DELAYS", (0.0, 2.0))
    assert results.sync_metric_events(settings, store, job) is False  # a poll: the next one tries again
    swap = threading.Timer(0.5, readable)
    swap.start()
    results.settle_metric_events(settings, store, job)
    swap.join()
    assert store.event_keys(job.id, "metrics:") == {f"metrics:{s}" for s in range(1, 5)}
    assert "metrics_pending" not in store.get_job(job.id).data

    # Unreadable throughout: pending, and the next listing of the job's events publishes them.
    settings, store, job = _tracked_job(tmp_path / "second", 4)
    db, real = tmp_path / "second" / "mlflow.db", tmp_path / "second" / "mlflow.db.real"
    unreadable()
    monkeypatch.setattr(results, "FINAL_SYNC_DELAYS", (0.0, 0.0))
    results.settle_metric_events(settings, store, job)
    assert store.get_job(job.id).data["metrics_pending"] is True
    store.transition(job.id, ("running",), "succeeded")
    readable()
    with TestClient(create_app(settings, run_jobs=False)) as api:
        events = api.get(f"/v1/fine_tuning/jobs/{job.id}/events", params={"limit": 100}).json()["data"]
    assert sorted(e["data"]["step"] for e in events if e["type"] == "metrics") == [1, 2, 3, 4]
    assert "metrics_pending" not in store.get_job(job.id).data


def test_a_job_s_rerun_renamed_at_its_end_keeps_all_its_steps_and_its_result(tmp_path):
    """A resumed job's pipeline run reuses cached stages, and at its end MLflow's run name gets
    ` (rerun, reused validate, ...)`: the job's runs are found by the name they started with."""
    from mlflow import MlflowClient

    from rft.api import results
    from rft.api.settings import ServerSettings
    from rft.api.store import Job, Store
    from rft_core import tracking
    from rft_core.config import RFTConfig

    settings = ServerSettings(data_dir=tmp_path)
    settings.ensure_dirs()
    cfg = RFTConfig.from_dict({"run_name": "ftjob-2", "experiment": "rft"})
    first = tracking.start_pipeline_run(cfg, tracking_uri=settings.tracking_uri)
    rerun = tracking.start_pipeline_run(cfg, tracking_uri=settings.tracking_uri)
    mlflow = MlflowClient(settings.tracking_uri)
    experiment = mlflow.get_experiment_by_name("rft").experiment_id
    for parent, steps in ((first, range(1, 4)), (rerun, range(3, 7))):
        child = mlflow.create_run(experiment, run_name="rl", tags={"mlflow.parentRunId": parent})
        for step in steps:
            mlflow.log_metric(child.info.run_id, "rl/reward_mean", step / 10, step=step)
        mlflow.set_terminated(child.info.run_id, "FINISHED" if parent == rerun else "KILLED")
    name = tracking.mark_rerun(rerun, {"validate": (first, first)}, ran=["rl"], tracking_uri=settings.tracking_uri)
    assert name == "ftjob-2 (rerun, reused validate)"

    store = Store(settings.db_path)
    job = Job("ftjob-2", 0, "running", {"experiment": "rft", "method_type": "reinforcement", "total_steps": 6})
    store.add_job(job)
    results.settle_metric_events(settings, store, job)
    assert store.event_keys(job.id, "metrics:") == {f"metrics:{s}" for s in range(1, 7)}
    client = MlflowClient(settings.tracking_uri)
    assert [run.info.run_id for run in results.job_pipeline_runs(client, experiment, job.id)] == [rerun, first]


def test_checkpoints_and_results_file(client, supervised, server):
    _, job = supervised
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]
    for ckpt in checkpoints:
        assert ckpt.object == "fine_tuning.job.checkpoint" and ckpt.fine_tuning_job_id == job.id
        assert ckpt.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{ckpt.step_number}"
        assert ckpt.metrics.step == ckpt.step_number and isinstance(ckpt.metrics.train_loss, float)
        assert isinstance(ckpt.metrics.valid_loss, float)
    assert checkpoints == client.fine_tuning.jobs.checkpoints.list(job.id).data  # stable ids
    [result_id] = job.result_files
    assert client.files.retrieve(result_id).purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(client.files.content(result_id).text)))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4] and rows[1]["train_loss"]


def test_a_reinforcement_job_starts_from_the_supervised_model(reinforcement, supervised, server):
    _, sft = supervised
    created, job = reinforcement
    assert job.status == "succeeded", job.error
    assert job.model == sft.fine_tuned_model and job.fine_tuned_model == f"ft:rft-tiny:rl:{job.id}"
    assert job.method.reinforcement.grader.type == "python"
    assert job.method.reinforcement.grader.source == PYTHON_GRADER["source"]
    hp = job.method.reinforcement.hyperparameters
    # 48 training prompts, 16 per iteration: one epoch is 3 iterations.
    assert (hp.n_epochs, hp.batch_size, hp.eval_interval, hp.compute_multiplier) == (1, 16, 1, 1.0)
    assert (hp.learning_rate_multiplier, hp.reasoning_effort, hp.eval_samples) == (0.5, "medium", 0)
    cfg = job_config(server, job.id)
    sft_dir = json.loads(json.dumps(job_config(server, sft.id)))["output_dir"]
    assert cfg["sft"]["enabled"] is False and cfg["rl"]["enabled"] is True
    assert cfg["model"]["name_or_path"].startswith(sft_dir) and Path(cfg["model"]["name_or_path"], "config.json").is_file()
    assert cfg["rl"]["iterations"] == 3 and cfg["rl"]["prompts_per_iteration"] == 16 and cfg["rl"]["lr"] == 5e-4
    assert cfg["grader"]["spec"] == PYTHON_GRADER and cfg["grader"]["sandbox"] == "namespaces"


def test_reinforcement_events_show_rewards_kl_and_validation(client, reinforcement):
    _, job = reinforcement
    metrics = sorted((e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"),
                     key=lambda d: d["step"])
    assert [d["step"] for d in metrics] == [0, 1, 2, 3]
    for data in metrics[1:]:
        assert 0.0 <= data["train_reward_mean"] <= 1.0 and isinstance(data["kl"], float)
        assert 0.0 <= data["valid_reward_mean"] <= 1.0 and 0.0 <= data["valid_accuracy"] <= 1.0
        assert data["train_grader_errors"] == 0.0
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [3, 2]
    assert checkpoints[0].metrics.model_extra["train_reward_mean"] == metrics[3]["train_reward_mean"]


def test_models_lists_bases_fine_tuned_models_and_checkpoints(client, reinforcement, supervised):
    _, rl = reinforcement
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "rft-tiny"
    assert {rl.fine_tuned_model, f"{rl.fine_tuned_model}:ckpt-step-3", supervised[1].fine_tuned_model} <= set(ids)
    model = client.models.retrieve(rl.fine_tuned_model)
    assert model.id == rl.fine_tuned_model and model.object == "model" and model.created == rl.finished_at
    assert client.fine_tuning.jobs.list(metadata={"experiment": "chain", "step": "rl"}).data == [
        client.fine_tuning.jobs.retrieve(rl.id)
    ]
    assert len(client.fine_tuning.jobs.list(metadata={"experiment": "chain"}).data) == 2
    page = client.fine_tuning.jobs.list(limit=1)
    assert len(page.data) == 1 and page.has_more


# --------------------------------------------------------------------------- chat completions


def _evaluated(server: Server, job_id: str) -> list[dict]:
    [samples] = (server.data_dir / "jobs" / job_id / "out" / "stages").glob("evaluate-*/samples_rl.json")
    return json.loads(samples.read_text())


def test_chat_completions_equal_what_evaluation_produced(client, reinforcement, server, data_files):
    _, job = reinforcement
    rows = {json.loads(line)["messages"][-1]["content"]: json.loads(line)
            for line in data_files["rft_val"].read_text().splitlines()}
    evaluated = _evaluated(server, job.id)
    assert len(evaluated) == 6
    for sample in evaluated:
        messages = rows[sample["prompt"]]["messages"]
        plain = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=0)
        assert plain.object == "chat.completion" and plain.model == job.fine_tuned_model
        [choice] = plain.choices
        assert choice.message.content == sample["completion"] and choice.message.role == "assistant"
        assert choice.finish_reason in ("stop", "length") and choice.index == 0
        assert plain.usage.completion_tokens <= 16 and plain.usage.prompt_tokens > 0
        assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
        stream = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == sample["completion"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_chat_options_n_seed_stop_max_tokens(client, reinforcement):
    _, job = reinforcement
    messages = [{"role": "user", "content": "Ann has 3 hats. Bob has 2 more hats than Ann. How many hats does Bob have?"}]
    greedy = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    short = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=0,
                                           max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3
    full = greedy.choices[0].message.content
    assert full.startswith(short.choices[0].message.content)
    if greedy.usage.completion_tokens // 2 > 3:  # the full answer goes on: the short one was cut
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    legacy = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=0, max_tokens=3)
    assert legacy.choices[0].message.content == short.choices[0].message.content
    sampled = [client.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=1.0,
                                              seed=11, n=3) for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    if len(full) > 2:
        stop = full[1:3]
        cut = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == full[: full.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_a_checkpoint_is_served_as_evaluation_would_generate_with_it(client, reinforcement, server, data_files):
    from rft_core.config import RFTConfig
    from rft_core.data import load_items
    from rft_core.stages import evaluate_model_dir

    _, job = reinforcement
    name = f"{job.fine_tuned_model}:ckpt-step-2"
    cfg = RFTConfig.from_dict(job_config(server, job.id))
    [ckpt] = (server.data_dir / "jobs" / job.id / "out" / "stages").glob("rl-*/checkpoints/step-2/model")
    frame = load_items(data_files["rft_val"], cfg.data).frame
    report = evaluate_model_dir(cfg, ckpt, frame)
    for sample, (_, row) in zip(report.samples, frame.iterrows(), strict=True):
        answer = client.chat.completions.create(model=name, messages=list(row["messages"]), temperature=0)
        assert answer.choices[0].message.content == sample["completion"]


def test_a_checkpoint_is_the_base_of_a_new_job_through_a_copy_of_it(client, reinforcement, server, data_files):
    _, job = reinforcement
    name = f"{job.fine_tuned_model}:ckpt-step-2"
    train = upload(client, data_files["rft_train"])
    child = client.fine_tuning.jobs.create(model=name, training_file=train.id, suffix="fromckpt",
                                           method={"type": "reinforcement", "reinforcement": {"grader": PYTHON_GRADER}})
    assert child.model == name
    wait_for(lambda: client.fine_tuning.jobs.retrieve(child.id).status != "validating_files", timeout=120,
             what="the files to be validated")
    assert client.fine_tuning.jobs.cancel(child.id).status == "cancelled"
    source = Path(job_config(server, child.id)["model"]["name_or_path"])
    assert source.parent == server.data_dir / "models"  # a copy: the parent job prunes its checkpoints
    [original] = (server.data_dir / "jobs" / job.id / "out" / "stages").glob("rl-*/checkpoints/step-2/model")
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in original.iterdir())
    assert (source / "model.safetensors").read_bytes() == (original / "model.safetensors").read_bytes()
    # The fine-tuned model keeps the root base's name: ft:rft-tiny:..., as OpenAI names models of models.
    assert client.fine_tuning.jobs.retrieve(child.id).model_dump()["method"]["type"] == "reinforcement"
    assert job_config(server, child.id)["registry"]["model_name"] == "ft-rft-tiny-fromckpt"


def test_chat_refuses_base_models_and_conversations_not_ending_with_the_user(client, reinforcement):
    _, job = reinforcement
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="rft-tiny", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"},
                                                                            {"role": "assistant", "content": "yo"}])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert err.value.body["param"] == "tools"


# --------------------------------------------------------------------------- graders


def _run(client, grader, sample, item=None):
    response = client.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item=item or {})
    raw = response.model_dump(by_alias=True)
    errors = raw["metadata"]["errors"]
    # Every field of OpenAI's response is there, with its type (the SDK would parse a missing one as None).
    assert set(raw) >= {"reward", "sub_rewards", "metadata", "model_grader_token_usage_per_model"}
    assert set(raw["metadata"]) >= {"name", "type", "execution_time", "scores", "token_usage", "sampled_model_name", "errors"}
    assert set(errors) >= {
        "formula_parse_error", "invalid_variable_error", "model_grader_parse_error", "model_grader_refusal_error",
        "model_grader_server_error", "model_grader_server_error_details", "other_error", "python_grader_runtime_error",
        "python_grader_runtime_error_details", "python_grader_server_error", "python_grader_server_error_type",
        "sample_parse_error", "truncated_observation_error", "unresponsive_reward_error",
    }
    assert isinstance(raw["reward"], float) and isinstance(raw["metadata"]["execution_time"], float)
    assert raw["metadata"]["execution_time"] >= 0 and raw["model_grader_token_usage_per_model"] == {}
    assert raw["metadata"]["name"] == grader.get("name", grader["type"]) and raw["metadata"]["type"] == grader["type"]
    flags = {k for k, v in errors.items() if v is True}
    return raw, flags


def test_grader_run_answers_openais_full_response(client):
    exact = {"type": "string_check", "name": "exact", "operation": "eq", "input": "{{ sample.output_text }}",
             "reference": "{{ item.answer }}"}
    raw, flags = _run(client, exact, "42", {"answer": "42"})
    assert raw["reward"] == 1.0 and flags == set() and raw["sub_rewards"] == {}
    assert raw["metadata"]["scores"] == {"exact": 1.0} and raw["metadata"]["errors"]["python_grader_runtime_error_details"] is None
    raw, flags = _run(client, exact, "41", {"answer": "42"})
    assert raw["reward"] == 0.0 and flags == set()
    fuzzy = {"type": "text_similarity", "name": "sim", "evaluation_metric": "fuzzy_match",
             "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}"}
    raw, flags = _run(client, fuzzy, "the answer is 42", {"answer": "the answer is 43"})
    assert 0.5 < raw["reward"] < 1.0 and flags == set()
    multi = {"type": "multi", "name": "mix", "calculate_output": "0.5 * a + 0.5 * b",
             "graders": {"a": exact, "b": {**exact, "operation": "ilike"}}}
    raw, flags = _run(client, multi, "FORTY-TWO", {"answer": "forty-two"})
    assert raw["reward"] == 0.5 and raw["sub_rewards"] == {"a": 0.0, "b": 1.0} and raw["metadata"]["scores"] == {"a": 0.0, "b": 1.0}
    raw, flags = _run(client, PYTHON_GRADER, "so #### 7", {"reference_answer": "7"})
    assert raw["reward"] == 1.0 and flags == set() and raw["metadata"]["sampled_model_name"] is None


@pytest.mark.parametrize(
    ("grader", "sample", "item", "flag"),
    [
        ({"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1 / 0\n"}, "x", {},
         "python_grader_runtime_error"),
        ({"type": "python", "name": "p", "source": "def grade(sample, item):\n    while True:\n        pass\n"}, "x", {},
         "unresponsive_reward_error"),
        ({"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 3.0\n"}, "x", {}, "other_error"),
        ({"type": "string_check", "name": "s", "operation": "eq", "input": "{{ sample.output_text }}",
          "reference": "{{ item.nothing }}"}, "x", {"answer": "1"}, "invalid_variable_error"),
        ({"type": "string_check", "name": "s", "operation": "eq", "input": "{{ sample.output_json.answer }}",
          "reference": "1"}, "not json", {}, "sample_parse_error"),
        ({"type": "multi", "name": "m", "calculate_output": "a / b", "graders": {
            "a": {"type": "string_check", "name": "a", "operation": "eq", "input": "{{ sample.output_text }}", "reference": "x"},
            "b": {"type": "string_check", "name": "b", "operation": "eq", "input": "{{ sample.output_text }}", "reference": "y"},
        }}, "x", {}, "formula_parse_error"),
    ],
    ids=["runtime", "timeout", "out_of_range", "missing_field", "not_json", "formula"],
)
def test_grader_errors_set_the_flag_that_says_why(client, grader, sample, item, flag):
    raw, flags = _run(client, grader, sample, item)
    assert flags == {flag} and raw["reward"] == 0.0
    assert raw["metadata"]["rft_errors"], "rft's own message says what failed"
    if flag == "python_grader_runtime_error":
        assert "ZeroDivisionError" in raw["metadata"]["errors"]["python_grader_runtime_error_details"]


def test_grader_validate_returns_the_grader_or_400_listing_every_problem(client):
    valid = {"type": "string_check", "name": "x", "operation": "eq", "input": "{{ sample.output_text }}", "reference": "a"}
    assert client.fine_tuning.alpha.graders.validate(grader=valid).grader.model_dump(exclude_none=True) == valid
    assert client.fine_tuning.alpha.graders.validate(grader=PYTHON_GRADER).grader.source == PYTHON_GRADER["source"]
    for grader, words in [
        ({"type": "string_check", "name": "x", "operation": "eqq"}, ("missing field 'input'", "eqq")),
        ({"type": "python", "name": "p", "source": "def grade(:"}, ("python",)),
        ({"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "nope"}, ("nope",)),
        ({"type": "nonsense"}, ("unknown grader type",)),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.alpha.graders.validate(grader=grader)
        assert err.value.body["param"] == "grader" and all(w in err.value.body["message"] for w in words)
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.alpha.graders.run(grader=valid, model_sample="x", item=[1, 2])
    assert err.value.body["param"] == "item"


# --------------------------------------------------------------------------- cancel, pause, resume, restarts


def long_rl_job(client: OpenAI, data_files, base_model: str, suffix: str):
    train, val = upload(client, data_files["rft_train"]), upload(client, data_files["rft_val"])
    return client.fine_tuning.jobs.create(
        model=base_model, training_file=train.id, validation_file=val.id, suffix=suffix,
        method={"type": "reinforcement", "reinforcement": {
            "grader": PYTHON_GRADER, "hyperparameters": {"n_epochs": 8, "batch_size": 8}}},
    )


def has_checkpoint(client: OpenAI, job_id: str, after_step: int = 0) -> bool:
    return any(c.step_number > after_step for c in client.fine_tuning.jobs.checkpoints.list(job_id).data)


def test_state_changes_a_status_does_not_allow_are_409(client, supervised):
    _, job = supervised
    for action in ("pause", "resume", "cancel"):
        with pytest.raises(openai.ConflictError) as err:
            getattr(client.fine_tuning.jobs, action)(job.id)
        assert err.value.status_code == 409 and "succeeded" in err.value.body["message"]
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"


@pytest.mark.slow
def test_kill_9_of_the_server_leaves_the_job_running_a_dead_worker_fails_it_resumable_and_cancel_keeps_its_output(
    client, server, data_files, supervised
):
    job = long_rl_job(client, data_files, supervised[1].fine_tuned_model, "cancel")
    wait_for(lambda: has_checkpoint(client, job.id), what="a first checkpoint")
    files_before = {f.id for f in client.files.list()}
    jobs_before = {j.id for j in client.fine_tuning.jobs.list(limit=100)}
    worker = worker_of(server.data_dir, job.id)

    server.kill9()  # the worker runs in its own session: it goes on
    assert alive(worker)
    server.start()
    assert {f.id for f in client.files.list()} == files_before
    assert {j.id for j in client.fine_tuning.jobs.list(limit=100)} == jobs_before
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    assert worker_pids(server.data_dir)[job.id] == worker  # the same worker, taken up again

    # The worker dies while the server runs (killed, out of memory): failed, saying it can be resumed.
    os.killpg(worker, signal.SIGKILL)
    failed = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "failed" and j, timeout=60,
                      what="the job to fail")
    assert failed.error.code == "worker_stopped" and "can be resumed" in failed.error.message
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", what="the job to run again")
    worker = worker_of(server.data_dir, job.id)

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    wait_for(lambda: not alive(worker), timeout=60, what="the worker to stop")
    time.sleep(2)  # a stopped worker must not overwrite the decision
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None and final.error is None
    assert list((server.data_dir / "jobs" / job.id / "out" / "stages").glob("rl-*/checkpoints/step-*"))
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)
    assert any("cancelled" in e.message for e in client.fine_tuning.jobs.list_events(job.id))


@pytest.mark.slow
def test_pause_resume_then_kill_9_of_server_and_worker_resume_from_the_last_checkpoint(
    client, server, data_files, supervised
):
    job = long_rl_job(client, data_files, supervised[1].fine_tuned_model, "pause")
    wait_for(lambda: has_checkpoint(client, job.id), what="a first checkpoint")
    worker = worker_of(server.data_dir, job.id)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    wait_for(lambda: not alive(worker), timeout=60, what="the paused worker to stop")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)
    kept = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)

    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", what="the job to run again")
    wait_for(lambda: has_checkpoint(client, job.id, kept), what="a checkpoint after the resume")
    log = (server.data_dir / "jobs" / job.id / "worker.log").read_text()
    assert "resuming RL from" in log and f"(iteration {kept})" in log

    # A crash of the whole machine, as it were: the server and the worker, both kill -9.
    worker = worker_of(server.data_dir, job.id)
    server.kill9()
    os.killpg(worker, signal.SIGKILL)
    wait_for(lambda: not alive(worker), timeout=30, what="the worker to die")
    kept = max(c for c in (int(p.name.removeprefix("step-")) for p in
                           (server.data_dir / "jobs" / job.id / "out" / "stages").glob("rl-*/checkpoints/step-*")))
    server.start()
    done = finished(client, job.id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any("server restarted" in m for m in messages) and any("paused" in m for m in messages)
    log = (server.data_dir / "jobs" / job.id / "worker.log").read_text()
    assert log.count("resuming RL from") == 2 and f"(iteration {kept})" in log
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 49))


def test_supervised_files_become_rfts_form_line_for_line(tmp_path):
    from rft.api.job_data import prepare_file

    rows = [
        json.dumps({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1 #### 1"}]}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"},
                                 {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"},
                                 {"role": "assistant", "content": "a3"}], "reference": "r", "topic": "t"}),
        json.dumps({"messages": [{"role": "user", "content": "rft row"}], "reference_answer": "4"}),
        "{not json",
        json.dumps({"messages": [{"role": "assistant", "content": "alone"}]}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes("\r\n".join(rows).encode() + b"\r\n")
    target = tmp_path / "out" / "train.jsonl"
    prepare_file(source, target, "supervised")
    lines = target.read_bytes().split(b"\r\n")
    assert len(lines) == len(rows) + 1 and lines[1] == b"" and lines[4] == b"{not json"
    first, third = json.loads(lines[0]), json.loads(lines[2])
    assert first == {"messages": [{"role": "user", "content": "q1"}], "solution": "a1 #### 1", "reference": "a1 #### 1"}
    assert [m["content"] for m in third["messages"]] == ["s", "q2", "a2", "q3"]
    assert (third["solution"], third["reference"], third["original_reference"], third["topic"]) == ("a3", "a3", "r", "t")
    assert lines[3] == rows[3].encode() and lines[5] == rows[5].encode()  # not chat rows ending with an answer
    prepare_file(source, tmp_path / "rl.jsonl", "reinforcement")
    assert (tmp_path / "rl.jsonl").read_bytes() == source.read_bytes()
    assert not list(tmp_path.glob("**/*.partial"))


# --------------------------------------------------------------------------- the hyperparameter table


def test_hyperparameters_map_onto_the_config_as_the_table_says():
    from rft_core.config import RFTConfig

    base = RFTConfig().model_dump(mode="json")
    overrides, written = hp_map.supervised_settings(base, {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.1}, 40)
    assert overrides == {"rl.enabled": False, "sft.enabled": True, "sft.batch_size": 4, "sft.grad_accum": 1,
                         "sft.lr": base["sft"]["lr"] * 0.1, "sft.epochs": 3.0, "sft.max_steps": None}
    assert written == {"batch_size": 4, "learning_rate_multiplier": 0.1, "n_epochs": 3}
    _, written = hp_map.supervised_settings({**base, "sft": {**base["sft"], "max_steps": 25}}, {}, 40)
    assert written["n_epochs"] == 10  # 25 steps x 16 sequences over 40 examples, started
    overrides, written = hp_map.reinforcement_settings(base, {
        "n_epochs": 1, "batch_size": 10, "compute_multiplier": 2.0, "eval_interval": 5, "eval_samples": 4,
        "reasoning_effort": "high", "learning_rate_multiplier": "auto"}, 95)
    assert overrides["rl.iterations"] == 10 and overrides["rl.prompts_per_iteration"] == 10
    assert overrides["rl.samples_per_prompt"] == 8 and overrides["eval.k"] == 4 and overrides["rl.eval_interval"] == 5
    assert overrides["rl.max_new_tokens"] == 2 * base["rl"]["max_new_tokens"] and "rl.lr" not in overrides
    assert overrides["sft.enabled"] is False and overrides["rl.critic_warmup"] == 3  # below the 10 iterations
    assert written["learning_rate_multiplier"] == 1.0 and written["reasoning_effort"] == "high"
    overrides, written = hp_map.reinforcement_settings(base, {}, 320)
    assert set(overrides) == {"sft.enabled", "rl.enabled"}
    assert written["n_epochs"] == 30 and written["batch_size"] == 32  # 300 iterations x 32 prompts over 320


# --------------------------------------------------------------------------- jobs as deployment runs


@pytest.mark.slow
def test_with_rfts_deployment_on_the_prefect_server_a_job_is_a_flow_run_of_it(
    tmp_path, prefect_api, data_files
):
    """`rft serve` serves the rft-pipeline deployment against the Prefect API; a server started
    beside it runs its jobs as flow runs of that deployment (named after the job), and records
    their result from the tracking store when they complete."""
    from prefect.client.orchestration import get_client

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"}
    serve_log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the serving process's
    serving = subprocess.Popen([sys.executable, "-m", "rft", "serve", "--deployment", "rft-pipeline"], cwd=REPO,
                               env=env, stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True)
    api = None
    try:
        def deployed() -> bool:
            assert serving.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            with get_client(sync_client=True) as prefect:
                return any(d.name == "rft-pipeline" for d in prefect.read_deployments())

        wait_for(deployed, timeout=180, what="rft serve to register its deployment")
        config = tmp_path / "base.yaml"
        config.write_text(yaml.safe_dump(BASE))
        (tmp_path / "data").mkdir()
        api = Server(tmp_path / "data", config, prefect_api)
        api.start()
        client = OpenAI(base_url=api.url, api_key=KEY, max_retries=0, timeout=120)
        train, val = upload(client, data_files["sft_train"]), upload(client, data_files["sft_val"])
        job = client.fine_tuning.jobs.create(model="rft-tiny", training_file=train.id, validation_file=val.id,
                                             method={"type": "supervised"})
        done = finished(client, job.id)
        assert done.status == "succeeded", done.error
        started = [e.message for e in client.fine_tuning.jobs.list_events(job.id) if "flow run" in e.message]
        assert started and "rft-pipeline/rft-pipeline" in started[0]
        with get_client(sync_client=True) as prefect:
            [run] = [r for r in prefect.read_flow_runs() if r.name == job.id]
        assert run.state.type.name == "COMPLETED" and run.deployment_id is not None
        assert started[0].split("flow run ")[1].split()[0] == str(run.id)
        assert not (tmp_path / "data" / "jobs" / job.id / "worker.log").exists()  # no local worker ran it
        metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
        assert sorted(d["step"] for d in metrics) == [0, 1, 2, 3, 4]
        reply = client.chat.completions.create(model=done.fine_tuned_model, temperature=0,
                                               messages=[{"role": "user", "content": "Ann has 2 cats."}])
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        if api is not None:
            api.stop()
        os.killpg(serving.pid, signal.SIGTERM)
        try:
            serving.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
        with get_client(sync_client=True) as prefect:  # the module's server runs jobs in its own workers again
            for deployment in prefect.read_deployments():
                prefect.delete_deployment(deployment.id)
