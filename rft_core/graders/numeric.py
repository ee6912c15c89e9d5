r"""Math answers as models write them: final-answer extraction, number reading, and the
`numeric_match` grader built on them.

`extract_answer` prefers, in order: the last `<answer>...</answer>` tag; the last `\boxed{...}`
(nested braces); the number after the last `####`; after the last "the answer is"; a text that
is one LaTeX expression as a whole; else the last number. Inside a tag or a box the whole
content is the answer when it is math (`\frac{1}{2}`, `2^{10}`, `x = 5` -> `5`); prose there is
read with the same rules. `parse_number` reads numbers as people and LaTeX write them: commas,
`{,}` and `\,` thousands, currency, percent, `a/b`, `\frac`/`\dfrac`/`\tfrac`, and, through
math-verify (the parser open-r1 and TRL's accuracy reward use), any LaTeX with a numeric value
(`2^{10}`, `\sqrt{2}/2`, `1\frac{1}{2}`). Plain answers never load math-verify.

The extraction functions are shared by the grader, data validation (a GSM8K reference must
yield a number) and majority voting. `numeric_match` scores 1.0 when the answer extracted from
the output equals the reference (numbers within a tolerance; other math such as `x^2+1` or
`(1, 2)` by math-verify's symbolic equivalence), `partial_credit` when an answer was extracted
but is wrong (ReFT gives 0.1 to keep the reward dense), and 0.0 when the output holds no answer
at all (a score, not an error). A reference without a number is an error result.

>>> extract_answer("She makes 9 * 2 = 18 dollars.\n#### 18")
'18'
>>> extract_answer("<answer>42</answer> I checked it: 6 * 7 = 42, and 41 + 1 too.")
'42'
>>> extract_answer(r"So $x = \boxed{\frac{1}{2}}$.")
'\\frac{1}{2}'
>>> parse_number("$1,234.50"), parse_number("1/2"), parse_number(r"1{,}000"), parse_number(r"\dfrac{3}{4}")
(1234.5, 0.5, 1000.0, 0.75)
>>> parse_number("2^{10}")
1024.0
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from rft_core.graders.base import Grader, GraderError, field_problems, spec_label
from rft_core.graders.templates import render, template_problems

# A LaTeX fraction of two plain numbers: \frac{1}{2}, \dfrac{3}{4}, \tfrac{-1}{2}, \frac34.
_FRAC = r"\\[dt]?frac\s*(?:\{\s*-?\d+(?:\.\d+)?\s*\}\s*\{\s*\d+(?:\.\d+)?\s*\}|\d\d)"
# A number as people write it: optional sign and currency, thousands separators (also LaTeX's
# {,} and \,), decimals, a simple or LaTeX fraction (a leading digit makes a mixed number), an
# optional trailing percent sign.
_NUMBER = (
    rf"[-+\u2212]?\s*(?:\d+)?{_FRAC}"
    r"|[-+\u2212]?\s*(?:\\?[$€£¥])?\s*(?:\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+|\d+)(?:\.\d+)?"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?(?:\\?%)?"
    r"|[-+\u2212]?\s*(?:\\?[$€£¥])?\s*\.\d+(?:\\?%)?"
)
NUMBER_RE = re.compile(_NUMBER)
_MARKER_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*([^\n]*)", re.IGNORECASE)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LEADING_MATH_RE = re.compile(r"\s*(?:\$\$?([^$\n]+?)\$\$?|\\\((.+?)\\\))")
_LATEX_MARKUP_RE = re.compile(r"[\\^{]")
_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_WORD_RE = re.compile(r"[A-Za-z]{2,}")
_FRAC_RE = re.compile(
    r"(?<![\d}])\\[dt]?frac\s*(?:\{\s*(?P<a>-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(?P<b>\d+(?:\.\d+)?)\s*\}"
    r"|(?P<a1>\d)(?P<b1>\d))"
)
_THIN_SPACE_RE = re.compile(r"(?<=\d)(?:\\[,!;: ]|~)(?=\d{3}(?!\d))")
_MATH_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# math-verify's input is bounded: sympy evaluates powers and factorials exactly, so without a
# bound 9^{9^{9}} in a sample would stall training (math-verify's own timeout is signal.alarm,
# which only works in the main thread and cancels other alarms such as Prefect's task timeouts).
MAX_MATH_CHARS = 200


# ----------------------------------------------------------------------------- reading numbers


def parse_number(text: str | None) -> float | None:
    """The value of one written number ('1,234', '$5', '-3.0', '1/2', '\\frac{1}{2}', '2^{10}', '\\pi'), or None.

    A trailing percent sign is dropped ('50%' is 50), as math datasets write percentages.
    LaTeX that is not a plain number goes to math-verify; a value that is not a finite real
    number (`x`, `(1, 2)`, `\\infty`) is None.
    """
    if text is None:
        return None
    s = _normalize(str(text))
    value = _plain_number(s)
    if value is None and _LATEX_MARKUP_RE.search(s):
        value = _math_value(s)
    return value


def _normalize(text: str) -> str:
    """LaTeX spellings of plain numbers rewritten plainly: `1{,}000`, `1\\,000`, `\\%`, `\\$`, `\\frac{1}{2}`."""
    s = _strip_math(text).replace("{,}", ",")
    s = _THIN_SPACE_RE.sub("", s).replace("\\%", "%").replace("\\$", "$")
    return _FRAC_RE.sub(lambda m: f"{m['a'] or m['a1']}/{m['b'] or m['b1']}", s)


def _plain_number(s: str) -> float | None:
    s = s.strip().replace("\u2212", "-")
    s = re.sub(r"[$€£¥\s]", "", s).rstrip(".")
    s = s.rstrip("%").replace(",", "")
    if not s:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            if float(den) == 0:
                return None
            return float(Fraction(num) / Fraction(den))
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def _strip_math(text: str) -> str:
    """`text` without surrounding whitespace, a final period, and `$...$`, `\\(...\\)` wrappers."""
    s = text.strip().removesuffix(".").strip()
    for left, right in _MATH_WRAPPERS:
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : -len(right)].strip().removesuffix(".").strip()
    return s


# ----------------------------------------------------------------------------- math-verify


def _drop_timeout_warning(record: logging.LogRecord) -> bool:
    # We call math-verify without its signal-based timeout on purpose (see MAX_MATH_CHARS).
    return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify() -> Any:
    """math-verify, imported on first use: with sympy it takes about half a second."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_drop_timeout_warning)
    return math_verify


def _tractable(s: str) -> bool:
    """False for what sympy could not finish: long text, nested or chained powers, huge
    exponents, factorials of large numbers."""
    if len(s) > MAX_MATH_CHARS or re.search(r"\d{4,}\s*!", s):
        return False
    position = s.find("^")
    while position != -1:
        start = position + 1
        while start < len(s) and s[start] == " ":
            start += 1
        if s[start : start + 1] == "{":
            end = _closing_brace(s, start + 1)
            if end is None:
                return False
            exponent, after = s[start + 1 : end], end + 1
        else:
            exponent, after = s[start : start + 1], start + 1
        if "^" in exponent or "!" in exponent or re.search(r"\d{5,}", exponent) or s[after:].lstrip().startswith("^"):
            return False
        position = s.find("^", after)
    return True


@functools.lru_cache(maxsize=4096)
def _math_parse(s: str) -> tuple[Any, ...]:
    """math-verify's reading of one answer (empty when it has none or is not tractable)."""
    if not s.strip() or not _tractable(s):
        return ()
    math_verify = _math_verify()
    return tuple(math_verify.parse(f"${s}$", parsing_timeout=None))


def _math_value(s: str) -> float | None:
    parsed = _math_parse(s)
    expr = parsed[0] if parsed else None
    try:
        if getattr(expr, "is_number", False) and expr.is_real:
            value = float(expr)
            return value if math.isfinite(value) else None
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        pass
    return None


def equivalent(answer: str, reference: str) -> bool:
    """Whether two extracted answers are the same math, by math-verify (symbolic, numeric within
    its rounding, sets, intervals, equations); False when either cannot be read.

    >>> equivalent("1 + x^2", "x^2+1"), equivalent(r"\\frac{1}{\\sqrt{2}}", r"\\frac{\\sqrt{2}}{2}")
    (True, True)
    """
    gold, pred = _math_parse(_normalize(reference)), _math_parse(_normalize(answer))
    if not gold or not pred:
        return False
    return bool(_math_verify().verify(list(gold), list(pred), timeout_seconds=None))


# ----------------------------------------------------------------------------- extraction


def _first_number(text: str) -> str | None:
    match = NUMBER_RE.search(text)
    return match.group(0).strip() if match else None


def _last_number(text: str) -> str | None:
    matches = NUMBER_RE.findall(text)
    return matches[-1].strip() if matches else None


def _closing_brace(text: str, start: int) -> int | None:
    """The index of the `}` closing the brace opened just before `start` (escapes skipped)."""
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (a truncated last box is skipped)."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        end = _closing_brace(text, match.end())
        if end is not None:
            return text[match.end() : end]
    return None


def _is_math(s: str) -> bool:
    """Math rather than prose: no word of two letters or more outside LaTeX commands."""
    return bool(s) and not _WORD_RE.search(_COMMAND_RE.sub(" ", s)) and bool(re.search(r"[\w\\]", s))


def _answer_in(content: str) -> str | None:
    """The answer a tag or box holds: all of it when it is math (right of its last `=`),
    else what the extraction rules find in it."""
    boxed = _last_boxed(content)
    if boxed is not None and boxed.strip():  # a box in a tag (or a box): its content
        return _answer_in(boxed)
    content = _strip_math(content)
    if _is_math(content):
        return _strip_math(content.rsplit("=", 1)[-1]) or None
    return extract_answer(content)


def _lead_answer(rest: str) -> str | None:
    """The answer that opens `rest` (after `####` or "the answer is"): a leading LaTeX span
    such as `$\\frac{\\sqrt{3}}{2}$` as a whole, else the first number."""
    match = _LEADING_MATH_RE.match(rest)
    if match:
        span = match.group(1) or match.group(2)
        if _LATEX_MARKUP_RE.search(span):
            return _answer_in(span)
    return _first_number(rest)


def extract_answer(text: str | None) -> str | None:
    """The final answer written in `text`, as a string, or None when there is none.

    Order of preference: the last `<answer>` tag; the last `\\boxed{}`; the number after the
    last `####`; after the last "the answer is"; the whole text when it is one LaTeX
    expression; else the last number anywhere.
    """
    if not text:
        return None
    tags = [tag for tag in _ANSWER_TAG_RE.findall(text) if tag.strip()]
    if tags:
        return _answer_in(tags[-1])
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return _answer_in(boxed)
    markers = _MARKER_RE.findall(text)
    if markers:
        return _lead_answer(markers[-1])
    answers = _ANSWER_IS_RE.findall(text)
    if answers:
        found = _lead_answer(answers[-1])
        if found is not None:
            return found
    whole = _strip_math(text)
    # A truncated `\boxed{1` is not an expression; its last number is the best reading.
    if _LATEX_MARKUP_RE.search(whole) and _is_math(whole) and not _BOX_RE.search(whole):
        return _strip_math(whole.rsplit("=", 1)[-1]) or None
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
    r"""The numeric_match reward of `output` against `reference` (a number or text holding one).

    >>> numeric_score("5 + 13 = 18.0, so #### 18", "18")
    1.0
    >>> numeric_score("#### 17", "#### 18", partial_credit=0.1)
    0.1
    >>> numeric_score("I do not know", "18", partial_credit=0.1)
    0.0
    >>> numeric_score(r"The roots give $\boxed{\frac{\sqrt{2}}{2}}$", r"\frac{1}{\sqrt{2}}")
    1.0
    """
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        gold: str | None = None if math.isnan(reference) else repr(float(reference))
    else:
        gold = extract_answer(str(reference))
    expected = None if gold is None else parse_number(gold)
    if gold is None or (expected is None and not _math_parse(_normalize(gold))):
        raise GraderError(f"the reference {str(reference)[:80]!r} holds no number")
    answer = extract_answer(output)
    if answer is None:
        return 0.0
    got = parse_number(answer)
    if expected is not None and got is not None:
        correct = numbers_match(got, expected, rel_tol=rel_tol, abs_tol=abs_tol)
    else:  # math that is not one number (x^2+1, an interval, a set), or a number against such math
        correct = equivalent(answer, gold)
    return 1.0 if correct else partial_credit


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
