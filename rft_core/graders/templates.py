"""OpenAI grader templates: `{{ item.path.to.field }}`, `{{ sample.output_text }}`, `{{ sample.output_json.x }}`.

A placeholder names a namespace (`item` or `sample`) and a path of keys and list indices
(`item.choices.0.text` or `item.choices[0].text`); whitespace inside the braces is optional.
Strings are inserted as they are, other values as JSON. A path that does not resolve fails
the grading of that sample with an error naming the field.

>>> ctx = {"sample": {"output_text": "18", "output_json": 18}, "item": {"ref": {"n": 18}}}
>>> render("{{sample.output_text}} vs {{ item.ref.n }}", ctx)
'18 vs 18'
>>> render("{{ item.ref }}", ctx)
'{"n": 18}'
"""

from __future__ import annotations

import json
import re
from typing import Any

from rft_core.graders.base import GraderError

# No nested quantifiers: `{{` followed by many spaces and no `}}` stays linear (the lazy
# `\{\{\s*(.*?)\s*\}\}` took seconds on 2,000 spaces). The path is stripped where it is used.
PLACEHOLDER_RE = re.compile(r"\{\{([^{}\n]*)\}\}")
# A template is a prompt or a field path; longer is a mistake, and each sample renders it again.
MAX_TEMPLATE_CHARS = 100_000
_SEGMENT_RE = re.compile(r"[^.\[\]]+|\[\s*-?\d+\s*\]")
NAMESPACES = ("item", "sample")


class TemplateError(GraderError):
    """A placeholder that does not resolve for this sample and item."""


def placeholders(template: str) -> list[str]:
    """The paths named in a template, in order.

    >>> placeholders("{{ item.a }} and {{sample.output_text}}")
    ['item.a', 'sample.output_text']
    """
    return [path.strip() for path in PLACEHOLDER_RE.findall(template)]


def template_problems(template: Any, where: str) -> list[str]:
    """Spec problems of a template string: not a string, or a placeholder outside item/sample."""
    if not isinstance(template, str):
        return [f"{where}: expected a template string, got {type(template).__name__}"]
    if len(template) > MAX_TEMPLATE_CHARS:
        return [f"{where}: the template is {len(template)} characters long, over the limit of {MAX_TEMPLATE_CHARS}"]
    problems = []
    for path in placeholders(template):
        segments = split_path(path)
        if not segments or segments[0] not in NAMESPACES:
            problems.append(
                f"{where}: placeholder '{{{{ {path[:80]} }}}}' must start with 'item.' or 'sample.'"
            )
    return problems


def split_path(path: str) -> list[str | int]:
    """`item.a[0].b` -> ['item', 'a', 0, 'b']; digit-only segments stay strings (keys or indices)."""
    segments: list[str | int] = []
    for token in _SEGMENT_RE.findall(path):
        if token.startswith("["):
            segments.append(int(token[1:-1]))
        else:
            segments.append(token.strip())
    return segments


def resolve(path: str, context: dict[str, Any]) -> Any:
    """The value at `path` (`item.x.y`, `sample.output_json.z`) in the context; TemplateError if absent."""
    segments = split_path(path)
    if not segments or segments[0] not in NAMESPACES:
        raise TemplateError(f"template field '{path}': the namespace must be 'item' or 'sample'")
    value: Any = context[segments[0]]
    walked = str(segments[0])
    for segment in segments[1:]:
        if walked == "sample.output_json" and value is None:
            raise TemplateError(f"template field '{path}': the sample output is not valid JSON")
        value = _step(value, segment, path, walked)
        walked = f"{walked}[{segment}]" if isinstance(segment, int) else f"{walked}.{segment}"
    if walked == "sample.output_json" and value is None:
        raise TemplateError(f"template field '{path}': the sample output is not valid JSON")
    return value


def _step(value: Any, segment: str | int, path: str, walked: str) -> Any:
    if isinstance(value, dict):
        if segment in value:
            return value[segment]
        if isinstance(segment, int) and str(segment) in value:
            return value[str(segment)]
        keys = ", ".join(map(str, list(value)[:20])) or "none"
        raise TemplateError(f"template field '{path}' not found: {walked} has no '{segment}' (keys: {keys})")
    if isinstance(value, list):
        index = segment if isinstance(segment, int) else int(segment) if str(segment).lstrip("-").isdigit() else None
        if index is None:
            raise TemplateError(f"template field '{path}' not found: {walked} is a list, '{segment}' is not an index")
        try:
            return value[index]
        except IndexError:
            raise TemplateError(
                f"template field '{path}' not found: {walked} has {len(value)} elements, no index {index}"
            ) from None
    raise TemplateError(f"template field '{path}' not found: {walked} is a {type(value).__name__}, not an object")


def to_text(value: Any) -> str:
    """How a resolved value is written into text: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def render(template: str, context: dict[str, Any]) -> str:
    """`template` with every placeholder replaced by its value (TemplateError naming a missing field)."""
    return PLACEHOLDER_RE.sub(lambda match: to_text(resolve(match.group(1).strip(), context)), template)
