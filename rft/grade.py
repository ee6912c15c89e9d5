"""`rft grade`: run a grader on one sample or on files of items and samples, or validate a spec.

Like OpenAI's graders run/validate endpoints:

    rft grade --grader grader.yaml --item '{"reference": "18"}' --sample 'So #### 18'
    rft grade --grader grader.json --data items.jsonl --samples samples.jsonl --out graded.jsonl
    rft grade --validate grader.yaml

One sample prints `{"reward": float|null, "sub_rewards": {...}, "errors": [...]}`; files print a
summary (count, mean reward, errors) and, with `--out`, one JSON line per row. Exit status 0 when
every grade is a score, 1 when a grade is an error (the grader raised, timed out, found no field it
needs: `reward` is null and `errors` says why), so that a script notices. `--data` is a JSONL file of item objects (used as they
are); a CSV, Parquet or ReFT JSON file goes through the data layer, so its items are the ones
graders see in training. Samples are a JSONL of `{"output_text": ...}` objects or JSON strings,
paired with the items by position. `--validate` exits 0 when the spec is valid and 1 with one
line per problem when it is not (a file that does not parse, a formula nested too deeply, a spec
too large). Unusable input (missing file, bad JSON, counts that differ, an invalid spec to run)
exits 2 with a message and no traceback. Without `--grader` the default grader runs
(numeric_match on `item.reference`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rft.errors import EXIT_NEGATIVE, fail
from rft_core.data.readers import parse_json
from rft_core.files import DATA_LIMIT, FileProblem, atomic_write, jsonl_lines, read_text, refuse_inputs
from rft_core.graders import GraderSpecError


class UsageProblem(Exception):
    """Input the command cannot use; printed and exit code 2."""


def _read_jsonl(path: Path, what: str) -> list[Any]:
    """The JSON values of a JSON-lines file, by line (lines split on "\n" only: U+2028 and U+0085
    are valid inside JSON strings); blank lines skipped."""
    try:
        lines = jsonl_lines(read_text(path, f"{what} file", DATA_LIMIT))
    except FileProblem as exc:  # missing, a directory, a FIFO or device, too large, not UTF-8
        raise UsageProblem(str(exc)) from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        value, reason = parse_json(line)  # malformed, too deep, a number past Python's digit limit
        if reason is not None:
            raise UsageProblem(f"{path}:{number}: not valid JSON: {reason}")
        rows.append(value)
    return rows


def _load_items(path: Path) -> list[dict[str, Any]]:
    """Items by line from a JSONL file of objects; other formats (CSV, Parquet, ReFT JSON) through
    the data layer's `load_items`, as the graders see them in training."""
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        try:
            from rft_core.data import item_dict, load_items
        except ImportError:
            raise UsageProblem(f"{path}: --data reads JSONL files of item objects") from None
        try:
            loaded = load_items(path)
        except Exception as exc:  # DataError and friends: the message says what is wrong
            raise UsageProblem(f"{path}: {exc}") from None
        if loaded.rejected:
            raise UsageProblem(
                f"{path}: {loaded.rejected} of {loaded.rows} rows were rejected (see `rft validate {path}`); "
                "samples are paired with items by position, so every row must load"
            )
        return [item_dict(row) for _, row in loaded.frame.iterrows()]
    rows = _read_jsonl(path, "data")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UsageProblem(f"{path}: item {number} is a {type(row).__name__}, not a JSON object")
    return rows


def _load_samples(path: Path) -> list[Any]:
    rows = _read_jsonl(path, "samples")
    for number, row in enumerate(rows, start=1):
        if isinstance(row, dict) and not isinstance(row.get("output_text"), str):
            raise UsageProblem(f"{path}: sample {number} has no string 'output_text'")
        if not isinstance(row, (dict, str)):
            raise UsageProblem(f"{path}: sample {number} should be a string or an object with 'output_text'")
    return rows


def _spec_from(grader_file: Path | None) -> dict[str, Any]:
    from rft_core.config import DEFAULT_GRADER
    from rft_core.graders import load_grader_spec

    if grader_file is None:
        return dict(DEFAULT_GRADER)
    try:
        return load_grader_spec(grader_file)
    except GraderSpecError as exc:
        raise UsageProblem(str(exc)) from None


def _validate(path: Path) -> None:
    from rft_core.graders import load_grader_spec, validate_grader_spec

    try:
        read_text(path, "grader file")  # unusable (missing, a directory, not UTF-8): exit 2, not "invalid"
    except FileProblem as exc:
        raise fail(str(exc)) from None
    try:
        spec = load_grader_spec(path)
    except GraderSpecError as exc:
        typer.echo(f"invalid: {exc}")
        raise typer.Exit(EXIT_NEGATIVE) from None
    problems = validate_grader_spec(spec)
    if problems:  # one line per problem, each naming the file
        for problem in problems:
            typer.echo(f"invalid: {path}: {problem}")
        raise typer.Exit(EXIT_NEGATIVE)
    typer.echo(f"valid: {path} ({spec.get('type')} grader {spec.get('name', '')!r})")


def grade_cmd(
    grader: Annotated[
        Path | None, typer.Option("--grader", "-g", help="Grader spec (JSON or YAML); default: numeric_match.")
    ] = None,
    item: Annotated[str | None, typer.Option("--item", help="One item as a JSON object.")] = None,
    sample: Annotated[str | None, typer.Option("--sample", help="One sample: the model's output text.")] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Items: JSONL of objects (or CSV/Parquet/ReFT JSON), by line.")
    ] = None,
    samples: Annotated[
        Path | None, typer.Option("--samples", help="Samples JSONL: {\"output_text\": ...} or strings, by line.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write one JSON result per row here.")] = None,
    validate: Annotated[
        Path | None, typer.Option("--validate", help="Check this grader spec without running it.")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Parallel graders (python/HTTP).")] = 0,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", min=0.001, help="Python grader time limit per call, its source's imports included.")
    ] = 10.0,
    memory_mb: Annotated[int, typer.Option("--memory-mb", min=64, help="Python grader memory limit.")] = 1024,
) -> None:
    """Run a grader on one sample or on files of items and samples, or validate a grader spec."""
    if validate is not None:
        if any(x is not None for x in (item, sample, data, samples, out)):
            raise fail("--validate checks a spec; it takes no --item/--sample/--data/--samples/--out")
        _validate(validate)
        return
    one = sample is not None or item is not None
    files = data is not None or samples is not None
    if one == files:
        raise fail("give either --sample (with --item) or --data with --samples (or --validate FILE)")
    try:
        if one:
            _grade_one(grader, item, sample, timeout_s, memory_mb)
        else:
            _grade_files(grader, data, samples, out, workers, timeout_s, memory_mb)
    except UsageProblem as exc:
        raise fail(str(exc)) from None


def _build(grader_file: Path | None, timeout_s: float, memory_mb: int) -> Any:
    from rft_core.graders import build_grader

    spec = _spec_from(grader_file)
    try:
        return build_grader(spec, timeout_s=timeout_s, memory_mb=memory_mb)
    except GraderSpecError as exc:
        source = grader_file or "the default grader"
        raise UsageProblem(f"{source}: {exc}") from None


def _grade_one(grader_file: Path | None, item: str | None, sample: str | None, timeout_s: float, memory_mb: int) -> None:
    if sample is None:
        raise UsageProblem("--item needs --sample (the output text to grade)")
    try:
        item_value = json.loads(item) if item is not None else {}
    except ValueError as exc:
        raise UsageProblem(f"--item is not valid JSON: {exc}") from None
    if not isinstance(item_value, dict):
        raise UsageProblem(f"--item should be a JSON object, got {type(item_value).__name__}")
    with _build(grader_file, timeout_s, memory_mb) as built:
        result = built.grade(sample, item_value)
    typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    if result.reward is None:  # an error, not a score: the JSON says why
        raise typer.Exit(EXIT_NEGATIVE)


def _grade_files(
    grader_file: Path | None,
    data: Path | None,
    samples: Path | None,
    out: Path | None,
    workers: int,
    timeout_s: float,
    memory_mb: int,
) -> None:
    from rft_core.graders import grade_batch, summarize

    if data is None or samples is None:
        raise UsageProblem("--data and --samples go together (items and samples, paired by line)")
    if out is not None:
        # Before any grading: an --out that is an input would be lost only after the whole run.
        try:
            refuse_inputs(out, {"--data file": data, "--samples file": samples, "--grader file": grader_file},
                          what="--out file")
        except FileProblem as exc:
            raise UsageProblem(str(exc)) from None
    items = _load_items(data)
    outputs = _load_samples(samples)
    if len(items) != len(outputs):
        raise UsageProblem(f"{data} has {len(items)} items but {samples} has {len(outputs)} samples")
    with _build(grader_file, timeout_s, memory_mb) as built:
        results = grade_batch(built, outputs, items, workers=workers)
    if out is not None:
        try:
            with atomic_write(out, newline="\n") as handle:
                for index, result in enumerate(results):
                    handle.write(json.dumps({"index": index, **result.to_dict()}, ensure_ascii=False) + "\n")
        except FileProblem as exc:
            raise UsageProblem(str(exc)) from None
        except OSError as exc:
            raise UsageProblem(f"{out}: cannot write the --out file: {exc.strerror or exc}") from None
    summary = summarize(results)
    mean = summary["mean_reward"]
    typer.echo(f"graded: {summary['count']}")
    typer.echo(f"mean reward: {mean:.4f}" if mean is not None else "mean reward: n/a (no successful grade)")
    typer.echo(f"errors: {summary['errors']} ({summary['error_rate']:.1%})")
    for entry in summary["top_errors"]:
        typer.echo(f"  {entry['count']} x {entry['error']}")
    if out is not None:
        typer.echo(f"results: {out}")
    if summary["errors"]:
        raise typer.Exit(EXIT_NEGATIVE)
