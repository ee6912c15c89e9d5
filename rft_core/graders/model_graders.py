"""The `score_model` and `label_model` graders: a judge model reads rendered messages and replies.

The judge is either a local Hugging Face causal LM (`model` is a directory: AutoModelForCausalLM
+ AutoTokenizer, the tokenizer's chat template when it has one, greedy decoding unless
`sampling_params.temperature` > 0), or an OpenAI-compatible chat-completions endpoint (`base_url`,
e.g. a vLLM server, with the key read from the environment variable named by `api_key_env`),
called through the openai SDK (the `openai` extra: its client's retries, Retry-After and timeouts).
A `model` that is neither a directory nor paired with `base_url` goes to api.openai.com (or
`$OPENAI_BASE_URL`) with `$OPENAI_API_KEY`, so OpenAI's grader JSON works as it is.

`score_model` parses a number from the reply (a bare number, JSON `{"result": x}` or
`{"score": x}`, else the first number in the text) and maps `range` [lo, hi] (default [0, 1])
linearly onto [0, 1]; a number outside the range is an error result. `label_model` maps the
reply to one of `labels` (the whole reply, JSON `{"label": ...}`, else the one label named in
it as a word) and scores 1.0 when it is in `passing_labels`, else 0.0. A reply that cannot be
parsed is an error result quoting the reply.

>>> parse_score('{"result": 7, "steps": []}'), parse_score("Score: 0.25 because ...")
(7.0, 0.25)
>>> parse_label("Verdict: **Correct**.", ["correct", "incorrect"])
'correct'
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from rft_core.graders.base import Grader, GraderError, GraderSpecError, field_problems, shown, spec_label
from rft_core.graders.templates import render, template_problems

ROLES = ("system", "developer", "user", "assistant")
SAMPLING_PARAMS = ("temperature", "top_p", "seed", "max_completions_tokens", "max_completion_tokens",
                   "max_tokens", "reasoning_effort")
_TEXT_PART_TYPES = ("input_text", "output_text", "text")
_COMMON_FIELDS: dict[str, type | tuple[type, ...]] = {
    "sampling_params": dict, "base_url": str, "api_key_env": str, "request_timeout_s": float,
    "max_retries": int, "device": str,
}
DEFAULT_LOCAL_MAX_NEW_TOKENS = 128
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


# ----------------------------------------------------------------------------- spec checks


def _input_problems(messages: Any, label: str) -> list[str]:
    if isinstance(messages, str):
        return template_problems(messages, f"{label}: input")
    if not isinstance(messages, list) or not messages:
        return [f"{label}: input should be a non-empty list of messages {{role, content}}"]
    problems = []
    for i, message in enumerate(messages):
        where = f"{label}: input[{i}]"
        if not isinstance(message, dict):
            problems.append(f"{where}: a message is a mapping with 'role' and 'content'")
            continue
        if message.get("role") not in ROLES:
            problems.append(f"{where}: role should be one of {', '.join(ROLES)}, got {shown(message.get('role'))}")
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            if isinstance(part, dict):
                if part.get("type", "input_text") not in _TEXT_PART_TYPES:
                    problems.append(f"{where}: only text content is supported, got type {shown(part.get('type'))}")
                else:
                    problems += template_problems(part.get("text"), f"{where}.content")
            else:
                problems += template_problems(part, f"{where}.content")
    return problems


def _common_problems(spec: Mapping[str, Any], label: str) -> list[str]:
    problems = _input_problems(spec.get("input"), label) if "input" in spec else []
    params = spec.get("sampling_params")
    if isinstance(params, dict):
        for key, value in params.items():
            if key not in SAMPLING_PARAMS:
                problems.append(f"{label}: unknown sampling_params key {shown(key)} (known: {', '.join(SAMPLING_PARAMS)})")
            elif key != "reasoning_effort" and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                problems.append(f"{label}: sampling_params.{key} should be a number, got {shown(value)}")
    if spec.get("device") not in (None, "auto", "cpu", "cuda", "mps"):
        problems.append(f"{label}: device should be auto, cpu, cuda or mps, got {shown(spec.get('device'))}")
    return problems


def check_score_spec(spec: Mapping[str, Any]) -> list[str]:
    """Problems of a score_model spec (empty when it is valid); nothing is loaded."""
    problems = field_problems(spec, {"model": str, "input": (list, str)}, {**_COMMON_FIELDS, "range": list})
    label = spec_label(spec)
    problems += _common_problems(spec, label)
    if "range" in spec:
        bounds = spec["range"]
        if not (
            isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            and bounds[0] < bounds[1]
        ):
            problems.append(f"{label}: range should be [lo, hi] with lo < hi, got {shown(bounds)}")
    return problems


def check_label_spec(spec: Mapping[str, Any]) -> list[str]:
    """Problems of a label_model spec (empty when it is valid); nothing is loaded."""
    problems = field_problems(
        spec, {"model": str, "input": (list, str), "labels": list, "passing_labels": list}, _COMMON_FIELDS
    )
    label = spec_label(spec)
    problems += _common_problems(spec, label)
    labels = spec.get("labels")
    if isinstance(labels, list):
        if not labels or not all(isinstance(x, str) and x.strip() for x in labels):
            problems.append(f"{label}: labels should be a non-empty list of strings")
        passing = spec.get("passing_labels")
        if isinstance(passing, list):
            missing = [x for x in passing if x not in labels]
            if missing:
                problems.append(f"{label}: passing_labels {missing} are not in labels {labels}")
            if not passing:
                problems.append(f"{label}: passing_labels should name at least one label")
    return problems


# ----------------------------------------------------------------------------- messages


def render_messages(messages: Any, context: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI grader `input` messages rendered to `[{"role", "content"}]` with plain-text content.

    >>> render_messages([{"role": "user", "content": {"type": "input_text", "text": "Is {{ sample.output_text }} right?"}}],
    ...                 {"sample": {"output_text": "18"}, "item": {}})
    [{'role': 'user', 'content': 'Is 18 right?'}]
    """
    if isinstance(messages, str):
        return [{"role": "user", "content": render(messages, context)}]
    rendered = []
    for message in messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        texts = [render(part.get("text", "") if isinstance(part, dict) else str(part), context) for part in parts]
        rendered.append({"role": message["role"], "content": "\n".join(texts)})
    return rendered


# ----------------------------------------------------------------------------- reply parsing


def parse_score(reply: str) -> float:
    """The number a judge replied: bare, JSON `result`/`score`, else the first number in the text."""
    text = reply.strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        for key in ("result", "score"):
            if isinstance(value.get(key), (int, float)) and not isinstance(value.get(key), bool):
                return float(value[key])
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _NUMBER_RE.search(text)
    if match:
        return float(match.group(0))
    raise GraderError(f"could not parse a score from the judge's reply {reply[:200]!r}")


def _label_key(text: str) -> str:
    return text.strip().strip("*`_\"'.:!").strip().casefold()


def parse_label(reply: str, labels: list[str]) -> str:
    """The label a judge replied: the whole reply, JSON `label`/`result`, else the one label named in it."""
    by_key = {_label_key(label): label for label in labels}
    text = reply.strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        for key in ("label", "result"):
            if isinstance(value.get(key), str) and _label_key(value[key]) in by_key:
                return by_key[_label_key(value[key])]
    if _label_key(text) in by_key:
        return by_key[_label_key(text)]
    named = [
        label for label in labels
        if re.search(rf"(?<!\w){re.escape(label.strip())}(?!\w)", text, flags=re.IGNORECASE)
    ]
    if len(named) == 1:
        return named[0]
    if named:
        raise GraderError(f"the judge's reply names several labels {named}: {reply[:200]!r}")
    raise GraderError(f"the judge's reply matches none of the labels {labels}: {reply[:200]!r}")


# ----------------------------------------------------------------------------- judges


class ChatModel(Protocol):
    def complete(self, messages: list[dict[str, str]]) -> str: ...

    def close(self) -> None: ...


class LocalChatModel:
    """A local causal LM answering chat messages (chat template when the tokenizer has one)."""

    def __init__(self, path: str, sampling_params: Mapping[str, Any] | None = None, device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise GraderSpecError(f"model {path!r} could not be loaded: {exc}") from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device).eval()
        self.device = device
        self.params = dict(sampling_params or {})
        self._torch = torch
        self._lock = threading.Lock()

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """The text the model continues: its chat template, else `role: content` blocks."""
        if getattr(self.tokenizer, "chat_template", None):
            # Many chat templates know no "developer" role; it means the same as "system".
            chat = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
            return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:"

    def complete(self, messages: list[dict[str, str]]) -> str:
        torch = self._torch
        text = self.prompt_text(messages)
        # A chat template already wrote the special tokens it wants.
        add_special = not getattr(self.tokenizer, "chat_template", None)
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special).to(self.device)
        max_new_tokens = int(
            self.params.get("max_completions_tokens")
            or self.params.get("max_completion_tokens")
            or self.params.get("max_tokens")
            or DEFAULT_LOCAL_MAX_NEW_TOKENS
        )
        temperature = float(self.params.get("temperature") or 0.0)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=float(self.params.get("top_p") or 1.0))
        else:
            options.update(do_sample=False)
        with self._lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            # fork_rng: a judge's seed must not move the training process's random state.
            if "seed" in self.params and self.params["seed"] is not None:
                torch.manual_seed(int(self.params["seed"]))
            output = self.model.generate(**inputs, **options)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


OPENAI_INSTALL_HINT = "pip install -e '.[openai]' (in an rft checkout) or pip install openai"
# The openai SDK refuses to build a client without a key; keyless servers (a local vLLM) ignore
# it, and "EMPTY" is the placeholder vLLM's own docs use.
_NO_KEY = "EMPTY"


def _import_openai(label: str, base_url: str) -> Any:
    try:
        import openai
    except ImportError:
        raise GraderSpecError(
            f"{label}: the judge at {base_url} is called through the openai package, which is not "
            f"installed; install it with: {OPENAI_INSTALL_HINT}"
        ) from None
    return openai


class OpenAIChatModel:
    """An OpenAI-compatible chat-completions endpoint, called through the openai SDK's client.

    The client retries connection errors, timeouts, 408, 409, 429 and 5xx up to `max_retries`
    times with exponential backoff, waiting what a `Retry-After` header asks when it does.
    Whatever still fails becomes a GraderError naming the endpoint.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        sampling_params: Mapping[str, Any] | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        label: str = "judge",
    ):
        self.openai = _import_openai(label, base_url)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        # An explicit key (never None) also keeps the SDK from sending $OPENAI_API_KEY to a
        # base_url that was not meant to receive it.
        self.client = self.openai.OpenAI(
            base_url=self.base_url, api_key=api_key or _NO_KEY, timeout=timeout_s, max_retries=max_retries
        )
        self.request_params: dict[str, Any] = {}
        params = dict(sampling_params or {})
        for key in ("temperature", "top_p", "seed", "reasoning_effort"):
            if params.get(key) is not None:
                self.request_params[key] = params[key]
        # OpenAI's grader JSON spells it max_completions_tokens; the chat API max_completion_tokens.
        max_tokens = params.get("max_completions_tokens") or params.get("max_completion_tokens") or params.get("max_tokens")
        if max_tokens:
            self.request_params["max_completion_tokens"] = int(max_tokens)

    def complete(self, messages: list[dict[str, str]]) -> str:
        openai = self.openai
        url = f"{self.base_url}/chat/completions"
        try:
            completion = self.client.chat.completions.create(
                model=self.model, messages=messages, **self.request_params
            )
        except openai.APITimeoutError:
            raise GraderError(f"request to {url} timed out after {self.timeout_s:g} s") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise GraderError(f"request to {url} failed: {type(cause).__name__}: {cause}") from None
        except openai.APIStatusError as exc:
            raise GraderError(f"HTTP {exc.status_code} from {url}: {exc.response.text[:300]}") from None
        return _reply_text(completion)

    def close(self) -> None:
        self.client.close()


def _reply_text(completion: Any) -> str:
    """The text of the first choice of a chat completion (the SDK does not validate the shape)."""
    choices = getattr(completion, "choices", None)
    if not choices:
        raise GraderError(f"not a chat-completions response: {str(completion)[:300]}")
    message = choices[0].message
    if getattr(message, "refusal", None):
        raise GraderError(f"the judge refused: {message.refusal[:200]}")
    content = message.content
    if isinstance(content, list):  # content parts, as some servers send them
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise GraderError(f"the judge's reply has no text content: {message!r:.300}")
    return content


def make_chat_model(spec: Mapping[str, Any]) -> ChatModel:
    """The judge a model-grader spec describes (see the module docstring for the rules)."""
    model = spec["model"]
    params = spec.get("sampling_params") or {}
    base_url = spec.get("base_url")
    if base_url is None and Path(model).is_dir():
        return LocalChatModel(model, params, device=spec.get("device") or "auto")
    if base_url is None:
        base_url = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
        key_env = spec.get("api_key_env") or "OPENAI_API_KEY"
        if not os.environ.get(key_env):
            raise GraderSpecError(
                f"{spec_label(spec)}: model {model!r} is not a local model directory and no base_url is "
                f"given; set base_url to an OpenAI-compatible endpoint, or ${key_env} to use {base_url}"
            )
    else:
        key_env = spec.get("api_key_env")
    api_key = None
    if key_env:
        api_key = os.environ.get(key_env)
        if not api_key:
            raise GraderSpecError(f"{spec_label(spec)}: api_key_env names ${key_env}, which is not set")
    return OpenAIChatModel(
        base_url, model, api_key=api_key, sampling_params=params,
        timeout_s=float(spec.get("request_timeout_s") or 60.0), max_retries=int(spec.get("max_retries", 2)),
        label=spec_label(spec),
    )


# ----------------------------------------------------------------------------- graders


class _ModelGrader(Grader):

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__(spec)
        self.input = spec["input"]
        self.chat_model: ChatModel = make_chat_model(spec)
        # Only a remote judge gains from concurrent calls; a local one runs one generate at a time.
        self.concurrent = isinstance(self.chat_model, OpenAIChatModel)

    def reply(self, context: dict[str, Any]) -> str:
        return self.chat_model.complete(render_messages(self.input, context))

    def close(self) -> None:
        self.chat_model.close()


class ScoreModelGrader(_ModelGrader):
    """OpenAI's score_model: `model`, `input` (messages), `range` [lo, hi], `sampling_params`,
    plus ours: `base_url`, `api_key_env`, `request_timeout_s`, `max_retries`, `device`."""

    type = "score_model"

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__(spec)
        self.low, self.high = (float(b) for b in spec.get("range") or (0.0, 1.0))

    def score(self, context: dict[str, Any]) -> float:
        value = parse_score(self.reply(context))
        if not self.low <= value <= self.high:
            raise GraderError(f"the judge's score {value:g} is outside range [{self.low:g}, {self.high:g}]")
        return (value - self.low) / (self.high - self.low)


class LabelModelGrader(_ModelGrader):
    """OpenAI's label_model: `model`, `input`, `labels`, `passing_labels`, `sampling_params`,
    plus ours: `base_url`, `api_key_env`, `request_timeout_s`, `max_retries`, `device`."""

    type = "label_model"

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__(spec)
        self.labels = list(spec["labels"])
        self.passing = set(spec["passing_labels"])

    def score(self, context: dict[str, Any]) -> float:
        return 1.0 if parse_label(self.reply(context), self.labels) in self.passing else 0.0
