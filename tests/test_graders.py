"""In-process graders: string_check, text_similarity, numeric_match, rank, templates, multi and its
formula, spec validation and loading, batches and summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rft_core.config import DEFAULT_GRADER, GraderConfig
from rft_core.graders import (
    GRADER_TYPES,
    GRADERS,
    GradeResult,
    GraderSpecError,
    build_grader,
    grade_batch,
    load_grader_spec,
    summarize,
    validate_grader_spec,
)
from rft_core.graders.multi import FormulaError, evaluate, names_in, parse_formula
from rft_core.graders.numeric import extract_answer, extract_number, numbers_match, parse_number
from rft_core.graders.rank import ranked_list

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "graders"


def string_check(operation: str) -> dict:
    return {"type": "string_check", "name": "check", "operation": operation,
            "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}"}


def similarity(metric: str) -> dict:
    return {"type": "text_similarity", "name": "sim", "evaluation_metric": metric,
            "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"}


# ----------------------------------------------------------------------------- results


def test_grade_result_to_dict_and_ok():
    assert GradeResult(0.5).to_dict() == {"reward": 0.5, "sub_rewards": {}, "errors": []}
    assert GradeResult(0.0).ok
    failure = GradeResult.failure("x: broke", sub_rewards={"a": None})
    assert not failure.ok
    assert failure.to_dict() == {"reward": None, "sub_rewards": {"a": None}, "errors": ["x: broke"]}


# ----------------------------------------------------------------------------- string_check


@pytest.mark.parametrize(
    ("operation", "output", "answer", "reward"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),
        ("eq", "Paris ", "Paris", 0.0),
        ("ne", "Lyon", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "The capital is Paris.", "Paris", 1.0),
        ("like", "The capital is PARIS.", "Paris", 0.0),
        ("ilike", "The capital is PARIS.", "Paris", 1.0),
        ("ilike", "The capital is Lyon.", "Paris", 0.0),
    ],
)
def test_string_check_operations(operation, output, answer, reward):
    assert build_grader(string_check(operation)).grade(output, {"answer": answer}).reward == reward


def test_string_check_reads_nested_item_fields_and_output_json():
    grader = build_grader({"type": "string_check", "name": "label", "operation": "eq",
                           "input": "{{sample.output_json.label}}", "reference": "{{ item.gold.labels[1] }}"})
    assert grader.grade('{"label": "spam"}', {"gold": {"labels": ["ham", "spam"]}}).reward == 1.0
    assert grader.grade('{"label": "ham"}', {"gold": {"labels": ["ham", "spam"]}}).reward == 0.0


# ----------------------------------------------------------------------------- text_similarity

HYP, REF = "the cat sat on a mat", "the cat sat on the mat"


@pytest.mark.parametrize(
    ("metric", "output", "expected"),
    [
        ("fuzzy_match", "hello wrld", 0.9523809523809523),  # rapidfuzz ratio 95.238 / 100
        ("bleu", HYP, 0.537284965911771),  # sacrebleu sentence BLEU 53.73 / 100
        ("gleu", HYP, 0.6111111111111112),  # 11 of 18 n-grams match
        ("meteor", "the cats sat on a mat", 0.7433333333333335),  # "cats" matches "cat" by stem
        ("rouge_1", HYP, 5 / 6),
        ("rouge_2", HYP, 0.6),
        ("rouge_3", HYP, 0.5),
        ("rouge_4", HYP, 1 / 3),
        ("rouge_5", HYP, 0.0),
        ("rouge_l", HYP, 5 / 6),
    ],
)
def test_text_similarity_metric_values(metric, output, expected):
    reference = "hello world" if metric == "fuzzy_match" else REF
    result = build_grader(similarity(metric)).grade(output, {"reference": reference})
    assert result.ok, result.errors
    assert result.reward == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_l"])
def test_text_similarity_identical_text_scores_one_and_disjoint_text_scores_zero(metric):
    grader = build_grader(similarity(metric))
    # BLEU's 100.00000000000004 snaps to 1; METEOR keeps its fragmentation penalty 0.5 * (1/6)^3.
    identical = 1.0 - 0.5 / 6**3 if metric == "meteor" else 1.0
    assert grader.grade(REF, {"reference": REF}).reward == pytest.approx(identical, abs=1e-12)
    assert grader.grade("qqqzzz", {"reference": REF}).reward == 0.0


def test_meteor_matches_no_synonyms_without_wordnet():
    # With WordNet "feline" would match "cat"; our stand-in knows no synonyms and downloads nothing.
    grader = build_grader(similarity("meteor"))
    exact = grader.grade("the cat", {"reference": "the cat"}).reward
    synonym = grader.grade("the feline", {"reference": "the cat"}).reward
    assert exact > 0.9 and synonym < exact / 2


def test_cosine_without_embedding_model_is_a_build_error():
    with pytest.raises(GraderSpecError, match="embedding_model"):
        build_grader(similarity("cosine"))


# ----------------------------------------------------------------------------- numeric_match


def numeric(**fields) -> dict:
    return {"type": "numeric_match", "name": "answer", **fields}


@pytest.mark.parametrize(
    ("output", "reference", "fields", "reward"),
    [
        ("She sells 16 - 3 - 4 = 9 eggs at $2: 9 * 2 = 18.\n#### 18", "18", {}, 1.0),
        ("Total: 1,234,567 people. #### 1,234,567", "1234567", {}, 1.0),  # commas
        ("It costs $1,234.50 in all.", "1234.5", {}, 1.0),  # currency + commas + decimals
        ("#### €7", "7", {}, 1.0),
        ("#### 18.0", "18", {}, 1.0),  # 18.0 = 18
        ("#### 18", "18.00", {}, 1.0),
        ("the answer is 1/2", "0.5", {}, 1.0),  # fractions
        ("#### 3/4", "0.75", {}, 1.0),
        ("It fell to -3 degrees. #### -3", "-3", {}, 1.0),  # negatives
        ("#### 3", "-3", {"partial_credit": 0.1}, 0.1),
        ("#### 50%", "50", {}, 1.0),
        ("#### 3.14", "3.14159", {"partial_credit": 0.1}, 0.1),  # default tolerance is tight
        ("#### 3.14", "3.14159", {"abs_tol": 0.01}, 1.0),  # absolute tolerance
        ("#### 1010", "1000", {"rel_tol": 0.02}, 1.0),  # relative tolerance
        ("#### 1030", "1000", {"rel_tol": 0.02, "partial_credit": 0.1}, 0.1),
        ("#### 5\nwait, no.\n#### 7", "7", {}, 1.0),  # the last marker wins
        ("#### 5\nwait, no.\n#### 7", "5", {"partial_credit": 0.1}, 0.1),
        ("So the answer is 42. Check: 6 * 7 = 42, 40 + 2", "42", {}, 1.0),  # "the answer is" beats last number
        ("3 apples and 4 pears make 7", "7", {}, 1.0),  # else the last number
        ("#### 17", "#### 18", {"partial_credit": 0.1}, 0.1),  # partial credit; GSM8K-style reference
        ("#### 17", "18", {}, 0.0),  # partial credit defaults to 0
        ("I cannot solve this.", "18", {"partial_credit": 0.1}, 0.0),  # nothing extractable
        ("", "18", {"partial_credit": 0.1}, 0.0),
    ],
)
def test_numeric_match_cases(output, reference, fields, reward):
    result = build_grader(numeric(**fields)).grade(output, {"reference": reference})
    assert result.ok, result.errors
    assert result.reward == reward


def test_numeric_match_nothing_extractable_is_a_score_not_an_error():
    result = build_grader(numeric(partial_credit=0.1)).grade("no idea", {"reference": "5"})
    assert result.to_dict() == {"reward": 0.0, "sub_rewards": {}, "errors": []}


def test_numeric_match_reference_without_a_number_is_an_error_result():
    result = build_grader(numeric()).grade("#### 5", {"reference": "five"})
    assert result.reward is None and "reference 'five' holds no number" in result.errors[0]


def test_numeric_match_numeric_item_values_and_custom_fields():
    grader = build_grader(numeric(input="{{ sample.output_json.value }}", reference="{{ item.gold }}"))
    assert grader.grade('{"value": 2.5}', {"gold": 2.5}).reward == 1.0


def test_default_grader_is_numeric_match_on_item_reference():
    grader = build_grader(DEFAULT_GRADER)
    assert grader.name == "answer"
    # ReFT's partial credit: 0.1 for a wrong number the grader could read, 0 when it read none.
    assert [grader.grade(s, {"reference": "18"}).reward for s in ("#### 18", "#### 17", "none")] == [1.0, 0.1, 0.0]


def test_extraction_helpers_keep_their_behaviour():
    assert extract_answer("She makes 9 * 2 = 18 dollars.\n#### 18") == "18"
    assert parse_number("$1,234.50") == 1234.5 and parse_number("1/2") == 0.5 and parse_number("x") is None
    assert extract_number("The answer is -7.") == -7.0
    assert numbers_match(18.0, 18) and not numbers_match(18.1, 18)


# ----------------------------------------------------------------------------- rank


@pytest.mark.parametrize(
    ("position", "reward"), [(1, 1.0), (2, 0.7), (3, 0.5), (4, 0.3), (5, 0.2), (6, 0.1), (7, 0.0)]
)
def test_rank_default_scores_by_position(position, reward):
    others = iter(["Oslo", "Rome", "Bern", "Nice", "Kyiv", "Riga", "Lima"])
    entries = [("Paris" if i == position else next(others)) for i in range(1, 8)]
    output = "\n".join(f"{i}. {entry}" for i, entry in enumerate(entries, start=1))
    assert build_grader({"type": "rank"}).grade(output, {"reference": "Paris"}).reward == reward


@pytest.mark.parametrize(
    "output",
    [
        "1. Lyon\n2. Paris\n3. Nice",
        "Ranking:\n1) Lyon\n2) Paris",
        "- Lyon\n- paris\n- Nice",
        "* Lyon\n* **Paris**\n",
        "• Lyon\n• Paris",
        "Lyon, Paris, Nice",
        "My ranking: Lyon,  PARIS , Nice.",
        '["Lyon", "Paris", "Nice"]',
        'Here is the list: ["Lyon", "Paris"] as asked.',
        "Steps:\n1. consider climate\n2. consider size\nFinal ranking:\n1. Lyon\n2. Paris",
    ],
)
def test_rank_reads_list_formats_case_insensitively(output):
    assert build_grader({"type": "rank", "name": "rank"}).grade(output, {"reference": " paris "}).reward == 0.7


def test_rank_reference_missing_or_no_list_scores_zero():
    grader = build_grader({"type": "rank"})
    assert grader.grade("1. Lyon\n2. Nice", {"reference": "Paris"}).to_dict()["reward"] == 0.0
    assert grader.grade("I would say Lyon", {"reference": "Paris"}).reward == 0.0


def test_rank_custom_scores():
    grader = build_grader({"type": "rank", "scores": [1, 0.5]})
    assert grader.grade("y, z", {"reference": "z"}).reward == 0.5
    assert grader.grade("q, y, z", {"reference": "z"}).reward == 0.0  # past the listed positions


def test_ranked_list_normalises_entries():
    assert ranked_list('1. **"Rome".**\n2. `Oslo`') == ["rome", "oslo"]


# ----------------------------------------------------------------------------- templates


def test_missing_template_field_is_an_error_result_naming_the_field():
    result = build_grader(string_check("eq")).grade("Paris", {"answr": "Paris"})
    assert result.reward is None
    assert "template field 'item.answer' not found" in result.errors[0]
    assert result.errors[0].startswith("check: ")


def test_output_json_field_of_non_json_output_is_an_error_result():
    grader = build_grader({"type": "string_check", "name": "j", "operation": "eq",
                           "input": "{{ sample.output_json.label }}", "reference": "x"})
    result = grader.grade("not json", {})
    assert result.reward is None and "not valid JSON" in result.errors[0]
    assert "sample.output_json.label" in result.errors[0]


def test_template_whitespace_lists_and_non_string_values():
    grader = build_grader({"type": "string_check", "name": "t", "operation": "eq",
                           "input": "{{sample.output_text}}", "reference": "{{   item.xs.1 }}|{{item.obj}}|{{ item.n }}"})
    assert grader.grade('b|{"k": [1, 2]}|3', {"xs": ["a", "b"], "obj": {"k": [1, 2]}, "n": 3}).reward == 1.0
    out_of_range = grader.grade("x", {"xs": ["a"], "obj": {}, "n": 1})
    assert "has 1 elements, no index 1" in out_of_range.errors[0]


def test_sample_may_be_a_dict_with_output_json():
    grader = build_grader({"type": "string_check", "name": "t", "operation": "eq",
                           "input": "{{ sample.output_json.a }}", "reference": "1"})
    assert grader.grade({"output_text": "ignored", "output_json": {"a": "1"}}, {}).reward == 1.0
    bad = grader.grade({"text": "no output_text"}, {})
    assert bad.reward is None and "output_text" in bad.errors[0]


def test_template_namespace_must_be_item_or_sample():
    problems = validate_grader_spec({**string_check("eq"), "reference": "{{ items.answer }}"})
    assert problems == ["string_check 'check': reference: placeholder '{{ items.answer }}' must start with 'item.' or 'sample.'"]


# ----------------------------------------------------------------------------- formula


@pytest.mark.parametrize(
    ("formula", "value"),
    [
        ("1 + 2 * 3", 7.0),
        ("(1 + 2) * 3", 9.0),
        ("8 / 4 / 2", 1.0),
        ("10 - 4 - 3", 3.0),
        ("2 ^ 3 ^ 2", 512.0),  # right-associative
        ("2 ** 3", 8.0),
        ("-2 ^ 2", -4.0),  # power binds tighter than unary minus
        ("2 ^ -1", 0.5),
        ("--3", 3.0),
        ("+a - -b", 1.0),
        ("0.5 * a + 0.5 * b", 0.5),
        ("min(a, b, 0.1)", 0.1),
        ("max(a, b)", 0.75),
        ("abs(b - a)", 0.5),
        ("floor(2.7) + ceil(0.2)", 3.0),
        ("exp(0) + sqrt(16) + log(1)", 5.0),
        ("log(exp(2))", 2.0),
        (".5e1", 5.0),
        ("a*b/(a+b)", 0.1875),
    ],
)
def test_formula_precedence_and_functions(formula, value):
    assert evaluate(parse_formula(formula), {"a": 0.25, "b": 0.75}) == pytest.approx(value)


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("", "empty"),
        ("(a + b", "expected ')'"),
        ("a + ", "expected a number"),
        ("a b", "unexpected token"),
        ("a $ b", "unexpected character '$'"),
        ("pow(a, 2)", "unknown function 'pow'"),
        ("__import__(a)", "unknown function '__import__'"),
        ("__import__('os')", "unexpected character"),
        ("abs(a, b)", "abs() takes 1 argument(s), got 2"),
        ("max()", "expected a number"),
        ("a ^ ", "expected a number"),
    ],
)
def test_formula_syntax_errors(formula, message):
    with pytest.raises(FormulaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        parse_formula(formula)


def test_formula_names():
    assert names_in(parse_formula("0.5 * acc + min(fmt, 1) - exp(-len_penalty)")) == {"acc", "fmt", "len_penalty"}


# ----------------------------------------------------------------------------- limits of specs


DEEP = 5000  # deeper than Python's recursion limit: these were RecursionError tracebacks


@pytest.mark.parametrize(
    ("formula", "limit"),
    [
        ("(" * DEEP + "a" + ")" * DEEP, "limit of 10000 characters"),
        ("(" * 4000 + "a" + ")" * 4000, "limit of 64 levels"),
        ("-" * DEEP + "a", "limit of 64 levels"),
        ("a" + "^a" * 4000, "limit of 64 levels"),
        ("a" + "+a" * 4000, "limit of 64 levels"),
        ("a" + "*a" * 4000, "limit of 64 levels"),
        ("abs(" * 1500 + "a" + ")" * 1500, "limit of 64 levels"),
        ("max(a" + ", a" * 4000 + ")", "limit of 10000 characters"),
        (" " * 20_000 + "a", "limit of 10000 characters"),
    ],
    ids=["parens", "parens-short", "unary", "power", "sum", "product", "calls", "long", "spaces"],
)
def test_formulas_over_the_limits_are_formula_errors_before_any_recursion(formula, limit):
    with pytest.raises(FormulaError, match=limit) as raised:
        parse_formula(formula)
    assert raised.value.openai_error == "formula_parse_error"
    assert len(str(raised.value)) < 300 and "\n" not in str(raised.value)  # one line, the formula shortened
    problems = validate_grader_spec(multi_spec(formula))
    assert len(problems) == 1 and limit in problems[0] and problems[0].startswith("multi 'mix': formula ")
    with pytest.raises(GraderSpecError, match=limit):
        build_grader(multi_spec(formula))


def test_formulas_within_the_limits_parse_and_evaluate():
    values = {"a": 0.5}
    assert evaluate(parse_formula("(" * 63 + "a" + ")" * 63), values) == 0.5
    assert evaluate(parse_formula("a" + "*1" * 63), values) == 0.5  # 64 levels: the limit itself
    assert evaluate(parse_formula("-" * 62 + "a"), values) == 0.5
    assert evaluate(parse_formula("max(a" + ", 0" * 2000 + ")"), values) == 0.5  # many arguments, one level


def _nested_multi(levels: int) -> dict:
    spec: dict = {"type": "numeric_match"}
    for _ in range(levels):  # built without recursion, as a JSON file would hold it
        spec = {"type": "multi", "graders": {"inner": spec}, "calculate_output": "inner"}
    return spec


def test_multi_graders_nested_too_deeply_are_one_problem_not_a_recursion_error():
    for levels in (16, 100, DEEP):
        problems = validate_grader_spec(_nested_multi(levels))
        assert problems == ["the grader spec nests deeper than the limit of 32 levels "
                            "(a multi grader inside a multi grader adds two)"]
        with pytest.raises(GraderSpecError, match="nests deeper than the limit of 32 levels"):
            build_grader(_nested_multi(levels))
    with build_grader(_nested_multi(15)) as grader:  # within the limit: it grades
        assert grader.grade("#### 18", {"reference": "18"}).reward == 1.0


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({**string_check("eq"), "input": "{{ sample.output_text }}" + "x" * 200_000}, "over the limit of 100000"),
        ({**string_check("eq"), "extra": [[1] * 1000] * 200}, "more than 100000 values"),
        ({**string_check("eq"), "extra": ["x" * 100_000] * 30}, "more than 2000000 characters"),
        ({"type": "python", "source": "def grade(s, i):\n    return 1\n" + "#" * 300_000}, "over the limit of 262144"),
        ({"type": "python", "source": "x = " + "-" * 100_000 + "1\ndef grade(s, i):\n    return 1\n"},
         "nested too deeply for Python's parser"),
        ({"type": "python", "source": "x = a" + "+a" * 100_000 + "\ndef grade(s, i):\n    return 1\n"},
         "nested too deeply for Python's parser"),
    ],
    ids=["template", "values", "text", "source-size", "source-unary", "source-sum"],
)
def test_specs_too_large_are_one_line_problems(spec, problem):
    problems = validate_grader_spec(spec)
    assert any(problem in p for p in problems), problems
    assert all(len(p) < 300 and "\n" not in p for p in problems)


def test_problems_quote_huge_values_shortened():
    problems = validate_grader_spec({**string_check("x" * 1_000_000), "name": "n" * 100_000, "refrence": [[[[[1]]]]]})
    assert len(problems) == 2 and all(len(p) < 300 for p in problems), problems
    assert all(p.startswith("string_check 'nnnn") for p in problems)
    assert any("operation 'xxxxx" in p for p in problems) and any("unknown field 'refrence'" in p for p in problems)


def test_placeholders_are_found_in_linear_time():
    # `{{` and thousands of spaces without `}}` took seconds (cubic backtracking) before.
    template = "{{" + " " * 90_000 + "x" + "{{ item.a }}"
    assert validate_grader_spec({**string_check("eq"), "input": template}) == []
    from rft_core.graders.templates import render

    assert render(template, {"item": {"a": "A"}, "sample": {}}).endswith("xA")


def test_a_yaml_file_whose_aliases_repeat_exponentially_is_refused(tmp_path):
    lines = ["type: string_check", "operation: eq", "input: a", "reference: b", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 10)}]" for k in range(1, 9)]  # 10^9 values when walked
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert validate_grader_spec(load_grader_spec(path)) == [
        "the grader spec holds more than 100000 values; a grader spec is small"]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_spec_files_nested_past_the_parsers_are_refused_with_the_file_named(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"type": "multi", "graders": ' * DEEP + "{}" + "}" * DEEP)
    with pytest.raises(GraderSpecError, match=r"deep\.(json|yaml): nested too deeply to read"):
        load_grader_spec(path)


def test_spec_files_that_are_not_regular_files_or_too_large_are_refused(tmp_path):
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # nobody writes to it: reading would wait for ever
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(GraderSpecError, match="not a regular file"):
            load_grader_spec(path)
    with pytest.raises(GraderSpecError, match="is a directory, not a grader file"):
        load_grader_spec(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_text("type: rank\n" + "#" * (5 * 1024 * 1024) + "\n")
    with pytest.raises(GraderSpecError, match="larger than the 4.0 MiB a grader file may have"):
        load_grader_spec(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"type: rank\nname: caf\xe9\n")
    with pytest.raises(GraderSpecError, match="not UTF-8"):
        load_grader_spec(latin)


# ----------------------------------------------------------------------------- multi


def multi_spec(formula: str, **extra_graders) -> dict:
    graders = {
        "exact": string_check("eq"),
        "near": string_check("ilike"),
        **extra_graders,
    }
    return {"type": "multi", "name": "mix", "graders": graders, "calculate_output": formula}


def test_multi_combines_sub_rewards_with_the_formula():
    grader = build_grader(multi_spec("0.8 * exact + 0.2 * near"))
    result = grader.grade("The answer: PARIS", {"answer": "Paris"})
    assert result.to_dict() == {"reward": pytest.approx(0.2), "sub_rewards": {"exact": 0.0, "near": 1.0}, "errors": []}
    assert grader.grade("Paris", {"answer": "Paris"}).reward == pytest.approx(1.0)


def test_multi_result_outside_unit_interval_is_an_error_not_clipped():
    result = build_grader(multi_spec("exact + near")).grade("Paris", {"answer": "Paris"})
    assert result.reward is None
    assert result.sub_rewards == {"exact": 1.0, "near": 1.0}
    assert "score 2.0 is outside [0, 1]" in result.errors[0]


@pytest.mark.parametrize(("formula", "message"), [("near / exact", "division by zero"), ("log(exact)", "log of non-positive")])
def test_multi_runtime_formula_errors_are_error_results(formula, message):
    result = build_grader(multi_spec(formula)).grade("paris", {"answer": "Paris"})
    assert result.reward is None and message in result.errors[0]


def test_multi_sub_grader_error_makes_an_error_listing_which():
    spec = multi_spec("0.5 * exact + 0.5 * other", other={**string_check("eq"), "reference": "{{ item.missing }}"})
    result = build_grader(spec).grade("Paris", {"answer": "Paris"})
    assert result.reward is None
    assert result.sub_rewards == {"exact": 1.0, "near": 1.0, "other": None}
    assert result.errors[0] == "mix: sub-grader(s) failed: other"
    assert result.errors[1].startswith("mix.other: template field 'item.missing' not found")


def test_multi_nests_and_uses_numeric_and_rank():
    spec = {
        "type": "multi", "name": "outer", "calculate_output": "0.5 * inner + 0.5 * ranked",
        "graders": {
            "inner": {"type": "multi", "calculate_output": "answer", "graders": {"answer": {"type": "numeric_match"}}},
            "ranked": {"type": "rank"},
        },
    }
    result = build_grader(spec).grade("1. 3\n2. 18", {"reference": "18"})
    assert result.reward == pytest.approx(0.85) and result.sub_rewards == {"inner": 1.0, "ranked": 0.7}


@pytest.mark.parametrize(
    ("formula", "problem"),
    [
        ("exact + typo", "unknown sub-grader(s) typo"),
        ("exact +", "expected a number"),
        ("foo(exact)", "unknown function 'foo'"),
    ],
)
def test_multi_bad_formula_is_a_spec_error(formula, problem):
    assert any(problem in p for p in validate_grader_spec(multi_spec(formula)))
    with pytest.raises(GraderSpecError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        build_grader(multi_spec(formula))


# The shape `openai.types.graders.MultiGrader(...).model_dump()` gives (openai 3.57): `graders` is one
# grader object, named by its `name`, not the documented {name: grader} map.
SDK_MULTI_DUMP = {
    "calculate_output": "0.5 * exact + 0.5",
    "graders": {"input": "{{ sample.output_text }}", "name": "exact", "operation": "eq",
                "reference": "{{ item.answer }}", "type": "string_check"},
    "name": "mix",
    "type": "multi",
}


def test_multi_accepts_one_grader_object_as_openais_sdk_writes_it():
    assert validate_grader_spec(SDK_MULTI_DUMP) == []
    grader = build_grader(SDK_MULTI_DUMP)
    assert list(grader.graders) == ["exact"]
    assert grader.grade("Paris", {"answer": "Paris"}).to_dict() == {
        "reward": 1.0, "sub_rewards": {"exact": 1.0}, "errors": []}
    assert grader.grade("Lyon", {"answer": "Paris"}).reward == 0.5


def test_multi_built_from_the_openai_sdk_type_model_dump():
    graders = pytest.importorskip("openai.types.graders")
    sub = graders.StringCheckGrader(type="string_check", name="exact", operation="eq",
                                    input="{{ sample.output_text }}", reference="{{ item.answer }}")
    try:  # the SDK's own shape: one grader object (newer SDKs) or a {name: grader} map (1.x)
        sdk = graders.MultiGrader(type="multi", name="mix", calculate_output="0.5 * exact + 0.5", graders=sub)
    except ValueError:
        sdk = graders.MultiGrader(type="multi", name="mix", calculate_output="0.5 * exact + 0.5",
                                  graders={"exact": sub})
    spec = sdk.model_dump()
    assert validate_grader_spec(spec) == []
    with build_grader(spec) as grader:
        assert [grader.grade(text, {"answer": "Paris"}).reward for text in ("Paris", "Lyon")] == [1.0, 0.5]


def test_multi_one_grader_object_needs_a_name_and_the_formula_must_use_it():
    unnamed = {**SDK_MULTI_DUMP, "graders": {k: v for k, v in SDK_MULTI_DUMP["graders"].items() if k != "name"}}
    assert validate_grader_spec(unnamed) == [
        "multi 'mix': graders is one string_check grader without a 'name' for calculate_output to use"]
    wrong_name = {**SDK_MULTI_DUMP, "calculate_output": "other"}
    assert validate_grader_spec(wrong_name) == [
        "multi 'mix': calculate_output uses unknown sub-grader(s) other (graders: exact)"]
    broken = {**SDK_MULTI_DUMP, "graders": {**SDK_MULTI_DUMP["graders"], "operation": "contains"}}
    assert any(p.startswith("graders.exact: string_check 'exact': operation 'contains'")
               for p in validate_grader_spec(broken))


# ----------------------------------------------------------------------------- validation and loading


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"type": "regex"}, "unknown grader type 'regex'"),
        ({"name": "x"}, "grader spec has no 'type'"),
        ([1, 2], "a grader spec is a mapping"),
        ({"type": "string_check", "operation": "eq", "input": "x"}, "missing field 'reference'"),
        ({**string_check("contains")}, "operation 'contains' is not one of eq, ne, like, ilike"),
        ({**similarity("jaccard")}, "evaluation_metric 'jaccard' is not one of"),
        ({**string_check("eq"), "refrence": "x"}, "unknown field 'refrence'; did you mean 'reference'?"),
        ({"type": "numeric_match", "partial_credit": 2}, "partial_credit must be in [0, 1]"),
        ({"type": "numeric_match", "rel_tol": "small"}, "field 'rel_tol' should be a number"),
        ({"type": "rank", "scores": [1, "a"]}, "scores must be numbers in [0, 1]"),
        ({"type": "python", "source": "def score(sample, item):\n    return 1"}, "does not define grade(sample, item)"),
        ({"type": "python", "source": "def grade(sample):\n    return 1"}, "grade must take two arguments"),
        ({"type": "python", "source": "def grade(sample, item)\n    return 1"}, "source does not parse"),
        ({"type": "python"}, "missing field 'source'"),
        ({"type": "score_model", "model": "m", "input": [{"role": "judge", "content": "x"}]}, "role should be one of"),
        ({"type": "score_model", "model": "m", "input": "x", "range": [10, 0]}, "range should be [lo, hi]"),
        ({"type": "score_model", "model": "m", "input": "x", "sampling_params": {"temp": 1}}, "unknown sampling_params key 'temp'"),
        ({"type": "score_model", "model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
         "only text content is supported"),
        ({"type": "label_model", "model": "m", "input": "x", "labels": ["a", "b"], "passing_labels": ["c"]},
         "passing_labels ['c'] are not in labels"),
        ({"type": "multi", "graders": {"a": {"type": "string_check"}}, "calculate_output": "a"},
         "graders.a: string_check: missing field 'input'"),
    ],
)
def test_validate_grader_spec_reports_problems(spec, problem):
    problems = validate_grader_spec(spec)
    assert any(problem in p for p in problems), problems
    if isinstance(spec, dict):
        with pytest.raises(GraderSpecError, match="invalid grader spec"):
            build_grader(spec)


def test_grader_types_come_from_the_one_dispatch_table():
    assert GRADER_TYPES == tuple(GRADERS) == (
        "string_check", "text_similarity", "python", "score_model", "label_model", "multi", "numeric_match", "rank")
    assert all(callable(entry.check) and callable(entry.build) for entry in GRADERS.values())
    assert validate_grader_spec({"type": "regex"}) == [
        "unknown grader type 'regex' (one of string_check, text_similarity, python, score_model, label_model, "
        "multi, numeric_match, rank)"]
    assert validate_grader_spec({"type": ["multi"]})[0].startswith("unknown grader type ['multi']")


def test_validate_accepts_openai_fields():
    spec = {"type": "score_model", "name": "judge", "model": "gpt-4o-mini", "pass_threshold": 0.5, "range": [0, 10],
            "input": [{"type": "message", "role": "developer", "content": "Rate {{ sample.output_text }}"}],
            "sampling_params": {"temperature": 1, "top_p": 1, "seed": 42, "max_completions_tokens": 16,
                                "reasoning_effort": "low"}}
    assert validate_grader_spec(spec) == []
    assert validate_grader_spec({"type": "python", "name": "p", "image_tag": "2025-05-08",
                                 "source": "from mymod import grade"}) == []


@pytest.mark.parametrize("path", sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".json", ".yaml")
                                         and not p.name.endswith(".example.json")), ids=lambda p: p.name)
def test_example_specs_are_valid(path):
    assert validate_grader_spec(load_grader_spec(path)) == []


def test_load_grader_spec_json_yaml_and_by_content(tmp_path):
    spec = string_check("eq")
    (tmp_path / "g.json").write_text(json.dumps(spec))
    (tmp_path / "g.yml").write_text("type: string_check\nname: check\noperation: eq\ninput: '{{ sample.output_text }}'\n"
                                    "reference: '{{ item.answer }}'\n")
    (tmp_path / "g.spec").write_text(json.dumps(spec))
    assert load_grader_spec(tmp_path / "g.json") == spec
    assert load_grader_spec(tmp_path / "g.yml") == spec
    assert load_grader_spec(tmp_path / "g.spec") == spec


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.json", None, "grader file not found"),
        ("bad.json", "{not json", "not valid JSON"),
        ("bad.yaml", "a: [1, 2", "not valid YAML"),
        ("list.yaml", "- 1\n- 2", "a grader spec is a mapping"),
    ],
)
def test_load_grader_spec_errors_name_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(GraderSpecError, match=message) as info:
        load_grader_spec(path)
    assert str(path) in str(info.value)


def test_grader_config_file_resolves_through_load_grader_spec(tmp_path):
    path = tmp_path / "grader.yaml"
    path.write_text("type: rank\nname: r\n")
    assert GraderConfig(file=str(path)).resolved_spec() == {"type": "rank", "name": "r"}
    assert GraderConfig().resolved_spec() == DEFAULT_GRADER


# ----------------------------------------------------------------------------- batches


def test_grade_batch_preserves_order_and_summarize_counts_errors():
    grader = build_grader(numeric(partial_credit=0.1))
    samples = ["#### 1", "#### 2", "none", {"output_text": "#### 4"}, "#### 5"]
    items = [{"reference": 1}, {"reference": 3}, {"reference": 3}, {"reference": 4}, {"reference": "n/a"}]
    results = grade_batch(grader, samples, items, workers=4)  # cheap grader: serial, same result
    assert [r.reward for r in results] == [1.0, 0.1, 0.0, 1.0, None]
    summary = summarize(results)
    assert summary["count"] == 5 and summary["errors"] == 1 and summary["error_rate"] == 0.2
    assert summary["mean_reward"] == pytest.approx((1.0 + 0.1 + 0.0 + 1.0) / 4)
    assert summary["top_errors"][0]["count"] == 1 and "holds no number" in summary["top_errors"][0]["error"]


def test_summarize_empty_and_all_errors():
    assert summarize([]) == {"count": 0, "errors": 0, "error_rate": 0.0, "mean_reward": None, "top_errors": []}
    assert summarize([GradeResult.failure("x: y")])["mean_reward"] is None


def test_grade_batch_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 samples but 1 items"):
        grade_batch(build_grader(numeric()), ["a", "b"], [{}])


def test_grade_never_raises_on_bad_item_type():
    result = build_grader(numeric()).grade("#### 1", ["not", "a", "dict"])  # type: ignore[arg-type]
    assert result.reward is None and "an item is a dict" in result.errors[0]


# ----------------------------------------------------------------------------- docstring examples


@pytest.mark.parametrize(
    "module",
    ["__init__", "base", "templates", "string_check", "similarity", "numeric", "math_reader", "rank", "multi",
     "python_grader", "model_graders", "batch"],
)
def test_docstring_examples_hold(module):
    import doctest
    import importlib

    name = "rft_core.graders" if module == "__init__" else f"rft_core.graders.{module}"
    failures, _ = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert failures == 0
