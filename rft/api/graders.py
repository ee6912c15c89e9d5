"""`/v1/fine_tuning/alpha/graders/run` and `/validate`: rft's own graders and sandbox, as training uses them.

`validate` checks a grader spec with `rft_core.graders.validate_grader_spec` (types, fields,
templates, formulas, python sources parsed, never run). `run` builds the grader with the server's
grader settings (`grader.timeout_s`, `grader.memory_mb`, `grader.sandbox`: python graders run in the
same kernel sandbox as in training), grades `model_sample` against `item`, and answers OpenAI's
whole response. A grader error is not a silent 0: the reward is 0.0 as OpenAI reports it, and the
error flags say what failed (`python_grader_runtime_error` with its details, `invalid_variable_error`
for a template field the item lacks, `sample_parse_error` when `sample.output_json` is used and the
sample is not JSON, `unresponsive_reward_error` for a python grader past its time limit,
`formula_parse_error` for a multi grader's formula, `model_grader_*` for score/label model judges,
`other_error` for the rest, such as a score outside [0, 1]); rft's own messages are added as
`metadata.rft_errors`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from rft.api.errors import APIError, invalid
from rft_core.graders import Grader, GraderSpecError, build_grader, validate_grader_spec
from rft_core.graders.python_grader import SandboxUnavailable, WorkerDied, WorkerTimeout
from rft_core.graders.templates import TemplateError

router = APIRouter()

MODEL_GRADERS = ("score_model", "label_model")
_SERVER_SIGNS = ("request to ", "HTTP ", "not a chat-completions response")


class GraderRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]
    model_sample: str
    item: Any = None


class GraderValidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]


def check_spec(spec: dict[str, Any]) -> None:
    problems = validate_grader_spec(spec)
    if problems:
        raise invalid("invalid grader: " + "; ".join(problems), param="grader", code="invalid_grader")


def no_errors() -> dict[str, Any]:
    return {
        "formula_parse_error": False,
        "invalid_variable_error": False,
        "model_grader_parse_error": False,
        "model_grader_refusal_error": False,
        "model_grader_server_error": False,
        "model_grader_server_error_details": None,
        "other_error": False,
        "python_grader_runtime_error": False,
        "python_grader_runtime_error_details": None,
        "python_grader_server_error": False,
        "python_grader_server_error_type": None,
        "sample_parse_error": False,
        "truncated_observation_error": False,
        "unresponsive_reward_error": False,
    }


def record_failures(grader: Grader, raised: list[tuple[str, BaseException]]) -> None:
    """Note every exception a grader (and each sub-grader of a multi grader) raises while scoring,
    with the grader's type: the flags come from what failed, not from parsing messages alone."""
    inner = grader.score

    def score(context: dict[str, Any]) -> float:
        try:
            return inner(context)
        except Exception as exc:
            raised.append((grader.type, exc))
            raise

    grader.score = score  # type: ignore[method-assign]
    for sub in getattr(grader, "graders", {}).values():
        record_failures(sub, raised)


def classify(raised: list[tuple[str, BaseException]], messages: list[str]) -> dict[str, Any]:
    """OpenAI's error flags for what failed."""
    errors = no_errors()
    for kind, exc in raised:
        text = str(exc)
        if isinstance(exc, TemplateError):
            errors["sample_parse_error" if "not valid JSON" in text else "invalid_variable_error"] = True
        elif isinstance(exc, WorkerTimeout):
            errors["unresponsive_reward_error"] = True
        elif isinstance(exc, WorkerDied):
            errors["python_grader_server_error"] = True
            errors["python_grader_server_error_type"] = text
        elif kind == "python":
            errors["python_grader_runtime_error"] = True
            errors["python_grader_runtime_error_details"] = text
        elif kind in MODEL_GRADERS:
            if any(sign in text for sign in _SERVER_SIGNS):
                errors["model_grader_server_error"] = True
                errors["model_grader_server_error_details"] = text
            elif "refused" in text:
                errors["model_grader_refusal_error"] = True
            else:
                errors["model_grader_parse_error"] = True
        elif kind != "multi":
            errors["other_error"] = True
    if any("calculate_output" in m for m in messages):
        errors["formula_parse_error"] = True
    flagged = any(v is True for v in errors.values())
    if messages and not flagged:
        errors["other_error"] = True  # e.g. a score outside [0, 1], an output that is not a number
    return errors


def grader_settings(state: Any) -> dict[str, Any]:
    section = state.settings.base_config().grader
    return {"timeout_s": section.timeout_s, "memory_mb": section.memory_mb, "sandbox": section.sandbox}


def run_grader(spec: dict[str, Any], model_sample: str, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Grade one sample as training does; OpenAI's run response."""
    check_spec(spec)
    if item is None:
        item = {}
    if not isinstance(item, dict):
        raise invalid(f"item must be an object of fields, got {type(item).__name__}", param="item")
    try:
        grader = build_grader(spec, **settings)
    except SandboxUnavailable as exc:
        raise APIError(500, f"python graders cannot run on this server: {exc}", type="server_error") from None
    except GraderSpecError as exc:
        raise invalid(f"invalid grader: {exc}", param="grader", code="invalid_grader") from None
    raised: list[tuple[str, BaseException]] = []
    try:
        record_failures(grader, raised)
        started = time.perf_counter()
        result = grader.grade(model_sample, item)
        elapsed = time.perf_counter() - started
    finally:
        grader.close()
    name = spec.get("name") or spec["type"]
    scores = dict(result.sub_rewards) if spec["type"] == "multi" else {name: result.reward}
    return {
        "reward": result.reward if result.reward is not None else 0.0,
        "sub_rewards": dict(result.sub_rewards),
        "metadata": {
            "name": name,
            "type": spec["type"],
            "errors": classify(raised, result.errors),
            "execution_time": elapsed,
            "scores": scores,
            "token_usage": None,
            "sampled_model_name": spec.get("model") if spec["type"] in MODEL_GRADERS else None,
            "rft_errors": list(result.errors),
        },
        "model_grader_token_usage_per_model": {},
    }


@router.post("/v1/fine_tuning/alpha/graders/run")
def run(request: Request, body: GraderRun) -> dict[str, Any]:
    return run_grader(body.grader, body.model_sample, body.item, grader_settings(request.app.state.rft))


@router.post("/v1/fine_tuning/alpha/graders/validate")
def validate(body: GraderValidate) -> dict[str, Any]:
    check_spec(body.grader)
    return {"grader": body.grader}
