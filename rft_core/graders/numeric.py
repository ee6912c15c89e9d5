r"""Math answers as models write them: final-answer extraction, reading, and the `numeric_match`
grader built on them.

One rule throughout: the final answer is a span of the text, and the span is read *as a whole*
as one number or one math expression, or it is no answer at all. Nothing is cut short:
`#### 1e5` is 100000, `#### 2^{10}` is 1024, and `#### 1e5e5` is no answer (never 1).

Where the answer is (`extract_answer`), in order: the last `<answer>...</answer>` tag; the last
complete `\boxed{...}`; the last `####` line; after the last "the answer is"; a one-line text that
is math as a whole; else the last math span of the text. A tag or box holding math is the answer
whole (right of its last `=`: `x = 5` is 5). Elsewhere the span starts at a number and ends where
prose starts: a word (`18 dollars`, `18cm`, `5 a day`), a `\text{...}` unit, a sentence end
(`18.`, `18, so`, `42!`), a line end, or a bracket it did not open (`18 (9 * 2)`).

How a span is read (`read_answer`): plain numbers here, by a strict grammar: signs (also U+2212),
currency, thousands separators (`1,000`, `1{,}000`, `1\,000`, `1 000`), decimals, scientific
notation (`1.5e-3`, `2.5E+4`), fractions (`3/4`, `\frac{3}{4}`, `\dfrac`), mixed numbers
(`1 1/2`, `1\frac{1}{2}`), a trailing percent (`50%` is 50) or degree sign (`90°`, `90^\circ`).
Everything else goes whole to latex2sympy and math-verify (the reader open-r1 and TRL's accuracy
reward use) in a worker process under a deadline (`math_reader`): powers (`2^{10}`, `2^10`, `2**10`,
`10^{-2}`), products (`3 \times 10^{4}`, `3·10^4`, `3 x 10^4`), roots, pi, and symbolic math
(`x^2+1`, intervals, sets). Refused, never guessed: what does not parse as a whole (`2^`, `12 34`,
`1e5e5`), chained powers (`2^2^3`: which way?), nested powers and factorials of large or computed
numbers (`10^{10^{10}}`, `9^9^9^9`, `(5!)!`), big operators (`\sum`, `\int`), values that are not
finite as a float (`10^{400}`), anything longer than MAX_MATH_CHARS, and whatever the worker cannot
read within its deadline.

numeric_match scores 1.0 when the answer equals the reference (numbers within a tolerance; other
math by math-verify's symbolic equivalence), `partial_credit` when an answer was read but is wrong
(ReFT gives 0.1 to keep the reward dense), and 0.0 when the output holds no readable answer (a
score, not an error). A reference that holds no readable number or math is an error result.

>>> extract_answer("She makes 9 * 2 = 18 dollars.\n#### 18")
'18'
>>> extract_answer("<answer>42</answer> I checked it: 6 * 7 = 42, and 41 + 1 too.")
'42'
>>> extract_answer(r"So $x = \boxed{\frac{1}{2}}$.")
'\\frac{1}{2}'
>>> parse_number("$1,234.50"), parse_number("1/2"), parse_number(r"1{,}000"), parse_number(r"\dfrac{3}{4}")
(1234.5, 0.5, 1000.0, 0.75)
>>> parse_number("1e5"), parse_number("2^{10}"), parse_number("1e5e5")
(100000.0, 1024.0, None)
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from rft_core.graders.base import Grader, GraderError, field_problems, spec_label
from rft_core.graders.math_reader import Reading, math_equal, read_math
from rft_core.graders.templates import render, template_problems

# Longer math is refused before sympy sees it: a final answer is short, and sympy's cost grows
# with the input.
MAX_MATH_CHARS = 200
# No final answer is longer than this (a plain number with its spellings included).
MAX_ANSWER_CHARS = 1000

# ----------------------------------------------------------------------------- spellings

_MATH_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# U+2212 minus, and the spaces typesetters put between digit groups.
_UNICODE = str.maketrans({"\u2212": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2007": " "})
_THIN_SPACE_RE = re.compile(r"(?<=\d)(?:\\[,!;: ]|~)(?=\d{3}(?!\d))")  # 1\,000
_TEXT_COMMANDS = ("text", "textrm", "textnormal", "textit", "textbf", "mathrm", "mathit", "mbox")
# `\text{ cm}` after a number is its unit (`\text{m}^2` too); `\text{18}` is the number itself.
_UNIT_TEXT_RE = re.compile(
    rf"\\(?:{'|'.join(_TEXT_COMMANDS)})\s*\{{[^{{}}\d]*[^\W\d_][^{{}}\d]*\}}(?:\s*\^\s*\{{?\s*[23]\s*\}}?)?"
)
_TEXT_NUMBER_RE = re.compile(rf"\\(?:{'|'.join(_TEXT_COMMANDS)})\s*\{{([-+\d.,\s]*)\}}")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z])")
# A LaTeX fraction of two plain numbers: \frac{1}{2}, \dfrac{3}{4}, \tfrac{-1}{2}, \frac34.
_FRAC_RE = re.compile(
    r"\\[dt]?frac\s*(?:\{\s*(?P<a>-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(?P<b>\d+(?:\.\d+)?)\s*\}|(?P<a1>\d)(?P<b1>\d))"
)
_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+|\d+)(?:\.\d+)?|\.\d+"
# The whole of a plain number (after currency, percent and degree signs are gone).
_PLAIN_RE = re.compile(
    rf"(?P<sign>[-+]?)\s*(?:"
    rf"(?P<whole>\d+) +(?P<num>\d+) */ *(?P<den>\d+)"  # a mixed number: 1 1/2
    rf"|(?P<a>{_DECIMAL}) */ *(?P<b>{_DECIMAL})"  # a fraction: 3/4
    rf"|(?P<dec>{_DECIMAL})(?:[eE](?P<exp>[-+]?\d+))?"  # 1,234.5 and 1.5e-3
    rf")"
)
_CURRENCY_RE = re.compile(r"(?P<sign>[-+]?)\s*[$€£¥]\s*(?P<rest>.*)", re.DOTALL)

_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_WORD_RE = re.compile(r"[^\W\d_]{2,}")
_LATEX_MARKUP_RE = re.compile(r"[\\^{]")

# Rewrites that spell an answer for latex2sympy.
_SCIENTIFIC_RE = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([-+]?\d+)(?![\w.])")
_TIMES_X_RE = re.compile(r"(?<=[\d})])\s*[xX]\s*(?=\d)")  # 3 x 10^4, 3x4
_UNBRACED_POWER_RE = re.compile(r"\^\s*([-+]?\d+(?:\.\d+)?)")  # 2^10 -> 2^{10}
_GROUPED_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])|(?<![\d.])\d{1,3}(?: \d{3})+(?![\d.]| \d)")
# What is refused as unreadable: an `e` glued to a number that is not scientific notation
# (`1e5e5`, `2e`), and numbers side by side (`12 34`: one number or two?).
_BAD_SCIENTIFIC_RE = re.compile(r"\d[eE](?![A-Za-z])")
_SPACED_DIGITS_RE = re.compile(r"\d\s+\d")
_BIG_OPERATOR_RE = re.compile(r"\\(?:sum|prod|int|iint|iiint|oint|lim|limsup|liminf|coprod)(?![A-Za-z])")
_FACTORIAL_OK_RE = re.compile(r"(?<![\w.])(?:\d{1,3}|[A-Za-z])\s*!(?!\s*!)")  # 5!, n!; not 5!!, (5!)!


def _strip_math(text: str) -> str:
    """`text` without surrounding whitespace, a final period, and `$...$`, `\\(...\\)` wrappers."""
    s = text.strip().removesuffix(".").strip()
    for left, right in _MATH_WRAPPERS:
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : -len(right)].strip().removesuffix(".").strip()
    return s


def _normalize(text: str) -> str:
    """One answer with the spellings that do not change its value made plain: math wrappers,
    a final period, U+2212, `{,}`/`\\,` thousands, `\\%`, `\\$`, units in `\\text{}`, degree
    signs and a trailing percent sign."""
    s = _strip_math(str(text)).translate(_UNICODE).replace("{,}", ",")
    s = _THIN_SPACE_RE.sub("", s).replace("\\%", "%").replace("\\$", "$")
    s = _TEXT_NUMBER_RE.sub(r"\1", _UNIT_TEXT_RE.sub(" ", s))
    s = _strip_math(_DEGREE_RE.sub("", s))
    return s.removesuffix("%").rstrip() if s.endswith("%") else s


def _plain_reading(s: str) -> Reading | None:
    """The reading of a plain number (the grammar above, whole), or None when `s` is not one."""
    s = _FRAC_RE.sub(lambda m: f" {m['a'] or m['a1']}/{m['b'] or m['b1']}", s).strip()
    currency = _CURRENCY_RE.fullmatch(s)
    if currency:
        s = currency["sign"] + currency["rest"].strip()
    elif s[-1:] in "$€£¥":
        s = s[:-1].rstrip()
    match = _PLAIN_RE.fullmatch(s)
    if match is None:
        return None
    try:
        if match["whole"] is not None:
            value = int(match["whole"]) + Fraction(int(match["num"]), int(match["den"]))
        elif match["a"] is not None:
            value = Fraction(_digits(match["a"])) / Fraction(_digits(match["b"]))
        else:
            value = float(_digits(match["dec"]) + (f"e{match['exp']}" if match["exp"] else ""))
        number = float(value)
    except ZeroDivisionError:
        return Reading("infinite")
    except (ValueError, OverflowError):  # more digits than Python converts: no plain number
        return Reading("infinite")
    number = -number if match["sign"] == "-" else number
    return Reading("number", number) if math.isfinite(number) else Reading("infinite")


def _digits(text: str) -> str:
    return text.replace(",", "").replace(" ", "")


def _is_math(s: str) -> bool:
    """Math rather than prose: no word of two letters or more outside LaTeX commands."""
    return bool(s) and not _WORD_RE.search(_COMMAND_RE.sub(" ", s)) and bool(re.search(r"[\w\\]", s))


def _has_math(s: str) -> bool:
    """A digit or LaTeX markup: `x` alone or `a+b` is no number for numeric_match."""
    return bool(re.search(r"\d", s) or _LATEX_MARKUP_RE.search(s) or "π" in s)


def _latex_spelling(s: str) -> str | None:
    """`s` (normalized) spelled for latex2sympy, or None when it cannot be one expression."""
    s = s.replace("**", "^")
    for char, command in (("×", "\\times"), ("·", "\\cdot"), ("⋅", "\\cdot"), ("÷", "\\div"), ("π", "\\pi")):
        s = s.replace(char, f" {command} ")
    s = _TIMES_X_RE.sub(r" \\times ", s)
    # latex2sympy reads `1e5` as 1 * e * 5 (Euler's e): scientific notation is spelled out first.
    s = _SCIENTIFIC_RE.sub(lambda m: f"{m[1]} \\times 10^{{{m[2]}}}", s)
    s = _UNBRACED_POWER_RE.sub(lambda m: f"^{{{m[1]}}}", s)
    s = _GROUPED_RE.sub(lambda m: _digits(m[0]), s)
    if _BAD_SCIENTIFIC_RE.search(s) or _SPACED_DIGITS_RE.search(s):
        return None
    return s.strip()


def _closing_brace(text: str, start: int, limit: int | None = None) -> int | None:
    """The index of the `}` closing the brace opened just before `start` (escapes skipped),
    looked for in the next `limit` characters (all when None)."""
    depth = 1
    i = start
    stop = len(text) if limit is None else min(len(text), start + limit)
    while i < stop:
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


def _intractable(s: str) -> str | None:
    """Why sympy must not be asked to evaluate `s` (None when it may): too long, big operators,
    factorials of large or computed numbers, nested or chained powers, huge exponents."""
    if len(s) > MAX_MATH_CHARS:
        return f"longer than {MAX_MATH_CHARS} characters"
    if _BIG_OPERATOR_RE.search(s):
        return "a sum, product, integral or limit"
    if s.replace("\\!", "").count("!") != len(_FACTORIAL_OK_RE.findall(s.replace("\\!", ""))):
        return "a factorial of a large or computed number"
    position = s.find("^")
    while position != -1:
        start = position + 1
        while start < len(s) and s[start] == " ":
            start += 1
        if s[start : start + 1] == "{":
            end = _closing_brace(s, start + 1)
            if end is None:
                return "an unclosed exponent"
            exponent, after = s[start + 1 : end], end + 1
        else:
            exponent, after = s[start : start + 1], start + 1
        if "^" in exponent or "!" in exponent:
            return "a power with a power or factorial in its exponent"
        if s[after:].lstrip().startswith("^"):
            return "a chained power (a^b^c): write a^{b^c} or (a^b)^c"
        if re.search(r"\d{5,}", exponent):
            return "an exponent of five digits or more"
        position = s.find("^", after)
    return None


def read_answer(text: str) -> Reading:
    """What one extracted answer is, read whole: a number with its value, other math, or not
    readable (`unreadable`, `infinite`, `refused`: no answer, never a guess).

    >>> read_answer("1,234.5"), read_answer("2**10").value, read_answer("12 34").kind
    (Reading(kind='number', value=1234.5, reason=''), 1024.0, 'unreadable')
    """
    if len(text) > MAX_ANSWER_CHARS:  # refused before the cache, which keeps short texts only
        return Reading("refused", reason=f"longer than {MAX_ANSWER_CHARS} characters")
    return _read_answer(text)


@functools.lru_cache(maxsize=8192)
def _read_answer(text: str) -> Reading:
    s = _normalize(text)
    plain = _plain_reading(s)
    if plain is not None:
        return plain
    if not (_has_math(s) and _is_math(s)):
        return Reading("unreadable", reason="not a number")
    latex = _latex_spelling(s)
    if latex is None:
        return Reading("unreadable", reason="not one number or expression")
    problem = _intractable(latex)
    if problem:
        return Reading("refused", reason=problem)
    return read_math(latex)


def parse_number(text: str | None) -> float | None:
    """The value of one written number, read whole ('1,234', '$5', '-3.0', '1/2', '1e5',
    '\\frac{1}{2}', '2^{10}', '\\pi'), or None (`x`, `(1, 2)`, `12 34`, `10^{400}`).

    A trailing percent sign is dropped ('50%' is 50), as math datasets write percentages.
    """
    if text is None:
        return None
    reading = read_answer(str(text))
    return reading.value if reading.kind == "number" else None


def _math_text(reading: Reading, text: str) -> str | None:
    """The LaTeX math-verify compares for a readable answer, None for an unreadable one."""
    if reading.kind == "number":
        return _latex_spelling(repr(reading.value))
    if reading.kind == "math":
        return _latex_spelling(_normalize(text))
    return None


def equivalent(answer: str, reference: str) -> bool:
    """Whether two extracted answers are the same math, by math-verify (symbolic, numeric within
    its rounding, sets, intervals, equations); False when either cannot be read.

    >>> equivalent("1 + x^2", "x^2+1"), equivalent(r"\\frac{1}{\\sqrt{2}}", r"\\frac{\\sqrt{2}}{2}")
    (True, True)
    """
    pred = _math_text(read_answer(answer), answer)
    gold = _math_text(read_answer(reference), reference)
    if pred is None or gold is None:
        return False
    return math_equal(gold, pred)


# ----------------------------------------------------------------------------- extraction

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MARKER_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer[ \t]*(?:is|:|=)[ \t]*([^\n]*)", re.IGNORECASE)
_LEADING_MATH_RE = re.compile(r"\s*(?:\$\$?([^$\n]+?)\$\$?|\\\((.+?)\\\))")
# Where a math span may start: a number, with its sign and currency, or a LaTeX number.
_SPAN_START_RE = re.compile(
    r"[-+\u2212]? ?(?:\\?[$€£¥] ?)?(?:\d|\.\d|\\[dt]?frac(?![A-Za-z])|\\sqrt(?![A-Za-z])|\\pi(?![A-Za-z])|π)"
)
_COMMAND_AT_RE = re.compile(r"\\(?:[A-Za-z]+|.)", re.DOTALL)
_OPEN_BRACE_RE = re.compile(r"[ \t]*\{")
_MAX_TEXT_COMMAND_CHARS = 200  # a unit in `\text{...}` is short; a longer one is prose
# Characters a math span may hold besides digits, letters (see _span_end) and spaces.
_SPAN_SYMBOLS = frozenset("+-\u2212*/^_=<>()[]{}.,:;!?%$€£¥°×·⋅÷√π|~")
_OPERATORS = frozenset("+-\u2212*/^=(<>×·⋅÷[{")
_SENTENCE_ENDS = frozenset(".,;:!?")


def _previous_visible(text: str, i: int) -> str:
    while i > 0 and text[i - 1] in " \t":
        i -= 1
    return text[i - 1] if i > 0 else ""


def _next_visible(text: str, i: int) -> str:
    while i < len(text) and text[i] in " \t":
        i += 1
    return text[i] if i < len(text) else ""


def _span_end(text: str, start: int) -> int:
    """Where the math span starting at `start` ends: before prose (a word of two letters or
    more; a one-letter word like `a` in `5 a day`, though a letter glued to math such as `2x`
    or after an operator such as `+ x` is math, and `x` between numbers is a times sign), a
    `\\text{...}` holding letters, a sentence end (`.`, `,`, `;`, `:`, `!`, `?` then a space or
    the end), a line end, a bracket after a space (a remark: `18 (9 * 2)`), or a closing bracket
    it did not open. A bracket it opened and did not close is left out with what follows it."""
    openers: list[int] = []
    i = end = start
    n = len(text)
    while i < n:
        char = text[i]
        if char == "\n":
            break
        if char == "\\":
            command = _COMMAND_AT_RE.match(text, i)
            assert command is not None
            name = command.group(0)[1:]
            if name in ("\\", "\n"):
                break
            if name in _TEXT_COMMANDS:
                brace = _OPEN_BRACE_RE.match(text, command.end())
                close = None if brace is None else _closing_brace(text, brace.end(), _MAX_TEXT_COMMAND_CHARS)
                if close is None or re.search(r"[^\W\d_]", text[command.end() : close]):
                    break  # a unit or prose (`18 \text{ cm}`): the number before it is the answer
                i = end = close + 1
                continue
            i = end = command.end()
            continue
        if char.isalpha() and char != "π":
            j = i
            while j < n and text[j].isalpha():
                j += 1
            if j - i >= 2:
                break  # a word: `18 dollars`, `18cm`
            glued = i > 0 and not text[i - 1].isspace()
            before, after = _previous_visible(text, i), _next_visible(text, j)
            times = char in "xX" and before.isdigit() and after.isdigit()
            if not (glued or before in _OPERATORS or times):
                break  # a one-letter word: `5 a day`, `5 m`
            i = end = j
            continue
        if char in "([{":
            if char != "{" and i > start and text[i - 1].isspace() and _previous_visible(text, i) not in _OPERATORS:
                break  # a remark after the answer: `18 (9 * 2)`, `18 [rounded]`
            openers.append(i)
        elif char in ")]}":
            if not openers:
                break
            openers.pop()
        elif char in _SENTENCE_ENDS and not openers and (i + 1 == n or text[i + 1].isspace()):
            break
        elif char == "-" and i > start and text[i - 1].isspace() and i + 1 < n and text[i + 1].isspace() \
                and _next_visible(text, i + 1).isalpha():
            break  # a dash before prose: `18 - she ...`
        elif not (char.isdigit() or char.isspace() or char in _SPAN_SYMBOLS):
            break
        i += 1
        if not char.isspace():
            end = i
    if openers:
        end = min(end, openers[0])
    return end


def _span_answer(span: str) -> str | None:
    """The answer a math span states: right of its last `=` (`48 / 2 = 24` states 24)."""
    answer = span.rsplit("=", 1)[-1].strip()
    return answer or None


def _span_at(text: str, start: int) -> str | None:
    return _span_answer(text[start : _span_end(text, start)])


def _last_span(text: str) -> str | None:
    """The answer of the last math span in prose."""
    last = None
    position = 0
    while (match := _SPAN_START_RE.search(text, position)) is not None:
        end = _span_end(text, match.start())
        if end > match.start():
            last = (match.start(), end)
        position = max(end, match.end())
    return None if last is None else _span_answer(text[last[0] : last[1]])


def _brace_pairs(text: str) -> dict[int, int]:
    """The index of each closed `{` -> that of its `}`, in one pass (escaped braces skipped)."""
    pairs: dict[int, int] = {}
    open_at: list[int] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            open_at.append(i)
        elif char == "}" and open_at:
            pairs[open_at.pop()] = i
        i += 1
    return pairs


def _last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (a truncated last box is skipped)."""
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    pairs = _brace_pairs(text)  # one pass, not one scan per box: `\\boxed{` repeated stays linear
    for match in reversed(boxes):
        end = pairs.get(match.end() - 1)
        if end is not None:
            return text[match.end() : end]
    return None


def _answer_in(content: str) -> str | None:
    """The answer a tag or box holds: all of it when it is math (right of its last `=`),
    else what the extraction rules find in it."""
    boxed = _last_boxed(content)
    if boxed is not None and boxed.strip():  # a box in a tag (or a box): its content
        return _answer_in(boxed)
    content = _strip_math(content)
    if _is_math(content):
        return _span_answer(_strip_math(content))
    return extract_answer(content)


def _lead_answer(rest: str) -> str | None:
    """The answer that opens `rest` (after `####` or "the answer is"): a leading `$...$` or
    `\\(...\\)` as a whole, else the first math span."""
    match = _LEADING_MATH_RE.match(rest)
    if match:
        span = match.group(1) or match.group(2)
        if _has_math(span):
            return _answer_in(span)
    stripped = rest.lstrip()
    if stripped[:1] in ("(", "["):  # an interval or a tuple: `#### (1, 2)`
        return _span_at(stripped, 0)
    start = _SPAN_START_RE.search(rest)
    return None if start is None else _span_at(rest, start.start())


def extract_answer(text: str | None) -> str | None:
    """The final answer written in `text`, as a string, or None when there is none.

    Order of preference: the last `<answer>` tag; the last `\\boxed{}`; the span after the
    last `####`; after the last "the answer is"; the whole text when it is one line of math;
    else the last math span anywhere.
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
    # A truncated `\boxed{1` is not an expression; its last span is the best reading.
    if "\n" not in whole and _has_math(whole) and _is_math(whole) and not _BOX_RE.search(whole):
        return _span_answer(whole)
    return _last_span(text)


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
_READABLE = ("number", "math")


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
    >>> numeric_score("I do not know", "18", partial_credit=0.1), numeric_score("#### 2^", "2", partial_credit=0.1)
    (0.0, 0.0)
    >>> numeric_score(r"The roots give $\boxed{\frac{\sqrt{2}}{2}}$", r"\frac{1}{\sqrt{2}}")
    1.0
    """
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        gold: str | None = None if math.isnan(reference) else repr(float(reference))
    else:
        gold = extract_answer(str(reference))
    expected = read_answer(gold) if gold is not None else None
    if expected is None or expected.kind not in _READABLE:
        why = f" ({gold!r:.60}: {expected.reason or expected.kind})" if expected is not None else ""
        raise GraderError(f"the reference {str(reference)[:80]!r} holds no number{why}")
    answer = extract_answer(output)
    if answer is None:
        return 0.0
    got = read_answer(answer)
    if got.kind not in _READABLE:  # unreadable, refused or infinite: no answer, no partial credit
        return 0.0
    if got.kind == "number" and expected.kind == "number":
        assert got.value is not None and expected.value is not None
        correct = numbers_match(got.value, expected.value, rel_tol=rel_tol, abs_tol=abs_tol)
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
