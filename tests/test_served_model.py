"""A registered model serves anywhere: in a fresh virtual environment made only from the model's own
requirements (no rft installed), `mlflow.pyfunc.load_model` and `mlflow models serve -m
models:/NAME@champion` answer exactly as the model answers where it was trained: a full model with
its chat template, and a LoRA adapter on its base.

Slow (it builds the environment: torch from the local wheel, the rest from the package index), and
run by the README's test command like every other test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import pytest
import torch
from hub_fixtures import build_hub_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from rft_core import tracking
from rft_core.config import RFTConfig

PROMPTS = ["Ann has 3 apples and buys 4 more. How many apples does she have?",
           json.dumps([{"role": "system", "content": "Answer briefly."},
                       {"role": "user", "content": "What is 2 + 5?"}])]
PARAMS = {"max_new_tokens": 12}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A chat-template model and a LoRA adapter on it, logged by the pipeline's `log_model` with
    its serving settings, the full one registered as champion; their answers here."""
    root = tmp_path_factory.mktemp("served")
    base = build_hub_model(root, "qwen2.5-instruct", pretrain_on="none")
    adapter_dir = root / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)  # B starts at zero: a no-op adapter would prove nothing
    model.save_pretrained(adapter_dir)
    store = f"sqlite:///{root}/mlflow.db"
    serving = tracking.serving_settings(RFTConfig.load(overrides=["model.use_chat_template=true",
                                                                  "model.dtype=float32", "model.device=cpu"]))
    parent = tracking.start_pipeline_run(RFTConfig(experiment="served"), tracking_uri=store)
    run_id = tracking.start_stage_run(parent, "rl", tracking_uri=store)
    full_uri = tracking.log_model(run_id, base, name="full", serving=serving, tracking_uri=store)
    adapter_uri = tracking.log_model(run_id, adapter_dir, base_model=str(base), name="adapter", serving=serving,
                                     tracking_uri=store)
    version = tracking.register_model(full_uri, "served", tracking_uri=store)
    tracking.set_alias("served", "champion", version, tracking_uri=store)
    models = {}
    for name, uri in (("full", full_uri), ("adapter", adapter_uri)):
        local = tracking.download_model(uri, root / "downloaded" / name, tracking_uri=store)
        answers = mlflow.pyfunc.load_model(str(local)).predict(PROMPTS, params=PARAMS)
        models[name] = (local, answers)
    assert models["full"][1] != models["adapter"][1]  # the adapter changes the answers
    return {"root": root, "store": store, "models": models}


def test_a_logged_model_carries_its_code_and_names_its_requirements(logged) -> None:
    local, _ = logged["models"]["full"]
    assert (local / "code" / "rft_core" / "tracking" / "models.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    requirements = (local / "requirements.txt").read_text().split()
    assert [r.split("=")[0].split(">")[0] for r in requirements] == [
        "mlflow", "torch", "transformers", "tokenizers", "pydantic", "pyyaml"]
    adapter, _ = logged["models"]["adapter"]
    assert (adapter / "requirements.txt").read_text().split()[-1].startswith("peft==")


def venv_python(root: Path) -> Path:
    return root / "bin" / "python"


def pip(env_dir: Path, *args: str) -> None:
    done = subprocess.run([str(venv_python(env_dir)), "-m", "pip", "install", "-q", *args],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def isolated_env() -> dict[str, str]:
    """No rft on the path, nothing of this process's environment that points at it."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true"}


LOAD = """
import importlib.util, json, sys
import mlflow.pyfunc
assert importlib.util.find_spec("rft_core") is None, "rft_core is installed in the fresh environment"
model = mlflow.pyfunc.load_model(sys.argv[1])
import rft_core
assert rft_core.__file__.startswith(sys.argv[1]), rft_core.__file__  # the model's own code
print(json.dumps(model.predict(json.loads(sys.argv[2]), params=json.loads(sys.argv[3]))))
"""


def predict_in(env_dir: Path, local: Path, cwd: Path) -> list[str]:
    done = subprocess.run([str(venv_python(env_dir)), "-c", LOAD, str(local), json.dumps(PROMPTS), json.dumps(PARAMS)],
                          capture_output=True, text=True, timeout=600, env=isolated_env(), cwd=cwd)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def serving(env_dir: Path, model_uri: str, env: dict[str, str], log: Path):
    """`mlflow models serve -m MODEL_URI` of the fresh environment, on a free port; yields its URL."""
    port = free_port()
    with log.open("w") as output:
        proc = subprocess.Popen(
            [str(env_dir / "bin" / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=log.parent,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def invocations(url: str, body: dict) -> dict:
    """What the README shows: POST /invocations with {"inputs": [...], "params": {...}}."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_the_registered_model_loads_and_serves_in_a_fresh_environment_of_its_requirements(logged) -> None:
    root: Path = logged["root"]
    env_dir = root / "fresh-env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    pip(env_dir, "torch==2.13.0")  # first, as the README installs it (a local wheel here)
    full, full_answers = logged["models"]["full"]
    pip(env_dir, "-r", str(full / "requirements.txt"))
    work = root / "elsewhere"  # not the repository: nothing of rft on the path
    work.mkdir()
    assert predict_in(env_dir, full, work) == full_answers

    # Over HTTP, from the registry by alias, as the README shows it.
    env = {**isolated_env(), "MLFLOW_TRACKING_URI": logged["store"]}
    with serving(env_dir, "models:/served@champion", env, work / "serve.log") as url:
        answer = invocations(url, {"inputs": PROMPTS, "params": PARAMS})
    assert answer == {"predictions": full_answers}

    # A LoRA adapter needs peft as well: its own requirements add it.
    adapter, adapter_answers = logged["models"]["adapter"]
    pip(env_dir, "-r", str(adapter / "requirements.txt"))
    assert predict_in(env_dir, adapter, work) == adapter_answers
