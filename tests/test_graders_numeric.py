"""numeric_match on answers as models write them: `\\boxed{}` with nested braces, LaTeX fractions,
`{,}` thousands, `<answer>` tags, symbolic equivalence through math-verify, and the guards that
keep math-verify safe inside a training run (bounded input, no signals, loaded only when needed)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rft_core.graders import build_grader
from rft_core.graders.numeric import equivalent, extract_answer, extract_number, parse_number


def grade(output: str, reference: str, partial_credit: float = 0.1) -> float | None:
    grader = build_grader({"type": "numeric_match", "name": "answer", "partial_credit": partial_credit})
    result = grader.grade(output, {"reference": reference})
    assert result.errors == []
    return result.reward


# ----------------------------------------------------------------------------- the reported defects


@pytest.mark.parametrize(
    ("output", "reference"),
    [
        (r"Each share is $\boxed{\frac{1}{2}}$.", "0.5"),  # was read as 1
        (r"In all: $\boxed{1{,}000}$ bricks.", "1000"),  # was read as 000
        (r"$2^{10} = 1024$, so $\boxed{2^{10}}$", "1024"),  # was read as 10
        ("<answer>42</answer>\nCheck: 6 * 7 = 42, and 40 + 3 = 43.", "42"),  # was read as 43
    ],
)
def test_reported_answers_score_full_credit(output, reference):
    assert grade(output, reference) == 1.0


@pytest.mark.parametrize(
    ("output", "answer", "value"),
    [
        (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}", 0.5),
        (r"\boxed{1{,}000}", "1{,}000", 1000.0),
        (r"\boxed{2^{10}}", "2^{10}", 1024.0),
        ("<answer>42</answer> then 6 * 7 = 43", "42", 42.0),
        (r"\boxed{\dfrac{3}{4}}", r"\dfrac{3}{4}", 0.75),
        (r"so it is \tfrac{1}{4} of the cake", r"\tfrac{1}{4}", 0.25),
        (r"#### \frac{3}{4}", r"\frac{3}{4}", 0.75),
        (r"\boxed{\frac34}", r"\frac34", 0.75),
        (r"\boxed{-\frac{1}{2}}", r"-\frac{1}{2}", -0.5),
        (r"\boxed{1\frac{1}{2}}", r"1\frac{1}{2}", 1.5),  # a mixed number
        (r"It is 1\,000 m long.", r"1\,000", 1000.0),
        (r"\boxed{1{,}234{,}567}", "1{,}234{,}567", 1234567.0),
        (r"\boxed{50\%}", r"50\%", 50.0),
        (r"\boxed{\$1{,}234.50}", r"\$1{,}234.50", 1234.5),
        (r"\boxed{x = 5}", "5", 5.0),  # the right of the last '='
        (r"\boxed{18 \text{ apples}}", "18", 18.0),  # units around the number
        (r"The answer is $\frac{\sqrt{3}}{2}$.", r"\frac{\sqrt{3}}{2}", 0.8660254037844386),
        (r"<answer>The total is 42 apples.</answer>", "42", 42.0),  # prose in a tag: the usual rules
        (r"<answer>\boxed{7}</answer>", "7", 7.0),
    ],
)
def test_extract_answer_and_parse_number_read_latex_and_tags(output, answer, value):
    assert extract_answer(output) == answer
    assert parse_number(answer) == pytest.approx(value, rel=1e-12)
    assert extract_number(output) == pytest.approx(value, rel=1e-12)


# ----------------------------------------------------------------------------- which answer counts


def test_last_box_wins_and_a_truncated_last_box_is_skipped():
    assert extract_answer(r"\boxed{5} no, wait: \boxed{7}") == "7"
    assert extract_answer(r"\boxed{5} then \boxed{\frac{1}{") == "5"
    assert extract_answer(r"It is 12, so \boxed{1") == "1"  # no complete box: the last number


def test_answer_tag_beats_boxes_and_markers_outside_it():
    text = r"<think>maybe \boxed{5}, #### 6</think><answer>7</answer> #### 8"
    assert extract_answer(text) == "7"


def test_a_whole_text_latex_reference_is_one_answer_not_its_last_number():
    assert extract_answer(r"\frac{\sqrt{3}}{2}") == r"\frac{\sqrt{3}}{2}"  # not "2"
    assert extract_answer("$x^2 + 1$") == "x^2 + 1"
    assert extract_answer("5 + 13 = 18") == "18"  # plain arithmetic keeps the last number


@pytest.mark.parametrize(
    ("output", "reference", "reward"),
    [
        (r"\boxed{\frac{1}{3}}", "2", 0.1),  # an answer, but wrong: partial credit
        (r"\boxed{2^{10}}", "10", 0.1),
        ("<answer>42</answer> then 44", "44", 0.1),
        ("<answer>I do not know</answer>", "42", 0.0),  # no answer at all: 0
        (r"\boxed{\text{Monday}}", "5", 0.0),
        ("I cannot solve this.", r"\frac{1}{2}", 0.0),
    ],
)
def test_partial_credit_only_when_an_answer_was_extracted(output, reference, reward):
    assert grade(output, reference) == reward


def test_existing_formats_still_score_with_latex_references():
    assert grade("#### 0.5", r"\boxed{\frac{1}{2}}") == 1.0  # a MATH-style solution as the reference
    assert grade("She has 1,000 bricks. #### 1,000", r"1{,}000") == 1.0
    assert grade("#### 50%", r"50\%") == 1.0


# ----------------------------------------------------------------------------- symbolic equivalence


@pytest.mark.parametrize(
    ("output", "reference", "reward"),
    [
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
        (r"\boxed{\frac{\sqrt{6}}{4}}", r"\frac{\sqrt{3}}{2\sqrt{2}}", 1.0),
        (r"\boxed{1 + x^2}", "x^2+1", 1.0),
        (r"\boxed{x^2 + 2}", "x^2+1", 0.1),
        (r"\boxed{(1, 2)}", r"\left(1,2\right)", 1.0),  # intervals
        (r"\boxed{\{2, 1\}}", r"\{1, 2\}", 1.0),  # sets
        (r"\boxed{\pi}", r"\pi", 1.0),
        (r"\boxed{3.14159265}", r"\pi", 1.0),  # pi has a value: the tolerance decides
        (r"\boxed{3.14}", r"\pi", 0.1),
        (r"\boxed{5}", "x^2+1", 0.1),
    ],
)
def test_symbolic_answers_are_compared_by_math_verify(output, reference, reward):
    assert grade(output, reference) == reward


def test_equivalent_is_symmetric_enough_for_answers():
    assert equivalent("1 + x^2", "x^2+1") and not equivalent("x^2+2", "x^2+1")
    assert not equivalent("", "1") and not equivalent("1", "")


def test_references_that_hold_no_math_are_error_results():
    grader = build_grader({"type": "numeric_match", "name": "answer"})
    for reference in ("five", r"\boxed{\text{Monday}}"):
        result = grader.grade("#### 5", {"reference": reference})
        assert result.reward is None and "holds no number" in result.errors[0]


# ----------------------------------------------------------------------------- safety inside training


def test_intractable_powers_are_wrong_answers_not_a_stalled_run():
    started = time.monotonic()
    assert grade(r"\boxed{9^{9^{9}}}", "5") == 0.1  # sympy would compute 9^387420489 exactly
    assert grade(r"\boxed{99999!}", "5") == 0.1
    assert grade(r"\boxed{2^2^2^2}", "65536") == 0.1  # a chained power is refused, not evaluated
    assert time.monotonic() - started < 5.0
    assert parse_number(r"9^{9^{9}}") is None and parse_number(r"2^{99999}") is None  # inf is no value


def test_math_verify_runs_in_threads_and_leaves_alarms_alone():
    # math-verify's own timeout is signal.alarm: it fails outside the main thread and cancels the
    # alarms of others (pytest-timeout, Prefect task timeouts). We never let it set one.
    previous = signal.signal(signal.SIGALRM, lambda *args: None)
    signal.setitimer(signal.ITIMER_REAL, 60.0)
    try:
        assert equivalent(r"\frac{\sqrt{8}}{4}", r"\frac{1}{\sqrt{2}}")
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 50.0
        with ThreadPoolExecutor(4) as pool:
            rewards = list(pool.map(lambda k: grade(rf"\boxed{{\sqrt{{{k * k}}}}}", str(k)), range(2, 10)))
        assert rewards == [1.0] * 8
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_plain_answers_never_load_math_verify():
    code = (
        "import sys\n"
        "from rft_core.graders import build_grader\n"
        "g = build_grader({'type': 'numeric_match', 'partial_credit': 0.1})\n"
        r"outs = ['#### 18', 'The answer is 1,234.', '\\boxed{\\frac{1}{2}}', '<answer>7</answer>', '\\boxed{1{,}000}']" "\n"
        "rewards = [g.grade(o, {'reference': '18'}).reward for o in outs]\n"
        "print(rewards, 'math_verify' in sys.modules, 'sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[1.0, 0.1, 0.1, 0.1, 0.1] False False"


# ----------------------------------------------------------------------------- majority voting


def test_majority_vote_groups_latex_and_plain_spellings_of_one_answer():
    from rft_core.evaluate import pass_and_majority  # loads torch and transformers: only here

    texts = [["#### 3", r"\boxed{\frac{1}{2}}", "#### 0.5"]]
    assert pass_and_majority(texts, [[0.0, 1.0, 1.0]], 1.0) == (1.0, 1.0)
    texts = [["#### 7", r"<answer>1{,}000</answer> not 7", r"\boxed{1000}"]]
    assert pass_and_majority(texts, [[0.0, 1.0, 1.0]], 1.0) == (1.0, 1.0)
