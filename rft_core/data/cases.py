"""The built-in ranking task: case reports -> a ranked list of likely causes (`data.synthetic.task: rank`).

    Woman, 34. Has fever, cough, fatigue. No loss of smell. Likely causes?
    ->  flu: fever, cough, fatigue = 3
        covid: fever, cough, fatigue, no loss of smell = 2
        bronchitis: cough, fatigue = 2
        Ranking: flu, covid, bronchitis

A toy catalogue (not medical knowledge) of ten causes, each with a profile of typical findings and
the probability that a case of that cause shows each of them. The causes come in five sibling
pairs that share all but one finding each (flu has body aches where covid has loss of smell), and
common findings (fever, cough, fatigue, sore throat, headache) cross the pairs, so telling siblings
apart needs the findings that are absent as much as the ones that are present.

The ranking rule, which the worked solution carries out: a cause scores one point for each present
finding of its profile and loses one for each absent finding of its profile; causes are ranked by
score, ties in catalogue order. The solution tallies the three leading causes, then ranks them on a
comma line (what the `rank` grader reads when there is no numbered or bulleted list).

A case is drawn from its true cause (profile findings present with their probabilities, sometimes
one unrelated finding, then a few pertinent negatives: findings the patient lacks, chosen mostly
from the profiles of the competing causes), and kept only when the rule ranks the true cause first,
alone: the reference is then both the cause that produced the case and the one the evidence points
to, so a worked solution always scores 1.0. The basic information (age, sex) is context the
catalogue does not use.

Records are OpenAI-shaped, `{"messages": [user prompt], "reference": cause, "solution"?,
"needs_absent"}`: the `rank` grader reads `{{ item.reference }}`; `needs_absent` says whether the
present findings alone tie or mislead (only the absent ones single the cause out). Causes are
balanced exactly (no constant answer beats 1/10), train and validation are disjoint by findings
(age and sex aside), and everything follows from the seed. `pretraining_documents` writes generic
text of the family: profiles, finding-to-cause associations, single-cause tallies, short cases.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import combinations

from rft_core.config import SyntheticConfig

# fmt: off
# Each sibling pair shares its profile but for one finding, with the same probabilities, so
# neither sibling is the better guess until that finding (present or absent) is known.
CATALOGUE: dict[str, dict[str, float]] = {
    "flu":            {"fever": 0.9, "cough": 0.8, "fatigue": 0.7, "headache": 0.5, "body aches": 0.5},
    "covid":          {"fever": 0.9, "cough": 0.8, "fatigue": 0.7, "headache": 0.5, "loss of smell": 0.5},
    "cold":           {"runny nose": 0.9, "sneezing": 0.8, "cough": 0.6, "sore throat": 0.5},
    "allergy":        {"runny nose": 0.9, "sneezing": 0.8, "cough": 0.6, "itchy eyes": 0.5},
    "strep":          {"sore throat": 0.9, "fever": 0.8, "swollen glands": 0.7, "headache": 0.5},
    "mono":           {"sore throat": 0.9, "fever": 0.8, "swollen glands": 0.7, "fatigue": 0.5},
    "pneumonia":      {"cough": 0.9, "short breath": 0.8, "chest pain": 0.6, "fever": 0.5},
    "bronchitis":     {"cough": 0.9, "short breath": 0.8, "chest pain": 0.6, "fatigue": 0.5},
    "stomach bug":    {"nausea": 0.9, "diarrhea": 0.8, "vomiting": 0.7, "fever": 0.5},
    "food poisoning": {"nausea": 0.9, "diarrhea": 0.8, "vomiting": 0.7, "cramps": 0.5},
}
# fmt: on
CAUSES = tuple(CATALOGUE)
FINDINGS = tuple(dict.fromkeys(f for profile in CATALOGUE.values() for f in profile))
LIST_LENGTH = 3  # causes in a worked solution's ranking (the rank config scores three positions)
MIN_PRESENT, MAX_PRESENT = 2, 4
MIN_ABSENT, MAX_ABSENT = 1, 3
UNRELATED_FINDING = 0.15  # share of cases with one present finding their cause does not explain
# Weights of the kinds of absent finding a report lists (see _draw_absent).
_DECISIVE, _PERTINENT, _ATYPICAL, _OTHER = 12.0, 3.0, 1.0, 0.3
_CASE_RE = re.compile(r"Has ([^.]+)\.(?: No ([^.]+)\.)?")


@dataclass(frozen=True)
class Case:
    """One case report: basic information, findings present and absent (in report order), its cause."""

    age: int
    sex: str  # "Man" or "Woman"
    present: tuple[str, ...]
    absent: tuple[str, ...]
    cause: str

    def prompt(self) -> str:
        text = f"{self.sex}, {self.age}. Has {', '.join(self.present)}."
        if self.absent:
            text += f" No {', '.join(self.absent)}."
        return text + " Likely causes?"

    def key(self) -> tuple[frozenset[str], frozenset[str]]:
        """What makes two cases the same problem: the findings, whatever their order, age or sex."""
        return frozenset(self.present), frozenset(self.absent)

    def score(self, cause: str) -> int:
        profile = CATALOGUE[cause]
        return sum(f in profile for f in self.present) - sum(f in profile for f in self.absent)

    def ranking(self) -> list[str]:
        """Every cause, best first: by score, ties in catalogue order."""
        return sorted(CAUSES, key=lambda c: -self.score(c))

    def evidence(self, cause: str) -> str:
        """One line of the worked solution: the findings that count for or against `cause`.

        In the order of the cause's profile (as the pretraining text states it), not the report's:
        walking a memorised list and looking each finding up in the report is what a small model
        learns; findings the report does not mention are skipped.
        """
        mentioned = [f for f in CATALOGUE[cause] if f in self.present + self.absent]
        items = [f if f in self.present else f"no {f}" for f in mentioned]
        return f"{cause}: {', '.join(items) or 'none'} = {self.score(cause)}"

    def solution(self) -> str:
        """The tallies of the leading causes in catalogue order, then their ranking.

        Catalogue order, not rank order: the tallies come before the decision (siblings always in
        the same order), so the ranking line follows from numbers already written.
        """
        top = self.ranking()[:LIST_LENGTH]
        tallies = [self.evidence(c) for c in CAUSES if c in top]
        return "\n".join([*tallies, f"Ranking: {', '.join(top)}"])

    def first_alone(self) -> bool:
        """Whether the rule ranks the true cause first with no tie."""
        scores = sorted((self.score(c) for c in CAUSES if c != self.cause), reverse=True)
        return self.score(self.cause) > scores[0]

    def needs_absent(self) -> bool:
        """Whether the present findings alone leave the true cause tied or beaten."""
        only_present = Case(self.age, self.sex, self.present, (), self.cause)
        return not only_present.first_alone()


def findings_of(text: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(present, absent) findings, in order, of the first "Has ... No ..." in `text`; None if none."""
    match = _CASE_RE.search(text)
    if match is None:
        return None
    names = lambda part: tuple(f.strip().casefold() for f in (part or "").split(",") if f.strip())  # noqa: E731
    return names(match.group(1)), names(match.group(2))


def case_key(text: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """The findings key (see `Case.key`) of the case in `text`, None when it holds none."""
    findings = findings_of(text)
    return None if findings is None else (frozenset(findings[0]), frozenset(findings[1]))


def profile_overlaps() -> list[tuple[str, str, int, int]]:
    """(cause, cause, shared findings, findings in one profile only) for every pair that shares any."""
    pairs = []
    for a, b in combinations(CAUSES, 2):
        pa, pb = set(CATALOGUE[a]), set(CATALOGUE[b])
        if pa & pb:
            pairs.append((a, b, len(pa & pb), len(pa ^ pb)))
    return pairs


# --------------------------------------------------------------------------- drawing cases


def _draw_absent(rng: random.Random, cause: str, present: list[str], n: int) -> list[str]:
    """`n` findings the patient lacks, as a clinician would list them: mostly pertinent negatives.

    Decisive: in the profile of a rival (a cause that explains as many present findings as the true
    cause) but not of the true cause. Pertinent: the same for any competitor (a cause that explains
    some present finding). These are what rule causes out. Atypical: in the true cause's profile
    yet absent (cases vary). Other findings are listed rarely.
    """
    explained = lambda c: sum(f in CATALOGUE[c] for f in present)  # noqa: E731
    competitors = {c for c in CAUSES if c != cause and explained(c) > 0}
    rivals = {c for c in competitors if explained(c) >= explained(cause)}
    candidates = [f for f in FINDINGS if f not in present]
    weights = []
    for finding in candidates:
        if finding in CATALOGUE[cause]:
            weights.append(_ATYPICAL)
        elif any(finding in CATALOGUE[c] for c in rivals):
            weights.append(_DECISIVE)
        elif any(finding in CATALOGUE[c] for c in competitors):
            weights.append(_PERTINENT)
        else:
            weights.append(_OTHER)
    chosen: list[str] = []
    for _ in range(min(n, len(candidates))):
        i = rng.choices(range(len(candidates)), weights=weights)[0]
        chosen.append(candidates.pop(i))
        weights.pop(i)
    return chosen


def draw_case(
    rng: random.Random, cause: str, present_range: tuple[int, int] = (MIN_PRESENT, MAX_PRESENT),
    absent_range: tuple[int, int] = (MIN_ABSENT, MAX_ABSENT),
) -> Case:
    """One case of `cause` (not yet checked: see `Case.first_alone`)."""
    profile = CATALOGUE[cause]
    low, high = present_range
    while True:
        present = [f for f, p in profile.items() if rng.random() < p]
        if len(present) >= min(low, len(profile)):
            break
    rng.shuffle(present)
    if rng.random() < UNRELATED_FINDING:
        present.insert(rng.randint(0, len(present)), rng.choice([f for f in FINDINGS if f not in profile]))
    present = present[:high]
    absent = _draw_absent(rng, cause, present, rng.randint(*absent_range))
    sex = rng.choice(("Man", "Woman"))
    return Case(age=rng.randint(18, 80), sex=sex, present=tuple(present), absent=tuple(absent), cause=cause)


def _draw_set(rng: random.Random, n: int, forbidden: set) -> list[Case]:
    """`n` cases, causes balanced exactly, distinct findings keys, none of them in `forbidden`."""
    causes = [CAUSES[i % len(CAUSES)] for i in range(n)]
    rng.shuffle(causes)
    cases: list[Case] = []
    seen: set = set()
    for cause in causes:
        for _ in range(10_000):
            case = draw_case(rng, cause)
            key = case.key()
            if case.first_alone() and key not in seen and key not in forbidden:
                break
        else:
            raise ValueError(f"cannot draw {n} distinct cases of {cause!r}; ask for fewer items")
        seen.add(key)
        cases.append(case)
    return cases


def _record(case: Case, with_solution: bool) -> dict:
    record = {"messages": [{"role": "user", "content": case.prompt()}], "reference": case.cause}
    if with_solution:
        record["solution"] = case.solution()
    record["needs_absent"] = case.needs_absent()
    return record


def generate(cfg: SyntheticConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation) records, OpenAI-shaped; see the module docstring.

    Validation is drawn first from its own stream, so it does not change with `n_train`; every
    validation item and exactly round(solution_fraction * n_train) training items carry a solution.
    """
    val_rng = random.Random(f"rft-cases:{cfg.seed}:val")
    train_rng = random.Random(f"rft-cases:{cfg.seed}:train")
    val = _draw_set(val_rng, cfg.n_val, set())
    train = _draw_set(train_rng, cfg.n_train, {case.key() for case in val})
    with_solution = set(train_rng.sample(range(len(train)), round(cfg.solution_fraction * len(train))))
    return [_record(c, i in with_solution) for i, c in enumerate(train)], [_record(c, True) for c in val]


# --------------------------------------------------------------------------- pretraining text


def _profile_doc(rng: random.Random) -> str:
    cause = rng.choice(CAUSES)
    return f"{cause}: {', '.join(CATALOGUE[cause])}"  # the order the tallies walk


def _finding_doc(rng: random.Random) -> str:
    finding = rng.choice(FINDINGS)
    causes = [c for c in CAUSES if finding in CATALOGUE[c]]
    return f"{finding} is seen in {', '.join(causes)}"


def _small_case(rng: random.Random) -> Case:
    return draw_case(rng, rng.choice(CAUSES), present_range=(1, 3), absent_range=(0, 2))


def _tally_doc(rng: random.Random) -> str:
    """The solution's step for one cause: findings of a case, then that cause's evidence line."""
    case = _small_case(rng)
    header = case.prompt().rsplit(" Likely causes?", 1)[0].split(". ", 1)[1]
    return f"{header}\n{case.evidence(rng.choice(CAUSES))}"


def _case_doc(rng: random.Random) -> str:
    """A short case (fewer findings than the task's) with its worked solution."""
    while True:
        case = _small_case(rng)
        if case.first_alone():
            return f"{case.prompt()}\n{case.solution()}"


_DOC_KINDS = ((_profile_doc, 0.15), (_finding_doc, 0.15), (_tally_doc, 0.3), (_case_doc, 0.4))


def pretraining_documents(
    cfg: SyntheticConfig, n: int, seed: int, exclude: set[str] | tuple = ()
) -> list[str]:
    """`n` short documents of the family for pretraining: profiles ("flu: fever, cough, ..."),
    associations ("loss of smell is seen in covid"), one cause's tally for a set of findings, and
    short cases with worked solutions. No document holds the findings of a prompt in `exclude`
    (pass the validation prompts), whatever the order, age or sex. `cfg` is unused: the catalogue
    is fixed (the argument keeps the signature of the arithmetic family's function).
    """
    rng = random.Random(f"rft-cases-pretraining:{seed}")
    excluded = {key for key in map(case_key, exclude) if key is not None}
    kinds, weights = zip(*_DOC_KINDS, strict=True)
    documents: list[str] = []
    while len(documents) < n:
        document = rng.choices(kinds, weights=weights)[0](rng)
        if case_key(document) not in excluded:
            documents.append(document)
    return documents
