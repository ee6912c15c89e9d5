"""Math answers: final-answer extraction (`#### x`, "the answer is x", else the last number) and
the `numeric_match` grader built on it.

The extraction functions are shared by the grader and by data validation (a GSM8K reference
must yield a number). `numeric_match` scores 1.0 when the number extracted from the output
equals the reference within a tolerance, `partial_credit` when a number was extracted but is
wrong (ReFT gives 0.1 to keep the reward dense), and 0.0 when the output holds no number at
all (a score, not an error). A reference without a number is an error result.

>>> extract_answer("She makes 9 * 2 = 18 dollars.\\n#### 18")
'18'
>>> parse_number("$1,234.50")
1234.5
>>> parse_number("1/2")
0.5
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from rft_core.graders.base import Grader, GraderError, field_problems, spec_label
from rft_core.graders.templates import render, template_problems

# A number as people write it: optional sign and currency, thousands separators, decimals,
# a simple fraction, an optional trailing percent sign.
_NUMBER = r"[-+\u2212]?\s*[$€£¥]?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?%?|[-+\u2212]?\s*[$€£¥]?\s*\.\d+%?"
NUMBER_RE = re.compile(_NUMBER)
_MARKER_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*([^\n]*)", re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """The value of one written number ('1,234', '$5', '-3.0', '1/2'), or None.

    A trailing percent sign is dropped ('50%' is 50), as math datasets write percentages.
    """
    if text is None:
        return None
    s = str(text).strip().replace("\u2212", "-")
    s = re.sub(r"[$€£¥\s]", "", s).rstrip(".")
    s = s.rstrip("%").replace(",", "")
    if not s:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            if float(den) == 0:
                return None
            value = float(Fraction(num) / Fraction(den))
        else:
            value = float(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _first_number(text: str) -> str | None:
    match = NUMBER_RE.search(text)
    return match.group(0).strip() if match else None


def _last_number(text: str) -> str | None:
    matches = NUMBER_RE.findall(text)
    return matches[-1].strip() if matches else None


def extract_answer(text: str) -> str | None:
    """The final answer written in `text`, as a string, or None when there is none.

    Order of preference: the number after the last `####`; after the last "the answer is";
    else the last number anywhere.
    """
    if not text:
        return None
    markers = _MARKER_RE.findall(text)
    if markers:
        return _first_number(markers[-1])
    answers = _ANSWER_IS_RE.findall(text)
    if answers:
        found = _first_number(answers[-1])
        if found is not None:
            return found
    return _last_number(text)


def extract_number(text: str) -> float | None:
    """`parse_number(extract_answer(text))`."""
    answer = extract_answer(text)
    return None if answer is None else parse_number(answer)


def numbers_match(a: float, b: float, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """Equal within a relative or an absolute tolerance (18.0 == 18)."""
    return abs(a - b) <= max(abs_tol, rel_tol * max(abs(a), abs(b)))


# ----------------------------------------------------------------------------- the grader

DEFAULT_REL_TOL = 1e-6
DEFAULT_ABS_TOL = 1e-6


def numeric_score(
    output: str,
    reference: str | float,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
    abs_tol: float = DEFAULT_ABS_TOL,
    partial_credit: float = 0.0,
) -> float:
    """The numeric_match reward of `output` against `reference` (a number or text holding one).

    >>> numeric_score("5 + 13 = 18.0, so #### 18", "18")
    1.0
    >>> numeric_score("#### 17", "#### 18", partial_credit=0.1)
    0.1
    >>> numeric_score("I do not know", "18", partial_credit=0.1)
    0.0
    """
    expected = float(reference) if isinstance(reference, (int, float)) else extract_number(str(reference))
    if expected is None or math.isnan(expected):
        raise GraderError(f"the reference {str(reference)[:80]!r} holds no number")
    got = extract_number(output)
    if got is None:
        return 0.0
    return 1.0 if numbers_match(got, expected, rel_tol=rel_tol, abs_tol=abs_tol) else partial_credit


def check_spec(spec: Mapping[str, Any]) -> list[str]:
    """Problems of a numeric_match spec (empty when it is valid)."""
    problems = field_problems(
        spec, {}, {"input": str, "reference": str, "rel_tol": float, "abs_tol": float, "partial_credit": float}
    )
    label = spec_label(spec)
    for key in ("rel_tol", "abs_tol"):
        value = spec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            problems.append(f"{label}: {key} must be >= 0, got {value}")
    credit = spec.get("partial_credit")
    if isinstance(credit, (int, float)) and not isinstance(credit, bool) and not 0.0 <= credit <= 1.0:
        problems.append(f"{label}: partial_credit must be in [0, 1], got {credit}")
    for key in ("input", "reference"):
        if isinstance(spec.get(key), str):
            problems += template_problems(spec[key], f"{label}: {key}")
    return problems


class NumericMatchGrader(Grader):
    """Ours: `input` (default `{{ sample.output_text }}`), `reference` (default `{{ item.reference }}`),
    `rel_tol`, `abs_tol` (default 1e-6 each), `partial_credit` (default 0).

    >>> grader = NumericMatchGrader({"type": "numeric_match", "partial_credit": 0.1})
    >>> [grader.grade(text, {"reference": "1,234"}).reward for text in ("It costs $1,234.00.", "#### 1200", "none")]
    [1.0, 0.1, 0.0]
    """

    type = "numeric_match"

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__(spec)
        self.input = spec.get("input") or "{{ sample.output_text }}"
        self.reference = spec.get("reference") or "{{ item.reference }}"
        self.rel_tol = float(spec.get("rel_tol", DEFAULT_REL_TOL))
        self.abs_tol = float(spec.get("abs_tol", DEFAULT_ABS_TOL))
        self.partial_credit = float(spec.get("partial_credit", 0.0))

    def score(self, context: dict[str, Any]) -> float:
        return numeric_score(
            render(self.input, context),
            render(self.reference, context),
            rel_tol=self.rel_tol,
            abs_tol=self.abs_tol,
            partial_credit=self.partial_credit,
        )
