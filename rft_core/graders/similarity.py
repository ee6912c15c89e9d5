"""The `text_similarity` grader: how close the rendered input is to the reference, in [0, 1].

Metrics (`evaluation_metric`):

- `fuzzy_match`: rapidfuzz `fuzz.ratio` / 100 (normalised Indel similarity of the strings).
- `bleu`: sacrebleu sentence BLEU (13a tokenizer, exp smoothing, effective order) / 100.
- `gleu`: nltk `sentence_gleu` (Google-BLEU, n = 1..4) on word/punctuation tokens.
- `meteor`: nltk `meteor_score` on word/punctuation tokens, lower-cased. nltk's METEOR would
  look synonyms up in WordNet, a corpus that must be downloaded; we pass it a WordNet stand-in
  that knows no synonyms, so it matches exact words and Porter stems only and never downloads.
- `rouge_1` .. `rouge_5`, `rouge_l`: rouge-score F-measure of `rougeN` / `rougeL` (its default
  tokenizer: lower-cased ASCII letters and digits, no stemming).
- `cosine`: cosine similarity of mean-pooled last hidden states of a local Hugging Face model
  given by the spec's `embedding_model` (a directory); a negative cosine scores 0. Without
  `embedding_model` the spec is invalid.

Library results are snapped to [0, 1] only within 1e-9 (floating-point noise such as BLEU's
100.00000000000004); anything further out would be an error result.

>>> grader = TextSimilarityGrader({"type": "text_similarity", "name": "sim", "evaluation_metric": "rouge_1",
...                                "input": "{{ sample.output_text }}", "reference": "{{ item.summary }}"})
>>> grader.grade("the cat sat on a mat", {"summary": "the cat sat on the mat"}).reward
0.8333333333333334
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rft_core.graders.base import Grader, GraderSpecError, field_problems, shown, spec_label
from rft_core.graders.templates import render, template_problems

METRICS = (
    "fuzzy_match", "bleu", "gleu", "meteor", "cosine",
    "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
)
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def check_spec(spec: Mapping[str, Any]) -> list[str]:
    """Problems of a text_similarity spec (empty when it is valid)."""
    problems = field_problems(
        spec, {"input": str, "reference": str, "evaluation_metric": str}, {"embedding_model": str}
    )
    label = spec_label(spec)
    metric = spec.get("evaluation_metric")
    if isinstance(metric, str) and metric not in METRICS:
        problems.append(f"{label}: evaluation_metric {shown(metric)} is not one of {', '.join(METRICS)}")
    if metric == "cosine" and not spec.get("embedding_model"):
        problems.append(
            f"{label}: evaluation_metric 'cosine' needs 'embedding_model', a local Hugging Face "
            "model directory whose mean-pooled hidden states embed the texts"
        )
    for key in ("input", "reference"):
        if isinstance(spec.get(key), str):
            problems += template_problems(spec[key], f"{label}: {key}")
    return problems


def tokens(text: str) -> list[str]:
    """Words and punctuation marks, for the nltk metrics (which need pre-tokenized text).

    >>> tokens("It's 18, isn't it?")
    ['It', "'", 's', '18', ',', 'isn', "'", 't', 'it', '?']
    """
    return _TOKEN_RE.findall(text)


def _unit(value: float) -> float:
    """Snap floating-point noise at the ends of [0, 1]; leave real excursions for check_reward."""
    if -1e-9 < value < 0.0:
        return 0.0
    if 1.0 < value < 1.0 + 1e-9:
        return 1.0
    return value


class _NoSynonyms:
    """A WordNet stand-in for nltk's METEOR: no synonyms, so no corpus download."""

    def synsets(self, word: str) -> list[Any]:
        return []


def fuzzy_match(text: str, reference: str) -> float:
    """rapidfuzz's normalised Indel similarity.

    >>> round(fuzzy_match("hello world", "hello wrld"), 4)
    0.9524
    """
    from rapidfuzz import fuzz

    return _unit(fuzz.ratio(text, reference) / 100.0)


def bleu(text: str, reference: str) -> float:
    """sacrebleu sentence BLEU on a 0..1 scale.

    >>> round(bleu("the cat sat on a mat", "the cat sat on the mat"), 4)
    0.5373
    """
    import sacrebleu

    return _unit(sacrebleu.sentence_bleu(text, [reference]).score / 100.0)


def gleu(text: str, reference: str) -> float:
    """nltk sentence GLEU: min(n-gram precision, n-gram recall) for n = 1..4.

    >>> round(gleu("the cat sat on a mat", "the cat sat on the mat"), 4)
    0.6111
    """
    from nltk.translate.gleu_score import sentence_gleu

    return _unit(float(sentence_gleu([tokens(reference)], tokens(text))))


def meteor(text: str, reference: str) -> float:
    """Exact and stem matches only (see the module docstring).

    >>> round(meteor("the cats sat on a mat", "the cat sat on the mat"), 4)
    0.7433
    """
    from nltk.translate.meteor_score import meteor_score

    return _unit(float(meteor_score([tokens(reference)], tokens(text), wordnet=_NoSynonyms())))


_ROUGE_KEYS = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}


def rouge(text: str, reference: str, metric: str) -> float:
    """rouge-score F-measure of ROUGE-N or ROUGE-L.

    >>> rouge("the cat sat on a mat", "the cat sat on the mat", "rouge_2")
    0.6
    """
    key = _ROUGE_KEYS[metric]
    return _unit(_rouge_scorer(key).score(reference, text)[key].fmeasure)


@functools.cache
def _rouge_scorer(key: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([key])


class Embedder:
    """Sentence embeddings from a local Hugging Face model: mean of the last hidden states."""

    def __init__(self, path: str):
        if not Path(path).is_dir():
            raise GraderSpecError(f"embedding_model {path!r} is not a local model directory")
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise GraderSpecError(f"embedding_model {path!r} could not be loaded: {exc}") from None
        self.model.eval()
        self._torch = torch
        self._lock = threading.Lock()
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = min(int(x) for x in limits if x) if any(limits) else 512

    def embed(self, text: str) -> Any:
        torch = self._torch
        encoded = self.tokenizer(text or " ", return_tensors="pt", truncation=True, max_length=self.max_length)
        with self._lock, torch.no_grad():
            hidden = self.model(**encoded).last_hidden_state[0]
        mask = encoded["attention_mask"][0].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(0) / mask.sum().clamp(min=1)

    def cosine(self, text: str, reference: str) -> float:
        a, b = self.embed(text), self.embed(reference)
        similarity = float(self._torch.nn.functional.cosine_similarity(a, b, dim=0))
        return _unit(max(0.0, similarity))


class TextSimilarityGrader(Grader):
    """OpenAI's text_similarity: `input`, `reference`, `evaluation_metric` (+ `embedding_model` for cosine)."""

    type = "text_similarity"

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__(spec)
        self.input = spec["input"]
        self.reference = spec["reference"]
        self.metric = spec["evaluation_metric"]
        self.embedder = Embedder(spec["embedding_model"]) if self.metric == "cosine" else None

    def similarity(self, text: str, reference: str) -> float:
        if self.metric == "fuzzy_match":
            return fuzzy_match(text, reference)
        elif self.metric == "bleu":
            return bleu(text, reference)
        elif self.metric == "gleu":
            return gleu(text, reference)
        elif self.metric == "meteor":
            return meteor(text, reference)
        elif self.metric == "cosine":
            assert self.embedder is not None
            return self.embedder.cosine(text, reference)
        elif self.metric in _ROUGE_KEYS:
            return rouge(text, reference, self.metric)
        raise ValueError(f"unknown evaluation_metric {self.metric!r}")

    def score(self, context: dict[str, Any]) -> float:
        return self.similarity(render(self.input, context), render(self.reference, context))
