"""Fine-tuned models and checkpoints served for chat completions, as evaluation generated with them.

A model is loaded once and kept (an LRU of `--model-cache-size`): a job's model from its MLflow
registered version (`rft_core.tracking.load_served_model`: the pyfunc model the registry serves,
with the serving settings logged from the job's config), a checkpoint from its directory with the
job's serving settings (`served_model`). Both render prompts, generate and find the end of a
response with the pipeline's own code, so a greedy completion (temperature 0) is the text
evaluation produced for the same prompt. One generation at a time per model (a lock): on a CPU,
concurrent requests would only share the same cores.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from rft.api.catalog import ResolvedModel, snapshot_checkpoint
from rft.api.errors import invalid
from rft.api.runner import read_config
from rft.api.settings import ServerSettings
from rft.api.store import Store


@dataclass
class Loaded:
    """A served model and the lock its generations take turns on."""

    generator: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelCache:
    """Served models by name, least recently used dropped first."""

    def __init__(self, settings: ServerSettings, store: Store) -> None:
        self.settings, self.store = settings, store
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, model: ResolvedModel) -> Loaded:
        with self._lock:
            if model.name in self._models:
                self._models.move_to_end(model.name)
                return self._models[model.name]
            loading = self._loading.setdefault(model.name, threading.Lock())
        with loading:  # one load per model, however many requests ask for it at once
            with self._lock:
                if model.name in self._models:
                    return self._models[model.name]
            loaded = Loaded(self._load(model))
            with self._lock:
                self._models[model.name] = loaded
                while len(self._models) > max(1, self.settings.model_cache_size):
                    self._models.popitem(last=False)
        return loaded

    def _load(self, model: ResolvedModel) -> Any:
        from rft_core.tracking import serving_settings
        from rft_core.tracking.models import load_served_model, served_model

        if model.kind == "base":
            raise invalid(
                f"'{model.name}' is a base model for fine-tuning jobs; chat completions serve fine-tuned "
                "models and their checkpoints (ft:...)", param="model", code="model_not_served",
            )
        job = self.store.get_job(model.job_id or "")
        cfg = read_config(self.settings, model.job_id or "")
        registered = (job.data.get("result") or {}).get("registered") if job else None
        if model.kind == "fine_tuned" and registered:
            uri = f"models:/{registered['name']}/{registered['version']}"
            return load_served_model(uri, tracking_uri=self.settings.tracking_uri)
        source = model.source
        if model.kind == "checkpoint":  # a running job prunes its old checkpoints: serve a copy
            source = snapshot_checkpoint(self.settings, model)
        return served_model(source, serving_settings(cfg))


@dataclass
class Completion:
    """One choice: its text, why it ended, and how many tokens it took."""

    text: str
    finish_reason: str
    tokens: int
    pieces: list[str]  # the text cut at token boundaries, for streaming


def _text_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The decoded text in pieces that end at token boundaries (a piece waits while the bytes so
    far end inside a character); the pieces add up to the decoded text exactly."""
    from rft_core.models import decode

    pieces, emitted = [], ""
    for k in range(1, len(ids) + 1):
        text = decode(tokenizer, ids[:k])
        if text.startswith(emitted) and not text.endswith("\ufffd") and len(text) > len(emitted):
            pieces.append(text[len(emitted):])
            emitted = text
    final = decode(tokenizer, ids)
    if final.startswith(emitted):
        if len(final) > len(emitted):
            pieces.append(final[len(emitted):])
    else:  # decoding was not prefix-stable: send the whole text at once
        pieces = [final]
    return pieces


def _cut_at_stop(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """The pieces up to the first stop sequence (excluded), and whether one was found."""
    text = "".join(pieces)
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut < 0:
        return pieces, False
    kept, total = [], 0
    for piece in pieces:
        if total + len(piece) >= cut:
            if cut > total:
                kept.append(piece[: cut - total])
            break
        kept.append(piece)
        total += len(piece)
    return kept, True


def complete(
    loaded: Loaded, row: dict[str, Any], *, max_tokens: int | None, temperature: float, top_p: float, n: int,
    seed: int | None, stop: list[str],
) -> tuple[int, list[Completion]]:
    """(prompt tokens, `n` completions) of one conversation. Temperature 0 is greedy decoding (the
    evaluation's); above it, `n` samples from `seed` (random when None)."""
    generator = loaded.generator
    max_new = max_tokens or int((generator.serving or {}).get("max_new_tokens") or 64)
    with loaded.lock:
        prompt = generator.prompt_ids([row])[0]
        if temperature == 0:
            ids = generator.generate_ids([prompt], max_new_tokens=max_new)[0] * n
        else:
            draw = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
            ids = generator.generate_ids([prompt], max_new_tokens=max_new, num_samples=n, temperature=temperature,
                                         top_p=top_p, seed=draw)[0]
    completions = []
    stop_ids = set(generator.stop_ids)
    for tokens in ids:
        pieces = _text_pieces(generator.tokenizer, tokens)
        pieces, stopped_on_text = _cut_at_stop(pieces, stop)
        ended = stopped_on_text or (bool(tokens) and tokens[-1] in stop_ids)
        completions.append(Completion("".join(pieces), "stop" if ended else "length", len(tokens), pieces))
    return len(prompt), completions
