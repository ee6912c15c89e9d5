"""Graders: OpenAI's RFT grader JSON (and YAML) turned into objects that score samples in [0, 1].

Types: `string_check`, `text_similarity`, `python`, `score_model`, `label_model`, `multi`
(OpenAI's), and `numeric_match`, `rank` (ours). `GRADERS` maps each type to its spec check and
its builder: `build_grader(spec)` checks the spec and builds the grader, `validate_grader_spec(spec)`
lists a spec's problems without building anything expensive, `load_grader_spec(path)` reads JSON
or YAML.

>>> grader = build_grader({"type": "string_check", "name": "exact", "operation": "eq",
...                        "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}"})
>>> grader.grade("42", {"answer": "42"}).to_dict()
{'reward': 1.0, 'sub_rewards': {}, 'errors': []}
>>> validate_grader_spec({"type": "string_check", "operation": "like", "input": "x"})
["string_check: missing field 'reference'"]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from rft_core.graders import model_graders, multi, numeric, python_grader, rank, similarity, string_check
from rft_core.graders.base import (
    MAX_SPEC_DEPTH,
    Grader,
    GraderError,
    GradeResult,
    GraderSpecError,
    Sample,
    shown,
    structure_problems,
)
from rft_core.graders.batch import grade_batch, summarize

__all__ = [
    "GRADERS",
    "GRADER_TYPES",
    "GradeResult",
    "Grader",
    "GraderError",
    "GraderType",
    "GraderSpecError",
    "Sample",
    "build_grader",
    "configured_grader",
    "grade_batch",
    "load_grader_spec",
    "summarize",
    "validate_grader_spec",
]


class GraderType(NamedTuple):
    """What the dispatch table holds for one grader type."""

    check: Callable[[Mapping[str, Any]], list[str]]  # spec -> its problems; loads nothing
    build: Callable[..., Grader]  # (valid spec, *, timeout_s, memory_mb, sandbox) -> grader


def _spec_only(cls: Callable[[Mapping[str, Any]], Grader]) -> Callable[..., Grader]:
    """The builder of a grader class that needs its spec and no sandbox limits."""
    return lambda spec, *, timeout_s, memory_mb, sandbox: cls(spec)


def _check_multi(spec: Mapping[str, Any]) -> list[str]:
    problems = multi.check_spec(spec)
    for name, sub in multi.sub_grader_specs(spec).items():
        label = name if len(str(name)) <= 40 else f"{str(name)[:40]}..."
        problems += [f"graders.{label}: {problem}" for problem in validate_grader_spec(sub)]
    return problems


def _build_multi(spec: Mapping[str, Any], *, timeout_s: float, memory_mb: int, sandbox: str) -> Grader:
    built: dict[str, Grader] = {}
    try:
        for name, sub in multi.sub_grader_specs(spec).items():
            # The name the formula uses names the sub-grader in errors too.
            built[name] = build_grader(
                {**sub, "name": name}, timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox
            )
        return multi.MultiGrader(spec, built)
    except BaseException:
        for grader in built.values():
            grader.close()
        raise


# The one dispatch table: a grader type -> its spec check and its builder.
GRADERS: dict[str, GraderType] = {
    "string_check": GraderType(string_check.check_spec, _spec_only(string_check.StringCheckGrader)),
    "text_similarity": GraderType(similarity.check_spec, _spec_only(similarity.TextSimilarityGrader)),
    "python": GraderType(python_grader.check_spec, python_grader.PythonGrader),
    "score_model": GraderType(model_graders.check_score_spec, _spec_only(model_graders.ScoreModelGrader)),
    "label_model": GraderType(model_graders.check_label_spec, _spec_only(model_graders.LabelModelGrader)),
    "multi": GraderType(_check_multi, _build_multi),
    "numeric_match": GraderType(numeric.check_spec, _spec_only(numeric.NumericMatchGrader)),
    "rank": GraderType(rank.check_spec, _spec_only(rank.RankGrader)),
}
GRADER_TYPES = tuple(GRADERS)


def validate_grader_spec(spec: Any) -> list[str]:
    """The problems of a grader spec, one line each; empty when it is valid.

    Checks the spec's size and shape first (`structure_problems`: depth, values, text), then
    types, required and unknown fields, operations, metrics, templates, formulas and sub-grader
    names, and parses (never runs) python sources; loads no model.
    """
    if not isinstance(spec, Mapping):
        return [f"a grader spec is a mapping with a 'type', got {type(spec).__name__}"]
    problems = structure_problems(spec)
    if problems:
        return problems
    kind = spec.get("type")
    if isinstance(kind, str) and kind in GRADERS:
        return GRADERS[kind].check(spec)
    if kind is None:
        return [f"grader spec has no 'type' (one of {', '.join(GRADER_TYPES)})"]
    return [f"unknown grader type {shown(kind)} (one of {', '.join(GRADER_TYPES)})"]


def build_grader(
    spec: Mapping[str, Any], *, timeout_s: float = 10.0, memory_mb: int = 1024, sandbox: str = "namespaces"
) -> Grader:
    """The grader a spec describes; GraderSpecError listing every problem when the spec is invalid.

    `timeout_s` and `memory_mb` limit each python-grader call (inside multi graders too), and
    `sandbox` says how python graders are isolated (`grader.sandbox`: namespaces or none).
    Model graders load their model (or open their HTTP client) here; python graders start
    their first sandbox process here. Call `close()` (or use `with`) to release them.
    """
    problems = validate_grader_spec(spec)
    if problems:  # one line, as every error a command prints
        raise GraderSpecError("invalid grader spec: " + "; ".join(problems))
    return GRADERS[spec["type"]].build(spec, timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox)


def configured_grader(section: Any) -> Grader:
    """The grader a config's `grader` section describes, with its limits and sandbox mode."""
    return build_grader(
        section.resolved_spec(), timeout_s=section.timeout_s, memory_mb=section.memory_mb, sandbox=section.sandbox
    )


# A grader spec is a few kilobytes; a python grader's source is at most 256 KiB (OpenAI's limit).
MAX_SPEC_FILE_BYTES = 4 * 1024 * 1024


def load_grader_spec(path: str | Path) -> dict[str, Any]:
    """A grader spec from a JSON or YAML file (by extension; by content when neither).

    Raises GraderSpecError naming the file when it is missing, not a regular file, larger than
    MAX_SPEC_FILE_BYTES, not UTF-8, does not parse (or nests too deeply to), or is not a mapping. The spec is returned as written; `validate_grader_spec` checks it.
    """
    from rft_core.files import FileProblem, read_text, yaml_error

    path = Path(path)
    try:
        text = read_text(path, "grader file", limit=MAX_SPEC_FILE_BYTES)
    except FileProblem as exc:  # missing, a directory, a FIFO, a device, too large, not UTF-8
        raise GraderSpecError(str(exc)) from None
    suffix = path.suffix.lower()
    too_deep = f"{path}: nested too deeply to read (a grader spec nests at most {MAX_SPEC_DEPTH} levels)"
    if suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip().startswith("{")):
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise GraderSpecError(f"{path}: not valid JSON: {exc}") from None
        except (RecursionError, MemoryError):
            raise GraderSpecError(too_deep) from None
    else:
        import yaml

        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise GraderSpecError(f"{path}: not valid YAML: {yaml_error(exc)}") from None
        except (RecursionError, MemoryError):
            raise GraderSpecError(too_deep) from None
    if not isinstance(spec, dict):
        raise GraderSpecError(f"{path}: a grader spec is a mapping with a 'type', got {type(spec).__name__}")
    return spec
