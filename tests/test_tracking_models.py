"""Logged models reload identical (full model and LoRA adapter, by run URI and by alias), locally and
through a real `mlflow server`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow.pyfunc
import pytest
import torch
from mlflow import MlflowClient
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rft_core import tracking
from rft_core.config import RegistryConfig, RFTConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TEXTS = ["a=9+13;b=a+2;c=b-a;c?", "a=22;b=24;c=2;#2", "what is 3 + 4 ? it is 7", "hello world"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ~50k-parameter Llama saved with its tokenizer, and a LoRA adapter on it with nonzero B."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    model.save_pretrained(root / "full")
    tokenizer.save_pretrained(root / "full")
    # The base of the adapter is a separate directory, so the test can remove it after logging.
    shutil.copytree(root / "full", root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)  # B starts at zero: without this the adapter would be a no-op
    peft_model.save_pretrained(root / "adapter")
    return {"full": root / "full", "base": root / "base", "adapter": root / "adapter"}


def logits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_logits(tiny: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny["full"])
    full = LlamaForCausalLM.from_pretrained(tiny["full"]).eval()
    adapted = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tiny["full"]), tiny["adapter"]
    ).eval()
    return logits(full, tokenizer), logits(adapted, tokenizer)


def test_full_model_and_lora_adapter_reload_identical(
    tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(workdir)
    store = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    full_ref, lora_ref = reference_logits(tiny)
    assert not torch.equal(full_ref, lora_ref)  # the adapter changes the model

    parent = tracking.start_pipeline_run(RFTConfig(experiment="models"), tracking_uri=store)
    run_id = tracking.start_stage_run(parent, "rl")
    with pytest.raises(ValueError, match="give base_model"):
        tracking.log_model(run_id, tiny["adapter"], name="adapter")
    full_uri = tracking.log_model(run_id, tiny["full"], name="full")
    lora_uri = tracking.log_model(run_id, tiny["adapter"], base_model=str(tiny["base"]), name="adapter")
    # The base model travelled with the adapter: its original directory is no longer needed.
    tiny["base"].rename(tiny["base"].with_name("base-moved"))
    try:
        v_full = tracking.register_model(full_uri, "tiny-full", run_id=run_id, metrics={"eval/accuracy": 0.1})
        v_lora = tracking.register_model(lora_uri, "tiny-lora", run_id=run_id, metrics={"eval/accuracy": 0.1})
        tracking.set_alias("tiny-full", "champion", v_full)
        tracking.set_alias("tiny-lora", "champion", v_lora)

        for uri in (
            full_uri,
            f"runs:/{run_id}/full",
            "models:/tiny-full@champion",
            f"models:/tiny-full/{v_full}",
        ):
            model, tokenizer = tracking.load_logged_model(uri)
            assert torch.equal(logits(model, tokenizer), full_ref), uri
        for uri in (lora_uri, f"runs:/{run_id}/adapter", "models:/tiny-lora@champion"):
            model, tokenizer = tracking.load_logged_model(uri)
            assert isinstance(model, PeftModel)
            assert torch.equal(logits(model, tokenizer), lora_ref), uri
    finally:
        tiny["base"].with_name("base-moved").rename(tiny["base"])

    # The pyfunc face generates what the original model generates.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny["full"])
    original = LlamaForCausalLM.from_pretrained(tiny["full"]).eval()
    ids = tokenizer(TEXTS[1], return_tensors="pt")
    expected = tokenizer.decode(
        original.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1] :],
        skip_special_tokens=True,
    )
    served = mlflow.pyfunc.load_model("models:/tiny-full@champion")
    assert served.predict([TEXTS[1]], params={"max_new_tokens": 5}) == [expected]

    local = tracking.download_model("models:/tiny-full@champion", tmp_path_factory.mktemp("dl"))
    assert (local / "MLmodel").is_file()
    with pytest.raises(tracking.RegistryError, match="cannot fetch model"):
        tracking.download_model("models:/tiny-full@nope")
    # Logged models went to the store's artifact root, not to ./mlruns of the working directory.
    assert not (workdir / "mlruns").exists()


# --------------------------------------------------------------------------- bad requests to the served model


@pytest.fixture(scope="module")
def logged_tiny(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(store, model URI) of the tiny model logged to a fresh store."""
    store = f"sqlite:///{tmp_path_factory.mktemp('served-store')}/mlflow.db"
    parent = tracking.start_pipeline_run(RFTConfig(experiment="bad-requests"), tracking_uri=store)
    run_id = tracking.start_stage_run(parent, "rl", tracking_uri=store)
    return store, tracking.log_model(run_id, tiny["full"], name="full", tracking_uri=store)


@pytest.fixture(scope="module")
def served_model(logged_tiny: tuple[str, str]) -> mlflow.pyfunc.PyFuncModel:
    """The tiny model loaded back as MLflow serves it (pyfunc)."""
    return mlflow.pyfunc.load_model(logged_tiny[1])


BAD_INPUTS = {
    "null": ([None], "input 0: the prompt is null"),
    "null among prompts": (["hello", None], "input 1 of 2: the prompt is null"),
    "empty": ([""], "input 0: the prompt is empty"),
    "whitespace": (["  \n\t"], "input 0: the prompt is empty"),
    "zero-width": (["\u200b\u2060\ufeff"], "input 0: the prompt is empty"),
    "empty chat turn": ([json.dumps([{"role": "user", "content": "\u200b "}])], "the last user message is empty"),
}
BAD_MAX_NEW_TOKENS = {
    "negative": (-5, "params.max_new_tokens must be at least 1, got -5"),
    "zero": (0, "params.max_new_tokens must be at least 1, got 0"),
    "past the context": (10_000, "params.max_new_tokens must be at most 64 (the model's context length)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_pyfunc_predict_refuses_a_null_or_empty_prompt(served_model: mlflow.pyfunc.PyFuncModel, case: str) -> None:
    from mlflow.exceptions import MlflowException

    inputs, message = BAD_INPUTS[case]
    with pytest.raises(MlflowException, match=re.escape(message)) as caught:
        served_model.predict(inputs, params={"max_new_tokens": 2})
    assert caught.value.get_http_status_code() == 400


@pytest.mark.parametrize("case", list(BAD_MAX_NEW_TOKENS))
def test_pyfunc_predict_refuses_a_max_new_tokens_out_of_range(
    served_model: mlflow.pyfunc.PyFuncModel, case: str
) -> None:
    from mlflow.exceptions import MlflowException

    value, message = BAD_MAX_NEW_TOKENS[case]
    with pytest.raises(MlflowException, match=re.escape(message)) as caught:
        served_model.predict(["hello"], params={"max_new_tokens": value})
    assert caught.value.get_http_status_code() == 400


def test_the_scoring_server_answers_bad_requests_with_400_and_the_reason(
    served_model: mlflow.pyfunc.PyFuncModel,
) -> None:
    """MLflow's own scoring server app (what `mlflow models serve` runs), in process."""
    from mlflow.pyfunc.scoring_server import init
    from starlette.testclient import TestClient

    client = TestClient(init(served_model))
    good = client.post("/invocations", json={"inputs": ["hello"], "params": {"max_new_tokens": 2}})
    assert good.status_code == 200, good.text
    assert isinstance(good.json()["predictions"][0], str)
    requests = [({"inputs": inputs, "params": {"max_new_tokens": 2}}, message) for inputs, message in BAD_INPUTS.values()]
    requests += [({"inputs": ["hello"], "params": {"max_new_tokens": value}}, message)
                 for value, message in BAD_MAX_NEW_TOKENS.values()]
    requests.append(({"dataframe_split": {"columns": ["prompt"], "data": [[None]]}}, "the prompt is null"))
    for body, message in requests:
        answer = client.post("/invocations", json=body)
        assert answer.status_code == 400, (body, answer.status_code, answer.text)
        assert message in answer.json()["message"], (body, answer.text)


# --------------------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free local port with a temp sqlite store and artifact root.

    Started in its own session so that its whole process group (uvicorn/gunicorn and huey
    workers, which survive a SIGTERM of the main process) can be stopped at the end.
    """
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("w")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root}/server.db",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=root,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start:\n{(root / 'server.log').read_text()}"
                    ) from None
                time.sleep(0.5)
        yield uri
    finally:
        # SIGTERM first so the server can close its store; then make sure no worker survives.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


@pytest.mark.integration
def test_pipeline_against_a_real_tracking_server(
    mlflow_server: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    uri = mlflow_server
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = tracking.start_pipeline_run(RFTConfig(experiment="served"), tracking_uri=uri)
    stage = tracking.start_stage_run(parent, "sft", {"lr": 0.001}, tracking_uri=uri)
    log = tracking.metrics_logger(stage, "sft", tracking_uri=uri)
    log({"loss": 2.0}, 0)
    log({"loss": 1.5}, 1)
    assert [m.value for m in client.get_metric_history(stage, "sft/loss")] == [2.0, 1.5]
    report = tmp_path / "report.json"
    report.write_text("{}")
    tracking.log_artifact(stage, report, tracking_uri=uri)
    tracking.log_table(stage, [{"prompt": "p", "reward": 1.0}], "samples.json", tracking_uri=uri)
    tracking.log_dataset(stage, report, "validation", "abc123", "validation", tracking_uri=uri)
    assert {f.path for f in client.list_artifacts(stage)} >= {"report.json", "samples.json"}
    assert client.get_run(stage).inputs.dataset_inputs[0].dataset.digest == "abc123"
    tracking.end_run(stage, tracking_uri=uri)
    tracking.end_run(parent, tracking_uri=uri)

    full_ref, _ = reference_logits(tiny)
    model_uri = tracking.log_model(stage, tiny["full"], tracking_uri=uri)
    v1 = tracking.register_model(
        model_uri, "served", run_id=stage, metrics={"eval/accuracy": 0.2}, data_digest="d"
    )
    v2 = tracking.register_model(
        model_uri, "served", run_id=stage, metrics={"eval/accuracy": 0.3}, data_digest="d"
    )
    rules = RegistryConfig(model_name="served", metric="eval/accuracy")
    assert tracking.promote(rules, v1, tracking_uri=uri).promoted
    assert tracking.promote(rules, v2, tracking_uri=uri).promoted
    assert tracking.rollback("served", tracking_uri=uri) == v1
    rows = tracking.list_versions("served", tracking_uri=uri)
    assert [r["aliases"] for r in rows] == [["champion"], ["challenger"]]
    model, tokenizer = tracking.load_logged_model("models:/served@champion", tracking_uri=uri)
    assert torch.equal(logits(model, tokenizer), full_ref)


@pytest.mark.integration
def test_mlflow_models_serve_answers_bad_requests_with_400(logged_tiny: tuple[str, str], tmp_path: Path) -> None:
    """The same through `mlflow models serve` over HTTP."""
    store, model_uri = logged_tiny
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with (tmp_path / "serve.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)

        def post(body: dict) -> tuple[int, dict]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        status, answer = post({"inputs": ["hello"], "params": {"max_new_tokens": 2}})
        assert status == 200 and isinstance(answer["predictions"][0], str)
        for body, message in [({"inputs": [None]}, "input 0: the prompt is null"),
                              ({"inputs": ["\u200b"]}, "input 0: the prompt is empty"),
                              ({"inputs": ["hi"], "params": {"max_new_tokens": -5}}, "must be at least 1, got -5")]:
            status, answer = post(body)
            assert status == 400 and message in answer["message"], (body, status, answer)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
