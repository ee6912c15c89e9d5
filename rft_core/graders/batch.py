"""Grading many samples: `grade_batch` (order preserved, parallel where it pays) and `summarize`.

Parallelism follows the grader's cost. Graders that wait on another process or server (the
python sandbox, a judge behind `base_url`, a multi grader holding one) are driven from
`workers` threads: the python grader's pool then runs that many sandbox processes, and HTTP
judges get that many requests in flight. Cheap in-process graders (string checks, numbers,
similarity metrics) and local judge models run serially in the calling process, where the
overhead of shipping samples elsewhere would cost more than it saves.

>>> from rft_core.graders import build_grader
>>> grader = build_grader({"type": "numeric_match", "partial_credit": 0.1})
>>> results = grade_batch(grader, ["#### 18", "#### 17", "no idea"], [{"reference": 18}] * 3)
>>> [r.reward for r in results]
[1.0, 0.1, 0.0]
>>> summarize(results)["mean_reward"]
0.3666666666666667
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rft_core.graders.base import Grader, GradeResult, Sample


def _grade_one(grader: Grader, sample: Sample, item: Mapping[str, Any]) -> GradeResult:
    try:
        return grader.grade(sample, item)
    except Exception as exc:  # grade() catches grader failures; this guards the batch itself
        return GradeResult.failure(f"{grader.name}: {type(exc).__name__}: {exc}")


def grade_batch(
    grader: Grader,
    samples: Sequence[Sample],
    items: Sequence[Mapping[str, Any]],
    *,
    workers: int = 0,
) -> list[GradeResult]:
    """Grade `samples[i]` against `items[i]` for every i; results in the same order.

    `workers` > 1 grades that many samples at once when the grader benefits (see the module
    docstring); 0 or 1 grades one at a time. Failures are error results, never exceptions.
    """
    if len(samples) != len(items):
        raise ValueError(f"{len(samples)} samples but {len(items)} items: they are paired by position")
    pairs = list(zip(samples, items, strict=True))
    if workers > 1 and grader.concurrent and len(pairs) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(pairs)), thread_name_prefix="grade") as pool:
            return list(pool.map(lambda pair: _grade_one(grader, *pair), pairs))
    return [_grade_one(grader, sample, item) for sample, item in pairs]


def summarize(results: Sequence[GradeResult], *, top_errors: int = 5) -> dict[str, Any]:
    """Counts and the mean reward over the results that have one.

    Returns `count`, `errors` (error results), `error_rate`, `mean_reward` (over non-error
    results; None when there are none) and `top_errors` (the most frequent error messages
    with their counts).
    """
    count = len(results)
    rewards = [r.reward for r in results if r.ok and r.reward is not None]
    failed = [r for r in results if not r.ok]
    messages = Counter(r.errors[0] if r.errors else "no reward" for r in failed)
    return {
        "count": count,
        "errors": len(failed),
        "error_rate": len(failed) / count if count else 0.0,
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "top_errors": [{"error": message, "count": n} for message, n in messages.most_common(top_errors)],
    }
