"""The `rank` grader (ours): partial credit by where the reference sits in a ranked list.

The output is read as a ranked list, trying in turn: a JSON array (the whole output, or the
last `[...]` block that parses as one), numbered lines (`1. x`, `2) y`, `3: z`; the last run
that starts again at 1 wins, so numbered reasoning steps before the final list are skipped),
bullet lines (`-`, `*`, `+`, `•`; the last run), and a comma-separated list (the last line
with a comma; a `label:` prefix is dropped). Entries are compared case-insensitively after
trimming spaces, quotes, `**`/backtick marks and a trailing period.

The reward is `scores[position]`: by default 1.0, 0.7, 0.5, 0.3, 0.2, 0.1 for positions 1-6,
then 0. No list, or a list without the reference, scores 0 (a score, not an error).

>>> grader = RankGrader({"type": "rank", "name": "rank"})
>>> grader.grade("1. Lyon\\n2. Paris\\n3. Nice", {"reference": "paris"}).reward
0.7
>>> grader.grade('["Paris", "Lyon"]', {"reference": "Paris"}).reward
1.0
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from rft_core.graders.base import Grader, field_problems, shown, spec_label
from rft_core.graders.templates import render, template_problems

DEFAULT_SCORES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)
_NUMBERED_RE = re.compile(r"^\s*(?:#{1,6}\s*)?\(?(\d{1,3})[.):]\s+(.+?)\s*$")
_BULLET_RE = re.compile(r"^\s*[-*+•]\s+(.+?)\s*$")
_ARRAY_RE = re.compile(r"\[[^\[\]]*\]", re.DOTALL)


def check_spec(spec: Mapping[str, Any]) -> list[str]:
    """Problems of a rank spec (empty when it is valid)."""
    problems = field_problems(spec, {}, {"input": str, "reference": str, "scores": list})
    label = spec_label(spec)
    scores = spec.get("scores")
    if isinstance(scores, list):
        if not scores:
            problems.append(f"{label}: scores must not be empty")
        for value in scores:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                problems.append(f"{label}: scores must be numbers in [0, 1], got {shown(value)}")
                break
    for key in ("input", "reference"):
        if isinstance(spec.get(key), str):
            problems += template_problems(spec[key], f"{label}: {key}")
    return problems


def normalize(entry: str) -> str:
    """How entries and the reference are compared.

    >>> normalize('  **"Paris".**  ')
    'paris'
    """
    text = entry.strip()
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("*`_\"'“”‘’").rstrip(".").strip()
    return text.casefold()


def _json_list(text: str) -> list[str] | None:
    candidates = [text.strip()] + [m.group(0) for m in reversed(list(_ARRAY_RE.finditer(text)))]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
    return None


def _numbered_list(lines: list[str]) -> list[str] | None:
    runs: list[list[str]] = []
    last_number = 0
    for line in lines:
        match = _NUMBERED_RE.match(line)
        if not match:
            continue
        number = int(match.group(1))
        if not runs or number <= last_number:
            runs.append([])
        runs[-1].append(match.group(2))
        last_number = number
    return runs[-1] if runs else None


def _bullet_list(lines: list[str]) -> list[str] | None:
    runs: list[list[str]] = []
    in_run = False
    for line in lines:
        match = _BULLET_RE.match(line)
        if match:
            if not in_run:
                runs.append([])
            runs[-1].append(match.group(1))
            in_run = True
        elif line.strip():
            in_run = False
    return runs[-1] if runs else None


def _comma_list(lines: list[str]) -> list[str] | None:
    for line in reversed(lines):
        if "," in line:
            body = line.split(":", 1)[1] if ":" in line else line
            entries = [entry for entry in body.split(",") if entry.strip()]
            return entries or None
    return None


def ranked_list(text: str) -> list[str]:
    """The ranked list written in `text`, normalised (see `normalize`); [] when there is none.

    >>> ranked_list("Thinking...\\n1. weigh\\n2. compare\\nFinal:\\n1. Rome\\n2. Oslo")
    ['rome', 'oslo']
    >>> ranked_list("Ranking: Rome, Oslo , Bern.")
    ['rome', 'oslo', 'bern']
    """
    lines = text.splitlines()
    for parse in (_json_list, _numbered_list, _bullet_list, _comma_list):
        entries = parse(text) if parse is _json_list else parse(lines)
        if entries:
            return [normalize(entry) for entry in entries]
    return []


def rank_score(text: str, reference: str, scores: tuple[float, ...] | list[float] = DEFAULT_SCORES) -> float:
    """`scores[i]` where i is the reference's position in the list found in `text`, else 0.

    >>> rank_score("- Oslo\\n- Rome\\n- Bern", "Bern")
    0.5
    """
    wanted = normalize(reference)
    entries = ranked_list(text)
    if wanted not in entries:
        return 0.0
    position = entries.index(wanted)
    return float(scores[position]) if position < len(scores) else 0.0


class RankGrader(Grader):
    """Ours: `input` (default `{{ sample.output_text }}`), `reference` (default `{{ item.reference }}`),
    `scores` (reward by position, default 1.0, 0.7, 0.5, 0.3, 0.2, 0.1, then 0)."""

    type = "rank"

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__(spec)
        self.input = spec.get("input") or "{{ sample.output_text }}"
        self.reference = spec.get("reference") or "{{ item.reference }}"
        self.scores = tuple(float(s) for s in spec.get("scores") or DEFAULT_SCORES)

    def score(self, context: dict[str, Any]) -> float:
        return rank_score(render(self.input, context), render(self.reference, context), self.scores)
