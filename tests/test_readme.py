"""The README's commands and snippets work as written, from a clone of the repository.

- every repository path the README names is in the repository (the GSM8K files it says how to
  download excepted), and no path of the machine the docs were written on appears;
- the pyfunc snippet of "Serve the champion", run as written in a directory holding the store
  `rft run` prints (`rft_runs/mlflow.db`), loads `models:/rft-model@champion` from that store and
  answers the README's prompt, leaving no store of its own (`./mlflow.db`, `./mlruns`) behind.

The HTTP form (`mlflow models serve -m models:/NAME@champion`) is served and asked in a fresh
environment by tests/test_served_model.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rft_core import tracking
from rft_core.config import RFTConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# Top-level folders of the repository whose files the README names.
_REPO_PATH = re.compile(r"(?<![\w/.$-])((?:examples|configs|deployments|bench|constraints|rft_core|rft|flows|tasks|tests)"
                        r"/[A-Za-z0-9_./-]*[A-Za-z0-9_/])")
# What the README tells the user to get or write rather than ship: GSM8K's own files (downloaded),
# the image and the deployments file of "Outgrowing one machine" (written from the README's text).
_NOT_SHIPPED = ("data/gsm8k/", "deployments/Dockerfile", "deployments/prefect.docker.yaml")


def section(title: str) -> str:
    """The README's text under the heading `title`, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_every_repository_path_the_readme_names_is_in_the_repository() -> None:
    named = sorted({m.group(1).rstrip(".") for m in _REPO_PATH.finditer(README)})
    assert len(named) > 30  # the pattern finds what the README names
    missing = [p for p in named if not (ROOT / p).exists() and not p.startswith(_NOT_SHIPPED)]
    assert missing == []


def test_the_readme_names_no_path_of_a_particular_machine() -> None:
    found = re.findall(r"(?:/home/|/Users/|/root/|/work/|/mnt/|C:\\)[^\s`'\"]*", README)
    assert found == []


def test_the_data_files_of_the_first_commands_ship_with_the_repository() -> None:
    block = code_blocks(section("Your own task"), "bash")[0]
    files = re.findall(r"\s(\S+\.(?:jsonl|json|csv|parquet|yaml))\b", block)
    assert "examples/data/sample_gsm8k.jsonl" in files and "examples/graders/numeric_match.yaml" in files
    assert [f for f in files if not (ROOT / f).is_file()] == []


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory as `rft run` leaves it: `rft_runs/mlflow.db` with `rft-model@champion`, a tiny
    model logged by the pipeline's `log_model` with the demo's serving settings."""
    from hub_fixtures import build_hub_model

    work = tmp_path_factory.mktemp("readme")
    base = build_hub_model(tmp_path_factory.mktemp("model"), "llama-3.2-instruct", pretrain_on="none")
    store = f"sqlite:///{work}/rft_runs/mlflow.db"
    (work / "rft_runs").mkdir()
    cfg = RFTConfig.load(ROOT / "configs" / "demo.yaml", ["model.dtype=float32", "model.device=cpu"])
    parent = tracking.start_pipeline_run(cfg, tracking_uri=store)
    run_id = tracking.start_stage_run(parent, "rl", tracking_uri=store)
    uri = tracking.log_model(run_id, base, serving=tracking.serving_settings(cfg), tracking_uri=store)
    version = tracking.register_model(uri, cfg.registry.model_name, tracking_uri=store)
    tracking.set_alias(cfg.registry.model_name, "champion", version, tracking_uri=store)
    assert cfg.registry.model_name == "rft-model"  # the name the snippet loads
    return work


@pytest.mark.parametrize("env_store", [None, "sqlite:///elsewhere.db"], ids=["no-env", "other-store-in-env"])
def test_the_pyfunc_snippet_runs_as_written_against_the_store_rft_run_printed(
    champion_store: Path, env_store: str | None
) -> None:
    """Run in the directory `rft run` ran in, the snippet reads that run's store whatever
    MLFLOW_TRACKING_URI says, and leaves no store of its own behind."""
    snippet = code_blocks(section("Serve the champion"), "python")[0]
    assert "set_tracking_uri" in snippet and "rft_runs/mlflow.db" in snippet
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"})
    if env_store:
        env["MLFLOW_TRACKING_URI"] = env_store
    before = sorted(p.name for p in champion_store.iterdir())
    done = subprocess.run([sys.executable, "-c", snippet], cwd=champion_store, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = ast.literal_eval(done.stdout.strip().splitlines()[-1])  # print() of a list of str
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)
    assert sorted(p.name for p in champion_store.iterdir()) == before  # no ./mlflow.db, no ./mlruns


def test_the_http_request_and_response_shown_are_what_the_scoring_server_speaks() -> None:
    """The curl body is the JSON `mlflow models serve` reads (inputs, params), the response shown
    is the JSON it answers (predictions, one per input), and the server serves the alias by its
    store: tests/test_served_model.py sends such a body to such a server."""
    text = section("Serve the champion")
    serve = code_blocks(text, "bash")[0]
    assert "mlflow models serve -m models:/rft-model@champion" in serve
    assert "MLFLOW_TRACKING_URI=sqlite:///$PWD/rft_runs/mlflow.db" in serve
    body = json.loads(re.search(r"-d '(.*?)'", serve, re.S).group(1))
    assert set(body) == {"inputs", "params"} and all(isinstance(p, str) and p for p in body["inputs"])
    response = json.loads(code_blocks(text, "json")[0])
    assert list(response) == ["predictions"] and len(response["predictions"]) == len(body["inputs"])
