"""Graders: OpenAI's RFT grader JSON (and YAML) turned into objects that score samples in [0, 1].

Types: `string_check`, `text_similarity`, `python`, `score_model`, `label_model`, `multi`
(OpenAI's), and `numeric_match`, `rank` (ours). `build_grader(spec)` checks the spec and builds
the grader with one explicit if/elif; `validate_grader_spec(spec)` lists a spec's problems
without building anything expensive; `load_grader_spec(path)` reads JSON or YAML.

>>> grader = build_grader({"type": "string_check", "name": "exact", "operation": "eq",
...                        "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}"})
>>> grader.grade("42", {"answer": "42"}).to_dict()
{'reward': 1.0, 'sub_rewards': {}, 'errors': []}
>>> validate_grader_spec({"type": "string_check", "operation": "like", "input": "x"})
["string_check: missing field 'reference'"]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rft_core.graders import model_graders, multi, numeric, python_grader, rank, similarity, string_check
from rft_core.graders.base import Grader, GraderError, GradeResult, GraderSpecError, Sample
from rft_core.graders.batch import grade_batch, summarize

__all__ = [
    "GRADER_TYPES",
    "GradeResult",
    "Grader",
    "GraderError",
    "GraderSpecError",
    "Sample",
    "build_grader",
    "grade_batch",
    "load_grader_spec",
    "summarize",
    "validate_grader_spec",
]

GRADER_TYPES = (
    "string_check", "text_similarity", "python", "score_model", "label_model", "multi", "numeric_match", "rank",
)


def validate_grader_spec(spec: Any) -> list[str]:
    """The problems of a grader spec, one message each; empty when it is valid.

    Checks types, required and unknown fields, operations, metrics, templates, formulas and
    sub-grader names, and parses (never runs) python sources; loads no model.
    """
    if not isinstance(spec, Mapping):
        return [f"a grader spec is a mapping with a 'type', got {type(spec).__name__}"]
    kind = spec.get("type")
    if kind == "string_check":
        return string_check.check_spec(spec)
    elif kind == "text_similarity":
        return similarity.check_spec(spec)
    elif kind == "python":
        return python_grader.check_spec(spec)
    elif kind == "score_model":
        return model_graders.check_score_spec(spec)
    elif kind == "label_model":
        return model_graders.check_label_spec(spec)
    elif kind == "numeric_match":
        return numeric.check_spec(spec)
    elif kind == "rank":
        return rank.check_spec(spec)
    elif kind == "multi":
        problems = multi.check_spec(spec)
        graders = spec.get("graders")
        if isinstance(graders, Mapping):
            for name, sub in graders.items():
                problems += [f"graders.{name}: {problem}" for problem in validate_grader_spec(sub)]
        return problems
    if kind is None:
        return [f"grader spec has no 'type' (one of {', '.join(GRADER_TYPES)})"]
    return [f"unknown grader type {kind!r} (one of {', '.join(GRADER_TYPES)})"]


def build_grader(spec: Mapping[str, Any], *, timeout_s: float = 10.0, memory_mb: int = 1024) -> Grader:
    """The grader a spec describes; GraderSpecError listing every problem when the spec is invalid.

    `timeout_s` and `memory_mb` limit each python-grader call (inside multi graders too).
    Model graders load their model (or open their HTTP client) here; python graders start
    their first sandbox process here. Call `close()` (or use `with`) to release them.
    """
    problems = validate_grader_spec(spec)
    if problems:
        raise GraderSpecError("invalid grader spec:\n- " + "\n- ".join(problems))
    kind = spec["type"]
    if kind == "string_check":
        return string_check.StringCheckGrader(spec)
    elif kind == "text_similarity":
        return similarity.TextSimilarityGrader(spec)
    elif kind == "python":
        return python_grader.PythonGrader(spec, timeout_s=timeout_s, memory_mb=memory_mb)
    elif kind == "score_model":
        return model_graders.ScoreModelGrader(spec)
    elif kind == "label_model":
        return model_graders.LabelModelGrader(spec)
    elif kind == "numeric_match":
        return numeric.NumericMatchGrader(spec)
    elif kind == "rank":
        return rank.RankGrader(spec)
    elif kind == "multi":
        built: dict[str, Grader] = {}
        try:
            for name, sub in spec["graders"].items():
                # The key is the name the formula uses, so it names the sub-grader in errors too.
                built[name] = build_grader({**sub, "name": name}, timeout_s=timeout_s, memory_mb=memory_mb)
            return multi.MultiGrader(spec, built)
        except BaseException:
            for grader in built.values():
                grader.close()
            raise
    raise GraderSpecError(f"unknown grader type {kind!r}")  # unreachable after validation


def load_grader_spec(path: str | Path) -> dict[str, Any]:
    """A grader spec from a JSON or YAML file (by extension; by content when neither).

    Raises GraderSpecError naming the file when it is missing, does not parse, or is not a
    mapping. The spec is returned as written; `validate_grader_spec` checks it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraderSpecError(f"{path}: grader file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GraderSpecError(f"{path}: cannot read grader file: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip().startswith("{")):
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise GraderSpecError(f"{path}: not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise GraderSpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(spec, dict):
        raise GraderSpecError(f"{path}: a grader spec is a mapping with a 'type', got {type(spec).__name__}")
    return spec
