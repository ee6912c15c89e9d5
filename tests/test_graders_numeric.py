"""numeric_match on answers as models write them: the class of answer forms read whole (never cut
to their first digits) or refused, `\\boxed{}` with nested braces, LaTeX fractions, `{,}` thousands,
`<answer>` tags, symbolic equivalence through math-verify, and the guards that keep sympy safe inside
a training run (bounded input, a worker process with a deadline, no signals, never in this process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rft_core.graders import build_grader
from rft_core.graders.numeric import equivalent, extract_answer, extract_number, parse_number


def grade(output: str, reference: str, partial_credit: float = 0.1) -> float | None:
    grader = build_grader({"type": "numeric_match", "name": "answer", "partial_credit": partial_credit})
    result = grader.grade(output, {"reference": reference})
    assert result.errors == []
    return result.reward


# ----------------------------------------------------------------------------- the class of answer forms

# (sample, the value it states, a near miss): each sample is read whole, so it scores 1.0 against
# its value and only the partial credit of a wrong answer against the near miss, which is mostly
# what reading its first digits would give (`#### 1e5` was read as 1, `#### 2^{10}` as 2).
READ_WHOLE = [
    # scientific notation
    ("#### 1e5", 100000.0, "1"),
    ("#### 1.5e-3", 0.0015, "1.5"),
    ("The answer is 2.5E+4.", 25000.0, "2.5"),
    ("#### -3e2", -300.0, "-3"),
    # powers
    ("#### 2^{10}", 1024.0, "2"),
    ("#### 2^10", 1024.0, "210"),
    ("#### 10^{-2}", 0.01, "10"),
    ("#### 2**10", 1024.0, "2"),
    (r"so the total is $2^{10}$ bytes", 1024.0, "10"),
    # products with a power of ten
    (r"#### 3 \times 10^{4}", 30000.0, "3"),
    ("#### 3·10^4", 30000.0, "3"),
    ("#### 3 × 10^4", 30000.0, "310"),
    ("#### 3 x 10^4", 30000.0, "3"),
    (r"\boxed{1.5 \times 10^{-3}}", 0.0015, "1.5"),
    # fractions and mixed numbers
    (r"\boxed{\frac{1}{2}}", 0.5, "1"),
    (r"#### \dfrac{3}{4}", 0.75, "3"),
    ("#### 3/4", 0.75, "3"),
    ("#### 1 1/2", 1.5, "1"),
    (r"\boxed{2\frac{3}{4}}", 2.75, "2"),
    # signs
    ("It fell by 7 degrees. #### -7", -7.0, "7"),
    ("#### \u22127", -7.0, "7"),  # U+2212 minus
    ("#### -$18.50", -18.5, "18.5"),
    # percentages
    ("#### 50%", 50.0, "5"),
    (r"\boxed{12.5\%}", 12.5, "12"),
    # thousands separators
    ("#### 1,000", 1000.0, "1"),
    (r"\boxed{1{,}000}", 1000.0, "1"),
    ("#### 1 000", 1000.0, "1"),
    ("#### 1\u202f000\u202f000", 1000000.0, "1"),  # narrow no-break spaces
    (r"It is 1\,000 m long.", 1000.0, "1"),
    # currency
    ("#### $18.50", 18.5, "18"),
    (r"\boxed{\$1{,}234.50}", 1234.5, "1"),
    ("#### €7", 7.0, "8"),
    # units after the number
    ("#### 18 dollars", 18.0, "19"),
    ("#### 18 cm", 18.0, "1"),
    ("#### 18cm", 18.0, "1"),
    ("He earns $5 a day, so #### 5 a day", 5.0, "6"),
    (r"\boxed{18 \text{ cm}}", 18.0, "1"),
    (r"\boxed{5\,\text{m}^2}", 5.0, "2"),
    # a trailing period, an exclamation mark, a following remark
    ("The answer is 18.", 18.0, "1"),
    ("So the answer is 42!", 42.0, "4"),
    ("#### 18 (9 * 2)", 18.0, "2"),
    # where the answer is
    (r"Thus $\boxed{18}$.", 18.0, "1"),
    ("<answer>18</answer> Check: 9 * 2 = 17", 18.0, "17"),
    ("<answer>1e5</answer>", 100000.0, "1"),
    ("The answer is $2^{10}$.", 1024.0, "2"),
    ("so we get 1e5", 100000.0, "5"),  # no marker: the last span, whole
    # degrees
    ("#### 90°", 90.0, "9"),
    (r"\boxed{90^\circ}", 90.0, "9"),
    (r"\boxed{90^{\circ}}", 90.0, "9"),
    # roots and pi
    (r"\boxed{\sqrt{16}}", 4.0, "16"),
    (r"\boxed{2\pi}", 2 * 3.141592653589793, "2"),
]


@pytest.mark.parametrize(("sample", "value", "near_miss"), READ_WHOLE, ids=[row[0] for row in READ_WHOLE])
def test_answer_forms_are_read_whole(sample, value, near_miss):
    assert extract_number(sample) == pytest.approx(value, rel=1e-12)
    assert grade(sample, repr(value)) == 1.0
    assert grade(sample, near_miss) == 0.1  # read, and wrong: partial credit, never a match


@pytest.mark.parametrize(("sample", "value", "near_miss"), READ_WHOLE, ids=[row[0] for row in READ_WHOLE])
def test_references_are_read_by_the_same_rules(sample, value, near_miss):
    assert grade(f"#### {value!r}", sample) == 1.0
    assert grade(f"#### {near_miss}", sample) == 0.1


# Answers that are not one readable number: no answer at all (0.0, no partial credit), whatever
# the reference, and never their first digits.
REFUSED = [
    ("#### 1e5e5", "malformed scientific notation"),
    ("#### 2e", "a number glued to e"),
    ("#### 2^", "an operator without its operand"),
    ("#### 12 34", "numbers side by side"),
    ("#### 2^2^3", "a chained power, ambiguous"),
    ("#### 10^{10^{10}}", "a nested power"),
    ("#### 9^9^9^9", "a chained power"),
    ("#### 10^{400}", "not finite as a float"),
    ("#### 1e400", "not finite as a float"),
    ("#### 1/0", "division by zero"),
    (r"\boxed{\frac{1}{0}}", "division by zero"),
    (r"\boxed{(1000!)!}", "a factorial of a computed number"),
    (r"\boxed{99999!}", "a factorial of a large number"),
    (r"\boxed{\sum_{i=1}^{9999} i^{9999}}", "a big operator"),
    (r"\boxed{\text{Monday}}", "prose"),
    ("#### five", "prose"),
    (r"\boxed{" + "1+" * 150 + "1}", "longer than MAX_MATH_CHARS"),
]


@pytest.mark.parametrize(("sample", "why"), REFUSED, ids=[row[0][:40] for row in REFUSED])
def test_unreadable_answers_are_no_answer_never_their_first_digits(sample, why):
    assert extract_number(sample) is None, why
    first_digits = next((c for c in sample if c.isdigit()), "1")
    for reference in (first_digits, "100000", "1024"):
        assert grade(sample, reference) == 0.0, why


@pytest.mark.parametrize("reference", ["10^{10^{10}}", "1e5e5", "9^9^9^9", "12 34", "five"])
def test_unreadable_references_are_error_results(reference):
    grader = build_grader({"type": "numeric_match", "name": "answer", "partial_credit": 0.1})
    result = grader.grade("#### 5", {"reference": reference})
    assert result.reward is None and "holds no number" in result.errors[0]


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


def test_intractable_math_is_refused_quickly_and_never_computed():
    started = time.monotonic()
    for hostile in (r"\boxed{9^{9^{9}}}", r"\boxed{10^{10^{10}}}", "#### 9^9^9^9", r"\boxed{99999!}",
                    r"\boxed{2^2^2^2}", r"\boxed{(10^{9999})^{9999}}", r"\boxed{2^{99999}}",
                    r"\boxed{\prod_{i=1}^{9999} i^{9999}}", r"\boxed{((5!)!)!}"):
        assert grade(hostile, "5") == 0.0, hostile  # refused: no answer, no partial credit
        assert grade(hostile, "65536") == 0.0, hostile
    # far from the noise: each is refused before sympy or evaluated in floating point
    assert time.monotonic() - started < 60.0
    assert parse_number(r"9^{9^{9}}") is None and parse_number(r"2^{99999}") is None


def test_a_symbolic_check_past_the_deadline_is_not_equal_and_the_worker_is_replaced(monkeypatch, caplog):
    from rft_core.graders import math_reader

    monkeypatch.setattr(math_reader, "MATH_TIMEOUT_S", 1.0)
    assert grade(r"\boxed{x + 1}", "x + 1") == 1.0  # the worker is up
    before = math_reader._worker.process.pid
    # sympy's simplify expands this for minutes; the deadline ends it
    assert grade(r"\boxed{(x+y+z)^{99}}", "(x+y+z)^{98}") == 0.1
    assert "took longer than 1 s" in caplog.text
    assert grade(r"\boxed{x + 2}", "x + 2") == 1.0  # grading goes on, in a new worker
    assert math_reader._worker.process.pid != before


def test_the_math_worker_ends_with_its_parent(tmp_path):
    script = (
        "import sys, time\n"
        "from rft_core.graders import math_reader\n"
        "from rft_core.graders.numeric import parse_number\n"
        "assert parse_number('2^{10}') == 1024.0\n"
        "print(math_reader._worker.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30.0
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _running(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


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


def test_this_process_never_imports_sympy_and_plain_answers_start_no_worker():
    code = (
        "import sys\n"
        "from rft_core.graders import build_grader, math_reader\n"
        "g = build_grader({'type': 'numeric_match', 'partial_credit': 0.1})\n"
        r"outs = ['#### 18', 'The answer is 1,234.', '\\boxed{\\frac{1}{2}}', '<answer>7</answer>', '\\boxed{1{,}000}', '#### 1e5']" "\n"
        "rewards = [g.grade(o, {'reference': '18'}).reward for o in outs]\n"
        "plain_worker = math_reader._worker\n"
        r"latex = g.grade('\\boxed{2^{4} + 2}', {'reference': '18'}).reward" "\n"
        "print(rewards, plain_worker, latex, 'math_verify' in sys.modules, 'sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[1.0, 0.1, 0.1, 0.1, 0.1, 0.1] None 1.0 False False"


# ----------------------------------------------------------------------------- majority voting


def test_majority_vote_groups_latex_and_plain_spellings_of_one_answer():
    from rft_core.evaluate import pass_and_majority  # loads torch and transformers: only here

    texts = [["#### 3", r"\boxed{\frac{1}{2}}", "#### 0.5"]]
    assert pass_and_majority(texts, [[0.0, 1.0, 1.0]], 1.0) == (1.0, 1.0)
    texts = [["#### 7", r"<answer>1{,}000</answer> not 7", r"\boxed{1000}"]]
    assert pass_and_majority(texts, [[0.0, 1.0, 1.0]], 1.0) == (1.0, 1.0)
