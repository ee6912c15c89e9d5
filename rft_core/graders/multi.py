"""The `multi` grader: named sub-graders combined by a `calculate_output` formula.

The formula is parsed here by a small recursive-descent parser (never `eval`) into a tree
that is evaluated once per sample. Grammar, loosest binding first:

    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '/') unary)*
    unary  := ('-' | '+') unary | power
    power  := atom (('^' | '**') unary)?          # right-associative: 2^3^2 = 2^9; -2^2 = -4
    atom   := number | name | name '(' expr (',' expr)* ')' | '(' expr ')'

Functions: `min`, `max` (one or more arguments), `abs`, `floor`, `ceil`, `exp`, `sqrt`, `log`
(natural; one argument). A formula is at most MAX_FORMULA_CHARS long and its tree at most
MAX_FORMULA_DEPTH deep (each operator, parenthesis and call adds a level); both are checked before
the parser goes deeper, so a formula nested thousands deep is a spec error, not a RecursionError. Names are the keys of `graders` (or the `name` of the one grader object
OpenAI's SDK writes there, see `sub_grader_specs`). Unknown names, unknown functions,
wrong arities and syntax errors are spec errors; division by zero, `sqrt`/`log` out of domain
and a result outside [0, 1] are error results. A sub-grader's error makes the multi result an
error that lists which sub-graders failed; `sub_rewards` holds every sub-grader's reward.

>>> formula = parse_formula("0.5 * a + 0.5 * max(b, 0.2)")
>>> evaluate(formula, {"a": 1.0, "b": 0.0})
0.6
>>> sorted(names_in(parse_formula("min(a, b) ^ 2")))
['a', 'b']
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rft_core.graders.base import (
    Grader,
    GraderError,
    GradeResult,
    GraderSpecError,
    Sample,
    check_reward,
    field_problems,
    make_context,
    spec_label,
)


class FormulaError(GraderSpecError):
    """A formula that does not parse (or names what it cannot use)."""

    openai_error = "formula_parse_error"  # the key OpenAI's graders API reports it under


# A real formula weighs a few sub-graders; these bound what parsing and evaluating may cost.
MAX_FORMULA_CHARS = 10_000
MAX_FORMULA_DEPTH = 64


def _shown(text: str) -> str:
    """A formula as messages quote it: whole when short, else its start and its length."""
    return repr(text) if len(text) <= 60 else f"{text[:60]!r}... ({len(text)} characters)"


# ----------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Name:
    name: str


@dataclass(frozen=True)
class Unary:
    op: str
    operand: Node


@dataclass(frozen=True)
class Binary:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Call:
    function: str
    args: tuple[Node, ...]


Node = Num | Name | Unary | Binary | Call


def _checked_sqrt(x: float) -> float:
    if x < 0:
        raise ArithmeticError(f"sqrt of negative number {x}")
    return math.sqrt(x)


def _checked_log(x: float) -> float:
    if x <= 0:
        raise ArithmeticError(f"log of non-positive number {x}")
    return math.log(x)


# name -> (function, min arity, max arity or None for any)
FUNCTIONS: dict[str, tuple[Callable[..., float], int, int | None]] = {
    "min": (min, 1, None),
    "max": (max, 1, None),
    "abs": (abs, 1, 1),
    "floor": (lambda x: float(math.floor(x)), 1, 1),
    "ceil": (lambda x: float(math.ceil(x)), 1, 1),
    "exp": (math.exp, 1, 1),
    "sqrt": (_checked_sqrt, 1, 1),
    "log": (_checked_log, 1, 1),
}

# ----------------------------------------------------------------------------- tokenizer + parser

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>\*\*|[-+*/^(),]))"
)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN_RE.match(text, position)
        if not match:
            rest = text[position:]
            raise FormulaError(f"formula {_shown(text)}: unexpected character {rest.lstrip()[:1]!r} "
                               f"at position {position + len(rest) - len(rest.lstrip())}")
        kind = match.lastgroup or "op"
        tokens.append((kind, match.group(kind), match.start(kind)))
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent that returns each node with its depth, and refuses to go deeper than
    MAX_FORMULA_DEPTH before it recurses (`level` counts the open recursions)."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0
        self.level = 0

    def error(self, message: str) -> FormulaError:
        if self.index < len(self.tokens):
            where = f"at position {self.tokens[self.index][2]} ({self.tokens[self.index][1]!r})"
        else:
            where = "at the end"
        return FormulaError(f"formula {_shown(self.text)}: {message} {where}")

    def too_deep(self) -> FormulaError:
        return self.error(f"nested deeper than the limit of {MAX_FORMULA_DEPTH} levels (each operator, "
                          "parenthesis and function call adds one)")

    def node(self, node: Node, depth: int) -> tuple[Node, int]:
        if depth > MAX_FORMULA_DEPTH:
            raise self.too_deep()
        return node, depth

    def descend(self) -> None:
        self.level += 1
        if self.level > MAX_FORMULA_DEPTH:
            raise self.too_deep()

    def peek(self) -> str | None:
        return self.tokens[self.index][1] if self.index < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def expect(self, value: str) -> None:
        if self.peek() != value:
            raise self.error(f"expected {value!r}")
        self.index += 1

    def parse(self) -> Node:
        if not self.tokens:
            raise FormulaError(f"formula {_shown(self.text)} is empty")
        node, _ = self.expr()
        if self.index != len(self.tokens):
            raise self.error("unexpected token")
        return node

    def expr(self) -> tuple[Node, int]:
        node, depth = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            right, right_depth = self.term()
            node, depth = self.node(Binary(op, node, right), max(depth, right_depth) + 1)
        return node, depth

    def term(self) -> tuple[Node, int]:
        node, depth = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()[1]
            right, right_depth = self.unary()
            node, depth = self.node(Binary(op, node, right), max(depth, right_depth) + 1)
        return node, depth

    def unary(self) -> tuple[Node, int]:
        if self.peek() in ("-", "+"):
            op = self.take()[1]
            self.descend()
            operand, depth = self.unary()
            self.level -= 1
            return self.node(Unary(op, operand), depth + 1)
        return self.power()

    def power(self) -> tuple[Node, int]:
        base, depth = self.atom()
        if self.peek() in ("^", "**"):
            self.take()
            self.descend()
            exponent, exponent_depth = self.unary()
            self.level -= 1
            return self.node(Binary("^", base, exponent), max(depth, exponent_depth) + 1)
        return base, depth

    def atom(self) -> tuple[Node, int]:
        if self.index >= len(self.tokens):
            raise self.error("expected a number, a name or '('")
        kind, value, _ = self.tokens[self.index]
        if kind == "number":
            self.index += 1
            return Num(float(value)), 1
        if kind == "name":
            self.index += 1
            if self.peek() == "(":
                return self.call(value)
            return Name(value), 1
        if value == "(":
            self.index += 1
            self.descend()
            node, depth = self.expr()
            self.level -= 1
            self.expect(")")
            return self.node(node, depth + 1)
        raise self.error("expected a number, a name or '('")

    def call(self, function: str) -> tuple[Node, int]:
        if function not in FUNCTIONS:
            self.index -= 1
            raise self.error(f"unknown function {function!r} (known: {', '.join(FUNCTIONS)})")
        self.expect("(")
        self.descend()
        arg, depth = self.expr()
        args = [arg]
        while self.peek() == ",":
            self.take()
            arg, arg_depth = self.expr()
            args.append(arg)
            depth = max(depth, arg_depth)
        self.level -= 1
        self.expect(")")
        _, low, high = FUNCTIONS[function]
        if len(args) < low or (high is not None and len(args) > high):
            wanted = f"{low}" if high == low else f"at least {low}"
            raise FormulaError(f"formula {_shown(self.text)}: {function}() takes {wanted} argument(s), got {len(args)}")
        return self.node(Call(function, tuple(args)), depth + 1)


def parse_formula(text: str) -> Node:
    """The tree of a `calculate_output` formula; FormulaError (a GraderSpecError) if it does not parse.

    >>> parse_formula("-a^2")
    Unary(op='-', operand=Binary(op='^', left=Name(name='a'), right=Num(value=2.0)))
    """
    if not isinstance(text, str):
        raise FormulaError(f"calculate_output should be a formula string, got {type(text).__name__}")
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(f"formula {_shown(text)} is longer than the limit of {MAX_FORMULA_CHARS} characters")
    return _Parser(text).parse()


def names_in(node: Node) -> set[str]:
    """The sub-grader names a formula uses."""
    if isinstance(node, Name):
        return {node.name}
    if isinstance(node, Unary):
        return names_in(node.operand)
    if isinstance(node, Binary):
        return names_in(node.left) | names_in(node.right)
    if isinstance(node, Call):
        return set().union(*(names_in(arg) for arg in node.args))
    return set()


def evaluate(node: Node, values: Mapping[str, float]) -> float:
    """The formula's value; ArithmeticError/ValueError/OverflowError on a domain or range error."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Name):
        return float(values[node.name])
    if isinstance(node, Unary):
        operand = evaluate(node.operand, values)
        return -operand if node.op == "-" else operand
    if isinstance(node, Binary):
        left, right = evaluate(node.left, values), evaluate(node.right, values)
        if node.op == "+":
            return left + right
        if node.op == "-":
            return left - right
        if node.op == "*":
            return left * right
        if node.op == "/":
            if right == 0:
                raise ZeroDivisionError("division by zero")
            return left / right
        result = left**right
        if isinstance(result, complex):
            raise ArithmeticError(f"{left} ^ {right} is not a real number")
        return float(result)
    if isinstance(node, Call):
        function = FUNCTIONS[node.function][0]
        return float(function(*(evaluate(arg, values) for arg in node.args)))
    raise TypeError(f"not a formula node: {node!r}")


# ----------------------------------------------------------------------------- the grader


def sub_grader_specs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The sub-grader specs of a multi spec by the name the formula uses; empty when there are none.

    OpenAI documents `graders` as a map of named sub-graders, but its own SDK type
    (`openai.types.graders.MultiGrader`) holds one grader object there, named by its own
    `name`; both are accepted. An object with a string `type` is a grader, not a map.

    >>> sub_grader_specs({"graders": {"a": {"type": "rank"}}})
    {'a': {'type': 'rank'}}
    >>> sub_grader_specs({"graders": {"type": "rank", "name": "ranked"}})
    {'ranked': {'type': 'rank', 'name': 'ranked'}}
    """
    graders = spec.get("graders")
    if not isinstance(graders, Mapping):
        return {}
    if isinstance(graders.get("type"), str):
        name = graders.get("name")
        return {name: graders} if isinstance(name, str) and name else {}
    return dict(graders)


def _names(names: Any, most: int = 10) -> str:
    """Names as a message lists them: at most `most`, each at most 40 characters."""
    names = list(names)
    listed = ", ".join(name if len(name) <= 40 else name[:40] + "..." for name in names[:most])
    return listed + (f" and {len(names) - most} more" if len(names) > most else "")


def check_spec(spec: Mapping[str, Any]) -> list[str]:
    """Problems of the multi spec itself (sub-grader specs are checked by validate_grader_spec)."""
    problems = field_problems(spec, {"graders": dict, "calculate_output": str}, {})
    label = spec_label(spec)
    graders = spec.get("graders")
    named = sub_grader_specs(spec)
    unnamed_object = isinstance(graders, dict) and isinstance(graders.get("type"), str) and not named
    if unnamed_object:
        problems.append(f"{label}: graders is one {graders['type']} grader without a 'name' for "
                        f"calculate_output to use")
    elif isinstance(graders, dict) and not graders:
        problems.append(f"{label}: graders must name at least one sub-grader")
    if isinstance(spec.get("calculate_output"), str):
        try:
            formula = parse_formula(spec["calculate_output"])
        except FormulaError as exc:
            problems.append(f"{label}: {exc}")
        else:
            if isinstance(graders, dict) and not unnamed_object:
                unknown = sorted(names_in(formula) - set(named))
                if unknown:
                    problems.append(
                        f"{label}: calculate_output uses unknown sub-grader(s) {_names(unknown)} "
                        f"(graders: {_names(map(str, named)) or 'none'})"
                    )
    return problems


class MultiGrader(Grader):
    """OpenAI's multi grader: `graders` (name -> spec, or one grader object with a `name`, as OpenAI's
    SDK writes it) and `calculate_output` (formula over the names).

    >>> from rft_core.graders import build_grader
    >>> spec = {"type": "multi", "name": "mix", "calculate_output": "0.8 * exact + 0.2 * near",
    ...         "graders": {
    ...             "exact": {"type": "string_check", "operation": "eq",
    ...                       "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}"},
    ...             "near": {"type": "string_check", "operation": "ilike",
    ...                      "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}"}}}
    >>> result = build_grader(spec).grade("PARIS", {"answer": "Paris"})
    >>> result.reward, result.sub_rewards
    (0.2, {'exact': 0.0, 'near': 1.0})
    """

    type = "multi"

    def __init__(self, spec: Mapping[str, Any], graders: Mapping[str, Grader]):
        super().__init__(spec)
        self.graders = dict(graders)
        self.formula = parse_formula(spec["calculate_output"])
        unknown = names_in(self.formula) - set(self.graders)
        if unknown:
            raise GraderSpecError(f"multi {self.name!r}: calculate_output uses unknown sub-grader(s) {sorted(unknown)}")
        self.concurrent = any(g.concurrent for g in self.graders.values())

    def combine(self, context: dict[str, Any]) -> GradeResult:
        """Grade with every sub-grader, then apply the formula to their rewards."""
        sub_rewards: dict[str, float | None] = {}
        errors: list[str] = []
        for name, grader in self.graders.items():
            result = grader.grade(context["sample"], context["item"])
            sub_rewards[name] = result.reward
            errors += [f"{self.name}.{error}" for error in result.errors]
        failed = [name for name, reward in sub_rewards.items() if reward is None]
        if failed:
            return GradeResult.failure(
                f"{self.name}: sub-grader(s) failed: {', '.join(failed)}", *errors, sub_rewards=sub_rewards
            )
        try:
            reward = check_reward(evaluate(self.formula, sub_rewards))  # type: ignore[arg-type]
        except (ArithmeticError, ValueError) as exc:
            return GradeResult.failure(f"{self.name}: calculate_output: {exc}", sub_rewards=sub_rewards)
        except GraderError as exc:
            return GradeResult.failure(f"{self.name}: calculate_output result: {exc}", sub_rewards=sub_rewards)
        return GradeResult(reward, sub_rewards=sub_rewards)

    def score(self, context: dict[str, Any]) -> float:
        result = self.combine(context)
        if result.reward is None:
            raise GraderError("; ".join(result.errors))
        return result.reward

    def grade(self, sample: Sample, item: Mapping[str, Any] | None = None) -> GradeResult:
        try:
            context = make_context(sample, item)
        except GraderError as exc:  # a malformed sample is one error, not one per sub-grader
            return GradeResult.failure(f"{self.name}: {exc}")
        return self.combine(context)

    def close(self) -> None:
        for grader in self.graders.values():
            grader.close()
