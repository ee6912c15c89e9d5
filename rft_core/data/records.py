"""Map one record onto the canonical columns, format by format: openai, gsm8k, reft, csv/parquet.

A builder takes a record (a dict as the file holds it) and gives a `Candidate`: the values of
id, prompt, messages, reference and solution, the extra fields kept for graders, which field of
the file feeds each column, and the structural problems it saw. It judges nothing else: whether
the values are non-empty text is the pandera row schema's job, duplicates are the loader's.

Field rules per format:
- openai: `messages` (last one from the user: its content is the prompt); the reference is the field
  `columns.reference` names if present, else the first of `OPENAI_REFERENCE_FIELDS`; `id` and
  `columns.solution` are used when present. Every key but messages/tools stays for graders.
- gsm8k: `question`; `answer` must end in `#### <number>`: the number is the reference, the text
  before it the solution (None when there is none), calculator annotations `<<48/2=24>>` removed
  when `strip_calculator_annotations`.
- reft: `item_id`, `question`, `answer_value` (reference), `answer_cot` (solution).
- csv / parquet: the columns `DataConfig.columns` names.
Ids given as numbers become text; items without an id get `content_id` of their prompt.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rft_core.config import DataConfig
from rft_core.data.readers import json_type
from rft_core.data.schemas import (
    CANONICAL_COLUMNS,
    IS_EMPTY,
    MUST_BE_TEXT,
    invisible_names,
    is_blank,
    json_native,
)
from rft_core.graders.numeric import parse_number

OPENAI_REFERENCE_FIELDS = ("reference_answer", "answer", "correct_answer", "label", "ground_truth", "reference")

_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>\n]*>>")


@dataclass
class Candidate:
    """A record mapped onto the canonical columns, values not yet judged."""

    values: dict[str, Any]  # id, prompt, messages, reference, solution
    extras: dict[str, Any]
    sources: dict[str, str]  # canonical column -> the field name in the file
    prompt_key: str | None = None  # what "duplicate prompt" compares
    id_given: bool = False
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (column, field, reason)


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)` of a value cut to about `limit` characters: what a reason quotes of a user's value."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[: limit - 3] + "...")
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_id(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return value


def _as_reference(value: Any) -> Any:
    """Numbers are fine references (JSON and Parquet hold them as numbers); text is kept as is."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, decimal.Decimal) and value.is_finite():  # a Parquet decimal column
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return value


def _as_solution(value: Any) -> Any:
    if value is None or (isinstance(value, str) and is_blank(value)):
        return None
    return value.strip() if isinstance(value, str) else value


def _invisible(blank: str) -> str:
    """': only invisible characters (U+200B ZERO WIDTH SPACE)' for a blank text that is not just spaces."""
    return f": only invisible characters ({invisible_names(blank)})" if blank.strip() else ""


def _extras(record: dict[str, Any], sources: dict[str, str], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Original fields for graders; one named like a canonical column it does not feed is kept
    as `original_<name>` so that it neither overwrites nor is overwritten by the canonical value."""
    extras = {}
    for key, value in record.items():
        if key in skip:
            continue
        if key in CANONICAL_COLUMNS:
            if sources.get(key) == key:
                continue
            extras[f"original_{key}"] = value
        else:
            extras[key] = value
    return extras


def _message_text(content: Any) -> str | None:
    """Text of a message's content: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(texts) if texts else None
    return None


# --------------------------------------------------------------------------- one builder per format


def openai_candidate(record: dict[str, Any], cfg: DataConfig) -> Candidate:
    ref_field = cfg.columns.reference if cfg.columns.reference in record else next(
        (name for name in OPENAI_REFERENCE_FIELDS if name in record), None
    )
    sol_field = cfg.columns.solution if cfg.columns.solution and cfg.columns.solution in record else None
    sources = {"id": "id", "prompt": "messages", "messages": "messages",
               "reference": ref_field or "reference", "solution": sol_field or "solution"}
    cand = Candidate(values={}, extras={}, sources=sources)
    messages = record.get("messages")
    prompt = None
    if messages is None:
        cand.problems.append(("prompt", "messages", "missing"))
    elif not isinstance(messages, list):
        cand.problems.append(("prompt", "messages", f"must be an array of messages, got {json_type(messages)}"))
    elif not messages:
        cand.problems.append(("prompt", "messages", "is empty"))
    elif not all(isinstance(m, dict) for m in messages):
        bad = next(i for i, m in enumerate(messages) if not isinstance(m, dict))
        cand.problems.append(("prompt", "messages", f"message {bad} is not an object"))
    elif messages[-1].get("role") != "user":
        cand.problems.append(
            ("prompt", "messages", f"the last message is from {shown(messages[-1].get('role'))}; it must be from the user")
        )
    else:
        prompt = _message_text(messages[-1].get("content"))
        if prompt is None:
            cand.problems.append(("prompt", "messages", "the last user message has no text content"))
        elif is_blank(prompt):
            cand.problems.append(("prompt", "messages", "the last user message is empty" + _invisible(prompt)))
    if ref_field is None:
        looked = [cfg.columns.reference, *[n for n in OPENAI_REFERENCE_FIELDS if n != cfg.columns.reference]]
        cand.problems.append(("reference", "reference", f"no reference field (looked for: {', '.join(looked)})"))
    cand.values = {
        "id": _as_id(record["id"]) if "id" in record else None,
        "prompt": prompt,
        "messages": messages if isinstance(messages, list) else None,
        "reference": _as_reference(record.get(ref_field)) if ref_field else None,
        "solution": _as_solution(record.get(sol_field)) if sol_field else None,
    }
    cand.id_given = "id" in record
    if isinstance(messages, list):
        cand.prompt_key = json.dumps(json_native(messages), sort_keys=True, ensure_ascii=False)
    cand.extras = _extras(record, sources, skip=("messages", "tools"))
    if "tools" in record:
        cand.extras["tools"] = record["tools"]
    return cand


def split_gsm8k_answer(answer: str, strip_annotations: bool = True) -> tuple[str | None, str | None, str | None]:
    """(solution, reference, reason) of a GSM8K answer; reason is None when it is well formed.

    The final answer is what follows the first `####` of the last non-blank line.

    >>> split_gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\\n#### 24")
    ('Natalia sold 48/2 = 24 clips.', '24', None)
    >>> split_gsm8k_answer("#### 7")
    (None, '7', None)
    """
    # Found with str methods, not a regex: a backtracking search for '####' at the end of the text
    # took quadratic time on a long line of '#'s.
    body = answer.rstrip()
    last_line = body.rfind("\n") + 1
    marker = body.find("####", last_line)
    if marker < 0:
        return None, None, "does not end in '#### <number>'"
    value = body[marker + 4 :].strip()
    if not value:
        return None, None, "nothing after '####'; it must end in '#### <number>'"
    if parse_number(value) is None:
        return None, None, f"the final answer after '####' is not a number: {shown(value)}"
    solution = answer[:marker].strip()
    if strip_annotations:
        solution = _CALCULATOR_ANNOTATION.sub("", solution)
    return (None if is_blank(solution) else solution), value, None


def gsm8k_candidate(record: dict[str, Any], cfg: DataConfig) -> Candidate:
    sources = {"id": "id", "prompt": "question", "reference": "answer", "solution": "answer"}
    # GSM8K has no ids; a record that brings an `id` field keeps it as the item's id.
    cand = Candidate(values={}, extras=_extras(record, {"id": "id"}), sources=sources, id_given="id" in record)
    answer = record.get("answer")
    solution = reference = None
    if answer is None:
        cand.problems.append(("reference", "answer", "missing"))
    elif not isinstance(answer, str):
        cand.problems.append(("reference", "answer", f"{MUST_BE_TEXT}, got {json_type(answer)}"))
    elif is_blank(answer):
        cand.problems.append(("reference", "answer", IS_EMPTY + _invisible(answer)))
    else:
        solution, reference, reason = split_gsm8k_answer(answer, cfg.strip_calculator_annotations)
        if reason:
            cand.problems.append(("reference", "answer", reason))
    question = record.get("question")
    cand.values = {"id": _as_id(record.get("id")), "prompt": question, "messages": None,
                   "reference": reference, "solution": solution}
    cand.prompt_key = question if isinstance(question, str) else None
    return cand


def reft_candidate(record: dict[str, Any], cfg: DataConfig) -> Candidate:
    sources = {"id": "item_id", "prompt": "question", "reference": "answer_value", "solution": "answer_cot"}
    cand = Candidate(values={}, extras=_extras(record, {}), sources=sources)
    cand.id_given = "item_id" in record
    question = record.get("question")
    cand.values = {
        "id": _as_id(record.get("item_id")) if cand.id_given else None,
        "prompt": question,
        "messages": None,
        "reference": _as_reference(record.get("answer_value")),
        "solution": _as_solution(record.get("answer_cot")),
    }
    cand.prompt_key = question if isinstance(question, str) else None
    return cand


def columns_candidate(record: dict[str, Any], cfg: DataConfig) -> Candidate:
    cols = cfg.columns
    sources = {"prompt": cols.prompt, "reference": cols.reference}
    if cols.id:
        sources["id"] = cols.id
    if cols.solution:
        sources["solution"] = cols.solution
    cand = Candidate(values={}, extras=_extras(record, sources), sources={"id": "id", "solution": "solution", **sources})
    cand.id_given = cols.id is not None
    prompt = record.get(cols.prompt)
    cand.values = {
        "id": _as_id(record.get(cols.id)) if cols.id else None,
        "prompt": prompt,
        "messages": None,
        "reference": _as_reference(record.get(cols.reference)),
        "solution": _as_solution(record.get(cols.solution)) if cols.solution else None,
    }
    cand.prompt_key = prompt if isinstance(prompt, str) else None
    return cand


CANDIDATE_BUILDERS: dict[str, Callable[[dict[str, Any], DataConfig], Candidate]] = {
    "openai": openai_candidate,
    "gsm8k": gsm8k_candidate,
    "reft": reft_candidate,
    "csv": columns_candidate,
    "parquet": columns_candidate,
}
FORMATS = tuple(CANDIDATE_BUILDERS)


def content_id(prompt_key: str) -> str:
    """The id of an item whose file gives none: a hash of its prompt, stable across reorderings."""
    return hashlib.sha256(prompt_key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
