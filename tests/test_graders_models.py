"""Model graders end to end: a tiny local judge model, a real chat-completions server on
127.0.0.1 called through the openai SDK (fixed replies, rate limits, a slow server, and one
backed by the tiny model), and cosine similarity."""

from __future__ import annotations

import sys
import time

import pytest
from graders_fixtures import ChatServer, build_tiny_lm

from rft_core.graders import GraderSpecError, build_grader, grade_batch
from rft_core.graders.model_graders import (
    LocalChatModel,
    OpenAIChatModel,
    parse_label,
    parse_score,
    render_messages,
)

MESSAGES = [
    {"role": "system", "content": "Reply with one number only."},
    {"role": "user", "content": [{"type": "input_text",
                                  "text": "Reference: {{ item.reference }}\nAnswer: {{ sample.output_text }}"}]},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "seven": str(build_tiny_lm(root / "seven", reply_token="7")),
        "correct": str(build_tiny_lm(root / "correct", reply_token="correct")),
        "plain": str(build_tiny_lm(root / "plain", reply_token="7", chat_template=None)),
        "embed": str(build_tiny_lm(root / "embed")),
    }


def score_spec(**fields) -> dict:
    return {"type": "score_model", "name": "judge", "input": MESSAGES, **fields}


def label_spec(**fields) -> dict:
    return {"type": "label_model", "name": "judge", "input": MESSAGES, "labels": ["correct", "incorrect"],
            "passing_labels": ["correct"], **fields}


# ----------------------------------------------------------------------------- local model


def test_local_score_model_maps_the_reply_through_range(models):
    with build_grader(score_spec(model=models["seven"], range=[0, 10],
                                 sampling_params={"max_completions_tokens": 1})) as grader:
        result = grader.grade("It is 18.", {"reference": "18"})
    assert result.to_dict() == {"reward": pytest.approx(0.7), "sub_rewards": {}, "errors": []}


def test_local_score_model_reply_outside_range_is_an_error(models):
    with build_grader(score_spec(model=models["seven"], range=[1, 5],
                                 sampling_params={"max_completions_tokens": 3})) as grader:
        result = grader.grade("x", {"reference": "1"})
    assert result.reward is None
    assert result.errors == ["judge: the judge's score 7 is outside range [1, 5]"]


def test_local_score_model_unparseable_reply_is_an_error(models):
    with build_grader(score_spec(model=models["correct"], sampling_params={"max_completions_tokens": 2})) as grader:
        result = grader.grade("x", {"reference": "1"})
    assert result.reward is None
    assert result.errors == ["judge: could not parse a score from the judge's reply 'correct correct'"]


def test_local_label_model_scores_passing_labels(models):
    with build_grader(label_spec(model=models["correct"], sampling_params={"max_completions_tokens": 1})) as grader:
        assert grader.grade("18", {"reference": "18"}).reward == 1.0
    failing = label_spec(model=models["correct"], passing_labels=["incorrect"], sampling_params={"max_completions_tokens": 1})
    with build_grader(failing) as grader:
        assert grader.grade("18", {"reference": "18"}).reward == 0.0


def test_local_judge_prompt_uses_the_chat_template_and_rendered_templates(models):
    with build_grader(score_spec(model=models["seven"])) as grader:
        assert isinstance(grader.chat_model, LocalChatModel)
        messages = render_messages(MESSAGES, {"sample": {"output_text": "It is 18."}, "item": {"reference": "18"}})
        prompt = grader.chat_model.prompt_text(messages)
    assert prompt == ("<|system|> Reply with one number only. <|end|> "
                      "<|user|> Reference: 18\nAnswer: It is 18. <|end|> <|assistant|>")


def test_local_judge_without_chat_template_uses_role_blocks(models):
    with build_grader(score_spec(model=models["plain"], range=[0, 10],
                                 sampling_params={"max_completions_tokens": 1})) as grader:
        prompt = grader.chat_model.prompt_text([{"role": "user", "content": "hi"}])
        assert prompt == "user: hi\n\nassistant:"
        assert grader.grade("x", {"reference": "1"}).reward == pytest.approx(0.7)


def test_local_judge_sampling_is_seeded_and_leaves_global_rng_alone(models):
    import torch

    spec = score_spec(model=models["seven"], range=[0, 10],
                      sampling_params={"temperature": 0.7, "top_p": 0.9, "seed": 1, "max_completions_tokens": 1})
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    with build_grader(spec) as grader:
        assert grader.grade("x", {"reference": "1"}).reward == pytest.approx(0.7)  # 5-logit margin: still "7"
    assert torch.equal(torch.rand(1), expected)


def test_missing_template_field_in_judge_messages_is_an_error(models):
    with build_grader(score_spec(model=models["seven"])) as grader:
        result = grader.grade("x", {"answer": "1"})
    assert result.reward is None and "template field 'item.reference' not found" in result.errors[0]


# ----------------------------------------------------------------------------- HTTP endpoint


def test_http_score_model_end_to_end(monkeypatch):
    monkeypatch.setenv("RFT_TEST_JUDGE_KEY", "sk-test")
    replies = iter(["8", '{"result": 2.5, "steps": []}', "I cannot grade this.", "12"])
    with ChatServer(lambda body: next(replies)) as server:
        spec = score_spec(model="judge-model", base_url=server.base_url, api_key_env="RFT_TEST_JUDGE_KEY",
                          range=[0, 10], sampling_params={"temperature": 0, "seed": 7, "max_completions_tokens": 5})
        with build_grader(spec) as grader:
            results = [grader.grade("It is 18.", {"reference": "18"}) for _ in range(4)]
    assert [r.reward for r in results[:2]] == [pytest.approx(0.8), pytest.approx(0.25)]
    assert results[2].errors == ["judge: could not parse a score from the judge's reply 'I cannot grade this.'"]
    assert results[3].errors == ["judge: the judge's score 12 is outside range [0, 10]"]
    request = server.requests[0]
    assert request == {
        "model": "judge-model",
        "messages": [{"role": "system", "content": "Reply with one number only."},
                     {"role": "user", "content": "Reference: 18\nAnswer: It is 18."}],
        "temperature": 0, "seed": 7, "max_completion_tokens": 5,
    }
    assert server.headers[0]["authorization"] == "Bearer sk-test"


def test_http_label_model_end_to_end():
    replies = iter(["Correct.", '{"label": "incorrect"}', "maybe", "correct or incorrect"])
    with ChatServer(lambda body: next(replies)) as server, build_grader(label_spec(model="m", base_url=server.base_url)) as grader:
        results = [grader.grade("18", {"reference": "18"}) for _ in range(4)]
    assert [r.reward for r in results] == [1.0, 0.0, None, None]
    assert "matches none of the labels ['correct', 'incorrect']: 'maybe'" in results[2].errors[0]
    assert "names several labels" in results[3].errors[0]
    # No api_key_env: the SDK needs some key; vLLM's placeholder, never the user's $OPENAI_API_KEY.
    assert server.headers[0]["authorization"] == "Bearer EMPTY"


def test_http_server_backed_by_the_tiny_model(models):
    judge = LocalChatModel(models["seven"], {"max_completions_tokens": 1})
    with ChatServer(lambda body: judge.complete(body["messages"])) as server:
        spec = score_spec(model="tiny", base_url=server.base_url, range=[0, 10])
        with build_grader(spec) as grader:
            assert grader.grade("It is 18.", {"reference": "18"}).reward == pytest.approx(0.7)


def test_http_retries_server_errors_then_reports_them():
    replies = iter([(503, '{"error": "busy"}'), "0.5", (400, '{"error": "bad model"}')])
    with ChatServer(lambda body: next(replies)) as server, build_grader(score_spec(model="m", base_url=server.base_url)) as grader:
        assert isinstance(grader.chat_model, OpenAIChatModel)
        assert grader.grade("x", {"reference": "1"}).reward == 0.5
        failed = grader.grade("x", {"reference": "1"})
    assert len(server.requests) == 3  # the 503 is retried, the 400 is not
    assert [h["x-stainless-retry-count"] for h in server.headers] == ["0", "1", "0"]
    assert failed.reward is None and failed.errors[0].startswith("judge: HTTP 400 from http://127.0.0.1:")
    assert failed.errors[0].endswith('/v1/chat/completions: {"error": "bad model"}')


def test_http_rate_limit_waits_what_retry_after_asks_then_succeeds():
    replies = iter([(429, '{"error": {"message": "slow down"}}', {"Retry-After": "1"}), "0.75"])
    with ChatServer(lambda body: next(replies)) as server, build_grader(score_spec(model="m", base_url=server.base_url)) as grader:
        result = grader.grade("x", {"reference": "1"})
    assert result.to_dict() == {"reward": 0.75, "sub_rewards": {}, "errors": []}
    assert len(server.requests) == 2
    waited = server.arrivals[1] - server.arrivals[0]
    assert 0.95 <= waited < 3.0  # Retry-After: 1, not the SDK's own 0.5 s first backoff


def test_http_rate_limit_past_max_retries_is_an_error_result():
    quota = (429, '{"error": "quota"}', {"Retry-After-Ms": "10"})
    with ChatServer(lambda body: quota) as server, build_grader(score_spec(model="m", base_url=server.base_url)) as grader:
        result = grader.grade("x", {"reference": "1"})  # max_retries defaults to 2
    assert len(server.requests) == 3
    assert result.reward is None and result.errors[0].startswith("judge: HTTP 429 from http://127.0.0.1:")


def test_http_timeout_is_an_error_result():
    def slow(body):
        time.sleep(3.0)
        return "1"

    with ChatServer(slow) as server:
        spec = score_spec(model="m", base_url=server.base_url, request_timeout_s=0.2, max_retries=1)
        with build_grader(spec) as grader:
            started = time.monotonic()
            result = grader.grade("x", {"reference": "1"})
            elapsed = time.monotonic() - started
    assert result.reward is None
    assert result.errors == [f"judge: request to {server.base_url}/chat/completions timed out after 0.2 s"]
    assert len(server.requests) == 2  # the timeout was retried once
    assert elapsed < 2.5  # neither attempt waited for the 3 s reply


def test_http_unreachable_endpoint_is_an_error_result():
    with ChatServer(lambda body: "1") as server:
        url = server.base_url
    with build_grader(score_spec(model="m", base_url=url, max_retries=1, request_timeout_s=2)) as grader:
        result = grader.grade("x", {"reference": "1"})
    assert result.reward is None and "request to" in result.errors[0] and "failed: ConnectError" in result.errors[0]


def test_http_judge_without_the_openai_package_is_a_build_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` now raises ImportError
    with pytest.raises(GraderSpecError) as info:
        build_grader(score_spec(model="m", base_url="http://127.0.0.1:9/v1"))
    assert str(info.value) == (
        "score_model 'judge': the judge at http://127.0.0.1:9/v1 is called through the openai package, "
        "which is not installed; install it with: pip install -e '.[openai]' (in an rft checkout) "
        "or pip install openai"
    )


def test_http_judges_are_graded_concurrently_in_order():
    def respond(body):
        text = body["messages"][-1]["content"]
        return text.rsplit(" ", 1)[-1]  # echo the sample's number as the score

    spec = {"type": "score_model", "name": "echo", "input": "score {{ sample.output_text }}", "range": [0, 10]}
    with ChatServer(respond) as server, build_grader({**spec, "model": "m", "base_url": server.base_url}) as grader:
        assert grader.concurrent
        samples = [str(i % 11) for i in range(20)]
        results = grade_batch(grader, samples, [{}] * 20, workers=4)
    assert [r.reward for r in results] == [pytest.approx((i % 11) / 10) for i in range(20)]


def test_model_grader_build_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(GraderSpecError, match="not a local model directory and no base_url"):
        build_grader(score_spec(model="gpt-4o-mini"))
    monkeypatch.delenv("RFT_UNSET_KEY", raising=False)
    with pytest.raises(GraderSpecError, match=r"api_key_env names \$RFT_UNSET_KEY, which is not set"):
        build_grader(score_spec(model="m", base_url="http://127.0.0.1:9/v1", api_key_env="RFT_UNSET_KEY"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraderSpecError, match="could not be loaded"):
        build_grader(score_spec(model=str(tmp_path / "empty")))


def test_openai_model_name_goes_to_the_openai_endpoint_when_a_key_is_set(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    with ChatServer(lambda body: "1") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        with build_grader(score_spec(model="gpt-4o-mini")) as grader:
            assert grader.grade("x", {"reference": "1"}).reward == 1.0
    assert server.headers[0]["authorization"] == "Bearer sk-x"


# ----------------------------------------------------------------------------- reply parsing


@pytest.mark.parametrize(
    ("reply", "value"),
    [("7", 7.0), (" 0.25\n", 0.25), ('{"result": 3}', 3.0), ('{"score": 0.5}', 0.5), ("Score: 8/10", 8.0),
     ("-1", -1.0), (".5", 0.5), ("1e-1", 0.1)],
)
def test_parse_score(reply, value):
    assert parse_score(reply) == value


@pytest.mark.parametrize(
    ("reply", "label"),
    [("correct", "correct"), ("INCORRECT", "incorrect"), ("**Correct**.", "correct"),
     ('{"label": "Incorrect"}', "incorrect"), ("The answer is correct.", "correct"),
     ("It is incorrect, sadly.", "incorrect")],
)
def test_parse_label(reply, label):
    assert parse_label(reply, ["correct", "incorrect"]) == label


# ----------------------------------------------------------------------------- cosine


def test_cosine_similarity_with_a_local_embedding_model(models):
    spec = {"type": "text_similarity", "name": "cos", "evaluation_metric": "cosine", "embedding_model": models["embed"],
            "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"}
    with build_grader(spec) as grader:
        same = grader.grade("the answer is correct", {"reference": "the answer is correct"})
        different = grader.grade("paris lyon rome", {"reference": "the answer is correct"})
    assert same.reward == pytest.approx(1.0, abs=1e-6)
    assert different.ok and 0.0 <= different.reward < 0.99
    embedder = grader.embedder
    a, b = embedder.embed("paris lyon rome"), embedder.embed("the answer is correct")
    raw = float((a @ b) / (a.norm() * b.norm()))
    assert different.reward == pytest.approx(max(0.0, raw), abs=1e-6)


def test_cosine_with_a_bad_model_directory_is_a_build_error(tmp_path):
    spec = {"type": "text_similarity", "name": "cos", "evaluation_metric": "cosine",
            "embedding_model": str(tmp_path / "nope"), "input": "{{ sample.output_text }}", "reference": "x"}
    with pytest.raises(GraderSpecError, match="is not a local model directory"):
        build_grader(spec)

