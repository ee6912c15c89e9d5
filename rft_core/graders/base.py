"""What every grader shares: the result type, the error types, and the `Grader` base class.

A grader maps one sample (the model's output) and one item (the data row) to a reward in
[0, 1]. When it cannot (an exception, a timeout, a missing template field, a score outside
[0, 1]) the result is an *error result*: `reward` is None and `errors` says why. Error results
are counted and reported by the callers; they are never turned into a silent 0 and a score
outside [0, 1] is never clipped.

>>> GradeResult(0.5).to_dict()
{'reward': 0.5, 'sub_rewards': {}, 'errors': []}
>>> GradeResult.failure("answer: template field 'item.x' not found").ok
False
"""

from __future__ import annotations

import json
import math
import numbers
import reprlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "MAX_SPEC_CHARS",
    "MAX_SPEC_DEPTH",
    "MAX_SPEC_NODES",
    "GradeResult",
    "Grader",
    "GraderError",
    "GraderSpecError",
    "Sample",
    "check_reward",
    "make_context",
    "shown",
    "structure_problems",
]

# What graders accept as a sample: the output text, or a dict with `output_text` and
# optionally `output_json` (parsed from output_text when absent) and any other fields.
Sample = str | Mapping[str, Any]


class GraderSpecError(ValueError):
    """A grader spec that cannot be built: unknown type, missing field, bad formula, ..."""


class GraderError(RuntimeError):
    """A failure while grading one sample; it becomes an error result with this message."""


@dataclass
class GradeResult:
    """The outcome of grading one sample.

    `reward` is a float in [0, 1], or None for an error result. `sub_rewards` holds the
    rewards of a multi grader's sub-graders by name (None for those that failed). `errors`
    lists the reasons of a failure, each prefixed by the name of the grader that failed.
    """

    reward: float | None
    sub_rewards: dict[str, float | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when grading produced a reward (no error)."""
        return self.reward is not None and not self.errors

    @classmethod
    def failure(cls, *errors: str, sub_rewards: dict[str, float | None] | None = None) -> GradeResult:
        return cls(reward=None, sub_rewards=dict(sub_rewards or {}), errors=list(errors))

    def to_dict(self) -> dict[str, Any]:
        return {"reward": self.reward, "sub_rewards": dict(self.sub_rewards), "errors": list(self.errors)}


def make_context(sample: Sample, item: Mapping[str, Any] | None) -> dict[str, Any]:
    """The two namespaces templates and python graders see: `{"sample": {...}, "item": {...}}`.

    `sample.output_json` is the output parsed as JSON, or None when the output is not JSON.

    >>> make_context('{"a": 1}', {"x": 2})
    {'sample': {'output_text': '{"a": 1}', 'output_json': {'a': 1}}, 'item': {'x': 2}}
    """
    if isinstance(sample, str):
        sample_ns: dict[str, Any] = {"output_text": sample}
    elif isinstance(sample, Mapping):
        sample_ns = dict(sample)
        if not isinstance(sample_ns.get("output_text"), str):
            raise GraderError("the sample has no string 'output_text'")
    else:
        raise GraderError(f"a sample is a string or a dict with 'output_text', got {type(sample).__name__}")
    if "output_json" not in sample_ns:
        sample_ns["output_json"] = _parse_json(sample_ns["output_text"])
    if item is None:
        item = {}
    if not isinstance(item, Mapping):
        raise GraderError(f"an item is a dict of fields, got {type(item).__name__}")
    return {"sample": sample_ns, "item": dict(item)}


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def check_reward(value: Any) -> float:
    """`value` as a float in [0, 1], or GraderError saying what is wrong with it.

    Booleans count as 1.0/0.0 and numpy scalars as their value; strings, None, NaN and
    numbers outside [0, 1] are errors (never clipped).
    """
    if not isinstance(value, numbers.Real):
        raise GraderError(f"returned {type(value).__name__} {value!r}, not a number")
    reward = float(value)
    if math.isnan(reward):
        raise GraderError("returned NaN")
    if not 0.0 <= reward <= 1.0:
        raise GraderError(f"score {reward!r} is outside [0, 1]")
    return reward


class Grader(ABC):
    """Base class: `grade(sample, item)` turns any failure of `score` into an error result.

    Subclasses implement `score(context) -> float`, where `context` is the template context
    `{"sample": {...}, "item": {...}}` (see `make_context`). A grader that starts
    processes or holds connections releases them in `close()`; graders are context managers.
    """

    type: ClassVar[str] = ""
    # True when grading spends its time waiting on another process or server, so that
    # grading several samples at once from threads pays (see batch.grade_batch).
    concurrent: bool = False

    def __init__(self, spec: Mapping[str, Any]):
        self.spec = dict(spec)
        self.name: str = str(spec.get("name") or spec.get("type") or self.type)

    @abstractmethod
    def score(self, context: dict[str, Any]) -> float:
        """The reward for one sample; raise GraderError (or anything) to fail."""

    def grade(self, sample: Sample, item: Mapping[str, Any] | None = None) -> GradeResult:
        """Grade one sample (a string or `{"output_text": ..., "output_json": ...}`) against an item."""
        try:
            context = make_context(sample, item)
            return GradeResult(check_reward(self.score(context)))
        except GraderError as exc:
            return GradeResult.failure(f"{self.name}: {exc}")
        except Exception as exc:  # a bug in a metric library must not stop a training run
            return GradeResult.failure(f"{self.name}: {type(exc).__name__}: {exc}")

    def close(self) -> None:  # noqa: B027 - in-process graders hold nothing to release
        """Release processes, models and connections; the grader is unusable afterwards."""

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------- spec checks

# Fields every grader type accepts: OpenAI's `pass_threshold` belongs to evals and does not
# change the reward, so it is accepted and ignored.
COMMON_FIELDS = ("type", "name", "pass_threshold")

# A spec's size and shape, checked before anything walks it recursively. A multi grader inside a
# multi grader adds two levels (its `graders` map and the spec), so 32 allows 15 such levels.
MAX_SPEC_DEPTH = 32
MAX_SPEC_NODES = 100_000  # values: mappings, lists, strings, numbers (keys included)
MAX_SPEC_CHARS = 2_000_000  # characters of all its strings together

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """A spec value as problems quote it: its repr, shortened (long strings, deep or long
    containers), so that a message stays one short line whatever the spec holds.

    >>> shown("is"), shown([[[[[1]]]]]), len(shown("x" * 10_000)) <= 80
    ("'is'", '[[[[...]]]]', True)
    """
    return _SHOWN.repr(value)


def structure_problems(spec: Any) -> list[str]:
    """Problems of a spec's size and shape: nested deeper than MAX_SPEC_DEPTH, more than
    MAX_SPEC_NODES values or more than MAX_SPEC_CHARS characters of text. Walked without
    recursion (and stopping at the first limit), so a spec nested thousands deep, or a YAML file
    whose aliases repeat one list exponentially, is a problem here, not a RecursionError or a hang.

    >>> structure_problems({"type": "multi", "graders": {"a": {"type": "rank"}}})
    []
    """
    stack: list[tuple[Any, int]] = [(spec, 1)]
    nodes = chars = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SPEC_NODES:
            return [f"the grader spec holds more than {MAX_SPEC_NODES} values; a grader spec is small"]
        if isinstance(value, str):
            chars += len(value)
            if chars > MAX_SPEC_CHARS:
                return [f"the grader spec holds more than {MAX_SPEC_CHARS} characters of text; a grader spec is small"]
        elif isinstance(value, (Mapping, list, tuple)):
            if depth > MAX_SPEC_DEPTH:
                return [f"the grader spec nests deeper than the limit of {MAX_SPEC_DEPTH} levels "
                        "(a multi grader inside a multi grader adds two)"]
            children = [x for pair in value.items() for x in pair] if isinstance(value, Mapping) else value
            stack.extend((child, depth + 1) for child in children)
    return []


def spec_label(spec: Mapping[str, Any]) -> str:
    """How problems name a grader: `string_check 'exact'`."""
    name = spec.get("name")
    # The type is one of GRADERS here (spec checks run only for known types): short, unquoted.
    return f"{spec.get('type')} {shown(name)}" if name else str(spec.get("type"))


def field_problems(
    spec: Mapping[str, Any],
    required: Mapping[str, type | tuple[type, ...]],
    optional: Mapping[str, type | tuple[type, ...]],
) -> list[str]:
    """Missing required fields, fields of the wrong type, and unknown fields (with a suggestion)."""
    import difflib

    label = spec_label(spec)
    problems = []
    for key, kind in required.items():
        if key not in spec:
            problems.append(f"{label}: missing field '{key}'")
        elif not _is(spec[key], kind):
            problems.append(f"{label}: field '{key}' should be {_kind_name(kind)}, got {shown(spec[key])}")
    for key, kind in optional.items():
        if key in spec and spec[key] is not None and not _is(spec[key], kind):
            problems.append(f"{label}: field '{key}' should be {_kind_name(kind)}, got {shown(spec[key])}")
    known = [*COMMON_FIELDS, *required, *optional]
    for key in spec:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
            problems.append(f"{label}: unknown field {shown(key)}{hint}")
    if "name" in spec and not isinstance(spec["name"], str):
        problems.append(f"{label}: field 'name' should be a string, got {shown(spec['name'])}")
    return problems


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # True is an int to Python, not a number to a spec reader
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", float: "a number", int: "an integer", bool: "true or false",
             list: "a list", dict: "a mapping"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
