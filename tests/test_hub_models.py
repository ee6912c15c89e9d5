"""A user's own hub model through the whole pipeline, on fixtures of real architectures built here
(tests/hub_fixtures.py: Qwen2.5-Instruct, Qwen2.5 base and Llama-3.2-Instruct set-ups, scaled down).

- Where a response ends has one definition (`rft_core.models.end_of_response`): the chat template's
  turn end plus the generation config's EOS list; SFT targets end with it, rollouts, evaluation and
  the served model stop on it.
- `rft run --config configs/gsm8k.yaml` with the fixture by local path, LoRA and the chat template on:
  SFT teaches the model to end its turn with the template's turn-end token, PPO then GRPO rollouts
  stop there, and the registered champion served through `mlflow.pyfunc` answers the validation
  prompts exactly as the pipeline's evaluation did, for both architectures.
- RL straight from a model that already ends its turns with `<|im_end|>` while its tokenizer's EOS
  is `<|endoftext|>` (Qwen2.5 base's set-up), on the GSM8K sample through the GSM8K config.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
import pytest
import torch
from hub_fixtures import SPECS, build_hub_model, synthetic_items
from mlflow import MlflowClient

from rft_core import tracking
from rft_core.config import ModelConfig, RFTConfig
from rft_core.generation import generate
from rft_core.models import load_model, load_tokenizer, prompt_token_ids

ROOT = Path(__file__).resolve().parents[1]
GSM8K_CONFIG = ROOT / "configs" / "gsm8k.yaml"
GSM8K_SAMPLE = ROOT / "examples" / "data" / "sample_gsm8k.jsonl"


@pytest.fixture(scope="session")
def hub_model(tmp_path_factory: pytest.TempPathFactory):
    """`hub_model(name)`: the fixture's directory (briefly trained on chat-formatted problems, so it
    answers and ends its turn as an instruct model does), built once per test session."""
    root = tmp_path_factory.mktemp("hub")
    built: dict[tuple[str, str], Path] = {}
    items = synthetic_items(600)

    def get(name: str, pretrain_on: str = "chat") -> Path:
        if (name, pretrain_on) not in built:
            built[name, pretrain_on] = build_hub_model(root, name, pretrain_on=pretrain_on, items=items)
        return built[name, pretrain_on]

    return get


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def rft_run(out: Path, model_dir: Path, *overrides: str) -> dict[str, Any]:
    """`rft run --config configs/gsm8k.yaml --json --set model.name_or_path=<model_dir> --set ...`: the
    command's own function, in this process (against the Prefect test harness); its JSON summary.

    (Not through click's CliRunner: its swapped stdout/stderr are closed after each invocation, and the
    log handlers Prefect and `rft run` attach to them in the first invocation break every later flow
    run of the test session. A subprocess would start Python, torch and MLflow again for each run.)"""
    from rft.run import run_cmd

    sets = [f"model.name_or_path={model_dir}", f"output_dir={out}", *overrides]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_cmd(config=GSM8K_CONFIG, set_=sets, fresh=False, as_json=True)
    text = printed.getvalue()
    return json.loads(text[text.index("{\n"):])


def stage_runs(summary: dict[str, Any]) -> dict[str, Any]:
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'"
    )
    return {run.info.run_name: run for run in runs}


def history(summary: dict[str, Any], run: Any, key: str) -> list[float]:
    client = MlflowClient(summary["tracking_uri"])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def evaluated_samples(summary: dict[str, Any], model: str = "rl") -> pd.DataFrame:
    """The evaluation stage's greedy completions of `model` on the validation set (its samples table)."""
    evaluate_run = stage_runs(summary)["evaluate"]
    return MlflowClient(summary["tracking_uri"]).load_table(
        evaluate_run.info.experiment_id, f"samples_{model}.json", run_ids=[evaluate_run.info.run_id]
    )


def served_model(summary: dict[str, Any], model_uri: str) -> Any:
    """`mlflow.pyfunc.load_model(model_uri)` from the run's store, as a user serving the model would."""
    tracking.configure(summary["tracking_uri"])
    return mlflow.pyfunc.load_model(model_uri)


def greedy_until(model: Any, tokenizer: Any, prompts: list[list[int]], stop: str, max_new_tokens: int) -> list[list[int]]:
    """Greedy completions that stop on the token `stop` only (the expected answers, computed apart
    from the pipeline's own definition of the end of a response)."""
    return generate(model, prompts, eos_token_ids=[tokenizer.convert_tokens_to_ids(stop)],
                    pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens).completions


# --------------------------------------------------------------------------- the end of a response


@pytest.mark.parametrize(
    ("name", "token", "stops"),
    [
        ("qwen2.5-instruct", "<|im_end|>", ["<|endoftext|>", "<|im_end|>"]),
        ("qwen2.5-base", "<|im_end|>", ["<|endoftext|>", "<|im_end|>"]),
        ("llama-3.2-instruct", "<|eot_id|>", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    ],
)
def test_a_response_ends_with_the_chat_templates_turn_end_and_stops_on_the_generation_configs_eos(
    hub_model, name, token, stops
):
    from rft_core.models import end_of_response

    path = hub_model(name)
    tokenizer = load_tokenizer(path)
    end = end_of_response(tokenizer, ModelConfig(), path)
    assert tokenizer.convert_ids_to_tokens(end.token_id) == token
    assert tokenizer.convert_ids_to_tokens(list(end.stop_ids)) == stops
    # The same from the loaded model's generation config as from its directory.
    assert end_of_response(tokenizer, ModelConfig(), load_model(path)) == end
    # Without the chat template (plain prompt_template), the tokenizer's EOS is the end.
    plain = end_of_response(tokenizer, ModelConfig(use_chat_template=False), path)
    assert tokenizer.convert_ids_to_tokens(plain.token_id) == SPECS[name].eos


def test_sft_targets_end_with_the_turn_end_the_template_writes_not_the_tokenizers_eos(hub_model):
    """Qwen2.5 base: EOS `<|endoftext|>`, turns end with `<|im_end|>`. A target must be exactly the
    assistant turn the template renders, so SFT teaches the model to end its turn as the template does."""
    from rft_core.sft import sft_examples

    path = hub_model("qwen2.5-base")
    tokenizer = load_tokenizer(path)
    frame = pd.DataFrame({"id": ["a"], "prompt": ["Ann has 3 pens. How many pens does Ann have?"],
                          "reference": ["3"], "solution": ["Ann: 3.\n#### 3"]})
    cfg = RFTConfig.from_dict({"model": {"name_or_path": str(path)}})
    (example,) = sft_examples(frame, tokenizer, cfg)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": frame["prompt"][0]}, {"role": "assistant", "content": "Ann: 3.\n#### 3"}],
        tokenize=False,
    )
    assert rendered.endswith("Ann: 3.\n#### 3<|im_end|>\n")
    assert tokenizer.decode(example.prompt_ids + example.completion_ids) == rendered.removesuffix("\n")
    assert tokenizer.convert_ids_to_tokens(example.completion_ids[-1]) == "<|im_end|>"

    plain = RFTConfig.from_dict({"model": {"name_or_path": str(path), "use_chat_template": False}})
    (example,) = sft_examples(frame, tokenizer, plain)
    assert tokenizer.decode(example.prompt_ids + example.completion_ids) == (
        "Ann has 3 pens. How many pens does Ann have?\nAnn: 3.\n#### 3<|endoftext|>"
    )


def test_greedy_evaluation_of_a_chat_model_stops_at_its_turn_end(hub_model):
    """A model that ends its turns with `<|im_end|>` while its tokenizer and generation config say
    `<|endoftext|>`: evaluation stops at the turn end, and the grader sees only the answer."""
    from rft_core.evaluate import evaluate
    from rft_core.graders import configured_grader

    path = hub_model("qwen2.5-base")
    cfg = RFTConfig.from_dict({"model": {"name_or_path": str(path)}, "eval": {"max_new_tokens": 48}})
    items = synthetic_items(8, seed=7)
    frame = pd.DataFrame({"id": [str(i) for i in range(8)], "prompt": [i["question"] for i in items],
                          "reference": [i["answer"].rsplit("#### ", 1)[1] for i in items]})
    tokenizer, model = load_tokenizer(path, cfg.model), load_model(path, cfg.model)
    grader = configured_grader(cfg.grader)
    try:
        report = evaluate(model, tokenizer, frame, grader, cfg)
    finally:
        grader.close()
    answers = greedy_until(model.eval(), tokenizer, prompt_token_ids(frame, tokenizer, cfg.model, 512), "<|im_end|>", 48)
    assert [tokenizer.convert_ids_to_tokens(a[-1]) for a in answers] == ["<|im_end|>"] * 8
    # What was graded is each answer up to its turn end, nothing generated after it.
    assert [s["completion"] for s in report.samples] == [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    assert report.metrics["response_length"] == sum(len(a) for a in answers) / 8 < 48


def test_the_served_model_answers_openai_format_conversations_as_the_evaluation_does(hub_model, tmp_path):
    """Rows in the OpenAI format are rendered from their whole `messages` (a system message
    included); the served model takes the same conversation as a JSON array and answers identically,
    and a plain prompt as the item's prompt."""
    from rft_core.stages import evaluate_model_dir

    path = hub_model("llama-3.2-instruct")
    cfg = RFTConfig.from_dict({"model": {"name_or_path": str(path)}, "eval": {"max_new_tokens": 32, "batch_size": 3}})
    items = synthetic_items(6, seed=11)
    conversations = [
        ([{"role": "system", "content": "Answer in one line."}] if i % 2 else [])
        + [{"role": "user", "content": item["question"]}]
        for i, item in enumerate(items)
    ]
    frame = pd.DataFrame({"id": [str(i) for i in range(6)], "prompt": [i["question"] for i in items],
                          "messages": conversations, "reference": ["1"] * 6})
    report = evaluate_model_dir(cfg, path, frame)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.start_pipeline_run(RFTConfig(experiment="served"), tracking_uri=store)
    run_id = tracking.start_stage_run(parent, "rl", tracking_uri=store)
    uri = tracking.log_model(run_id, path, serving=tracking.serving_settings(cfg), tracking_uri=store)
    served = served_model({"tracking_uri": store}, uri)
    assert served.metadata.signature.params.to_dict()[0]["default"] == 32
    completions = served.predict([json.dumps(c) for c in conversations])
    assert completions == [sample["completion"] for sample in report.samples]
    # A one-message conversation is the item's prompt: a plain prompt string gets the same answer.
    plain = served.predict(list(frame["prompt"]))
    assert [c for i, c in enumerate(completions) if i % 2 == 0] == [c for i, c in enumerate(plain) if i % 2 == 0]


# --------------------------------------------------------------------------- rft run end to end


@pytest.mark.parametrize("name", ["qwen2.5-instruct", "llama-3.2-instruct"])
def test_rft_run_on_a_hub_model_sft_then_ppo_and_grpo_and_the_champion_serves_what_was_evaluated(
    prefect_api, hub_model, tmp_path, name
):
    base = hub_model(name)
    turn_end = SPECS[name].turn_end
    overrides = [
        # A 1-step task the fixture learns to answer and end within seconds; the rest is the GSM8K config.
        "data.train_path=null", "data.val_path=null", "data.synthetic.n_train=150", "data.synthetic.n_val=8",
        "data.synthetic.max_steps=1", "data.synthetic.max_operand=9", "data.synthetic.solution_fraction=1.0",
        "model.lora.r=16", "model.lora.alpha=32",
        "sft.max_steps=40", "sft.lr=1e-2", "sft.grad_accum=1", "sft.eval_interval=0",
        "rl.iterations=2", "rl.prompts_per_iteration=4", "rl.samples_per_prompt=2", "rl.minibatch_size=8",
        "rl.micro_batch_size=8", "rl.generation_batch_size=8", "rl.max_new_tokens=24", "rl.eval_interval=0",
        "eval.max_new_tokens=24", "eval.batch_size=8", "eval.k=0", f"registry.model_name=hub-{name}",
    ]
    ppo = rft_run(tmp_path, base, *overrides)
    grpo = rft_run(tmp_path, base, *overrides, "rl.algorithm=grpo")
    assert ppo["registered"]["version"] == 1 and grpo["registered"]["version"] == 2

    # After SFT the model's greedy responses end with the template's turn-end token.
    sft_dir = next(tmp_path.glob("stages/sft-*/model"))
    cfg = RFTConfig.load(GSM8K_CONFIG, [f"model.name_or_path={sft_dir}"])
    tokenizer, model = load_tokenizer(sft_dir, cfg.model), load_model(sft_dir, cfg.model).eval()
    val = evaluated_samples(ppo, "sft")
    prompts = prompt_token_ids(val, tokenizer, cfg.model, cfg.rl.max_prompt_length)
    greedy = greedy_until(model, tokenizer, prompts, turn_end, 24)
    assert len(greedy) == 8
    assert [tokenizer.convert_ids_to_tokens(c[-1]) for c in greedy] == [turn_end] * 8
    assert [tokenizer.decode(c, skip_special_tokens=True) for c in greedy] == list(val["completion"])

    for summary in (ppo, grpo):
        runs = stage_runs(summary)
        # Rollouts stop at the turn end (rl/stop_rate: the share of samples that ended on a stop token).
        assert all(rate >= 0.75 for rate in history(summary, runs["rl"], "rl/stop_rate"))  # seen: 0.875-1.0
        # The registered version, served, answers the validation prompts as the evaluation did.
        samples = evaluated_samples(summary)
        version = summary["registered"]["version"]
        served = served_model(summary, f"models:/hub-{name}/{version}")
        assert served.predict(list(samples["prompt"])) == list(samples["completion"])
        assert any(text.strip() for text in samples["completion"])

    champion = MlflowClient(grpo["tracking_uri"]).get_model_version_by_alias(f"hub-{name}", "champion")
    winner = grpo if champion.version == "2" else ppo
    served = served_model(grpo, f"models:/hub-{name}@champion")
    samples = evaluated_samples(winner)
    assert served.predict(list(samples["prompt"])) == list(samples["completion"])
    # ... and reloads with the same logits as the model directory it was logged from.
    reloaded, reloaded_tokenizer = tracking.load_logged_model(
        f"models:/hub-{name}@champion", tracking_uri=grpo["tracking_uri"]
    )
    local = load_model(winner["model_dir"], cfg.model).eval()
    ids = torch.tensor([prompts[0]])
    assert torch.equal(reloaded(ids).logits, local(ids).logits)
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template


def test_rl_straight_from_a_model_that_ends_its_turns_on_the_gsm8k_sample_stops_there(
    prefect_api, hub_model, tmp_path
):
    """Qwen2.5 base's set-up (EOS and generation config `<|endoftext|>`), a model that already ends its
    turns with `<|im_end|>`, no SFT: PPO's rollouts and the evaluation stop at `<|im_end|>` instead of
    running to max_new_tokens past the answer. Through the GSM8K config and its sample data."""
    path = hub_model("qwen2.5-base")
    summary = rft_run(
        tmp_path, path, f"data.train_path={GSM8K_SAMPLE}", "data.val_path=null", "data.val_size=4",
        "sft.enabled=false", "rl.iterations=2", "rl.prompts_per_iteration=4", "rl.samples_per_prompt=2",
        "rl.minibatch_size=8", "rl.micro_batch_size=8", "rl.generation_batch_size=8", "rl.max_new_tokens=64",
        "rl.eval_interval=0", "eval.max_new_tokens=64", "eval.batch_size=4", "eval.k=2",
        "registry.model_name=hub-qwen-base",
    )
    runs = stage_runs(summary)
    stop_rates = history(summary, runs["rl"], "rl/stop_rate")
    # Before the fix: stop_rate 0.0 and every response 64 tokens long, the grader reading past the answer.
    assert len(stop_rates) == 2 and all(rate >= 0.75 for rate in stop_rates)  # seen: 0.875, 1.0
    assert all(length < 48 for length in history(summary, runs["rl"], "rl/response_length"))  # seen: 38.3, 24.3
    assert summary["metrics"]["rl"]["response_length"] < 48  # seen: 30.5
    samples = evaluated_samples(summary)
    assert len(samples) == 4
    served = served_model(summary, "models:/hub-qwen-base@champion")
    assert served.predict(list(samples["prompt"])) == list(samples["completion"])
