"""The `string_check` grader: compare two rendered strings with `eq`, `ne`, `like` or `ilike`.

`eq`/`ne` are exact (in)equality; `like` is "input contains reference" (case-sensitive) and
`ilike` the same ignoring case, as in OpenAI's graders. The reward is 1.0 or 0.0.

>>> grader = StringCheckGrader({"type": "string_check", "name": "exact", "operation": "ilike",
...                             "input": "{{ sample.output_text }}", "reference": "{{ item.city }}"})
>>> grader.grade("The capital is PARIS.", {"city": "Paris"}).reward
1.0
>>> grader.grade("It is Lyon.", {"city": "Paris"}).reward
0.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rft_core.graders.base import Grader, field_problems, shown, spec_label
from rft_core.graders.templates import render, template_problems

OPERATIONS = ("eq", "ne", "like", "ilike")


def check_spec(spec: Mapping[str, Any]) -> list[str]:
    """Problems of a string_check spec (empty when it is valid)."""
    problems = field_problems(spec, {"input": str, "reference": str, "operation": str}, {})
    label = spec_label(spec)
    if isinstance(spec.get("operation"), str) and spec["operation"] not in OPERATIONS:
        problems.append(f"{label}: operation {shown(spec['operation'])} is not one of {', '.join(OPERATIONS)}")
    for key in ("input", "reference"):
        if isinstance(spec.get(key), str):
            problems += template_problems(spec[key], f"{label}: {key}")
    return problems


def string_check(text: str, reference: str, operation: str) -> float:
    """1.0 when `operation` holds between `text` and `reference`, else 0.0.

    >>> string_check("abc", "B", "like"), string_check("abc", "B", "ilike")
    (0.0, 1.0)
    """
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    if operation == "ilike":
        return float(reference.casefold() in text.casefold())
    raise ValueError(f"unknown string_check operation {operation!r}")


class StringCheckGrader(Grader):
    """OpenAI's string_check: fields `input`, `reference` (templates) and `operation`."""

    type = "string_check"

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__(spec)
        self.input = spec["input"]
        self.reference = spec["reference"]
        self.operation = spec["operation"]

    def score(self, context: dict[str, Any]) -> float:
        return string_check(render(self.input, context), render(self.reference, context), self.operation)
