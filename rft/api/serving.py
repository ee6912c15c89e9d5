"""Fine-tuned models and checkpoints served for chat completions, as evaluation generated with them.

A model is loaded once and kept (an LRU of `--model-cache-size`): a job's model from its MLflow
registered version (`rft_core.tracking.load_served_model`: the pyfunc model the registry serves,
with the serving settings logged from the job's config), a checkpoint from its directory with the
job's serving settings (`served_model`). Both render prompts, generate and find the end of a
response with the pipeline's own code, so a greedy completion (temperature 0) is the text
evaluation produced for the same prompt. One generation at a time per model, always on the same
thread (the model's own): on a CPU concurrent requests would only share the same cores, and torch
ops started from many request threads each bring up a team of compute threads that then compete
for the cores (the first requests of a fresh server ran ~10x slower that way).
"""

from __future__ import annotations

import queue
import random
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rft.api.catalog import ResolvedModel, snapshot_checkpoint
from rft.api.errors import invalid
from rft.api.runner import read_config
from rft.api.settings import ServerSettings
from rft.api.store import Store


@dataclass
class Loaded:
    """A served model, the one thread its generations run on in turn, and the lock around its
    tokenizer (encoding and decoding from several request threads at once is not safe with every
    tokenizer)."""

    generator: Any
    thread: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="rft-generate"))
    text_lock: threading.Lock = field(default_factory=threading.Lock)


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
                    _, evicted = self._models.popitem(last=False)
                    evicted.thread.shutdown(wait=False)  # its queued generations still finish
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


class ChoiceText:
    """One choice's text as its tokens arrive: decoded (special tokens left out, as evaluation
    decodes), cut before the first `stop` sequence, and handed out in pieces that never need taking
    back (a piece waits while the bytes so far end inside a character, and the last characters wait
    while they could begin a stop sequence). The pieces add up to the text; streamed or not, a
    completion goes through here, so both give the same text."""

    def __init__(self, loaded: Loaded, stops: list[str], max_tokens: int) -> None:
        self.loaded, self.stops, self.max_tokens = loaded, [s for s in stops if s], max_tokens
        self.stop_ids = set(loaded.generator.stop_ids)
        self.ids: list[int] = []
        self.emitted = ""
        self.finish_reason: str | None = None

    def _emit(self, target: str) -> str:
        if len(target) > len(self.emitted) and target.startswith(self.emitted):
            delta, self.emitted = target[len(self.emitted):], target
            return delta
        return ""

    def _text(self) -> str:
        from rft_core.models import decode

        with self.loaded.text_lock:
            return decode(self.loaded.generator.tokenizer, self.ids)

    def feed(self, token: int) -> str:
        """Take the next token; the text it adds (maybe none yet). Sets `finish_reason` once done."""
        if self.finish_reason is not None:
            return ""
        self.ids.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            return self._emit(text[:cut])
        if token in self.stop_ids or len(self.ids) >= self.max_tokens:
            self.finish_reason = "stop" if token in self.stop_ids else "length"
            return self._emit(text)
        if text.endswith("\ufffd"):
            return ""
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self._emit(text[: len(text) - hold] if hold else text)

    def close(self) -> str:
        """The rest of the text when generation ended without this choice saying so."""
        if self.finish_reason is not None:
            return ""
        self.finish_reason = "length"
        return self._emit(self._text())


def _generation(loaded: Loaded, row: dict[str, Any], max_tokens: int | None, temperature: float, top_p: float,
                n: int, seed: int | None) -> tuple[list[int], dict[str, Any]]:
    """The prompt's token ids and the `generate_ids` arguments of a request; 400 when the prompt and
    the completion would not fit the model's context."""
    generator = loaded.generator
    max_new = max_tokens or int((generator.serving or {}).get("max_new_tokens") or 64)
    with loaded.text_lock:
        prompt = generator.prompt_ids([row])[0]
    context = getattr(generator.model.config, "max_position_embeddings", None)
    if context is not None and len(prompt) + max_new > context:
        raise invalid(
            f"the prompt ({len(prompt)} tokens) and max_completion_tokens ({max_new}) exceed the model's context "
            f"of {context} tokens", param="max_completion_tokens",
        )
    kwargs: dict[str, Any] = {"max_new_tokens": max_new}
    if temperature > 0:
        draw = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
        kwargs.update(num_samples=n, temperature=temperature, top_p=top_p, seed=draw)
    return prompt, kwargs


def _choices(loaded: Loaded, n: int, stops: list[str], max_new: int) -> list[ChoiceText]:
    return [ChoiceText(loaded, stops, max_new) for _ in range(n)]


def complete(
    loaded: Loaded, row: dict[str, Any], *, max_tokens: int | None, temperature: float, top_p: float, n: int,
    seed: int | None, stop: list[str],
) -> tuple[int, list[ChoiceText]]:
    """(prompt tokens, `n` finished choices) of one conversation. Temperature 0 is greedy decoding
    (the evaluation's, the same for every choice); above it, `n` samples from `seed` (random when None)."""
    prompt, kwargs = _generation(loaded, row, max_tokens, temperature, top_p, n, seed)
    ids = loaded.thread.submit(loaded.generator.generate_ids, [prompt], **kwargs).result()[0]
    choices = _choices(loaded, n, stop, kwargs["max_new_tokens"])
    for choice, tokens in zip(choices, ids * n if temperature == 0 else ids, strict=True):
        for token in tokens:
            choice.feed(token)
        choice.close()
    return len(prompt), choices


def stream(
    loaded: Loaded, row: dict[str, Any], *, max_tokens: int | None, temperature: float, top_p: float, n: int,
    seed: int | None, stop: list[str],
) -> tuple[int, Iterator[tuple[str, int, Any]]]:
    """(prompt tokens, events) of one conversation generated on the model's thread and read as it goes:
    `("delta", choice, text)`, `("finish", choice, reason)` when a choice ends, then
    `("usage", -1, completion tokens)`."""
    prompt, kwargs = _generation(loaded, row, max_tokens, temperature, top_p, n, seed)
    steps: queue.Queue[Any] = queue.Queue()
    done = object()

    def generate() -> None:
        try:
            loaded.generator.generate_ids([prompt], **kwargs, on_tokens=steps.put)
            steps.put(done)
        except BaseException as exc:  # handed to the reader, which raises it in the response
            steps.put(exc)

    loaded.thread.submit(generate)

    def events() -> Iterator[tuple[str, int, Any]]:
        choices = _choices(loaded, n, stop, kwargs["max_new_tokens"])
        while (item := steps.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            for _, sample, token in item:
                for index in (range(n) if temperature == 0 else (sample,)):
                    choice = choices[index]
                    if choice.finish_reason is not None:
                        continue
                    if delta := choice.feed(token):
                        yield "delta", index, delta
                    if choice.finish_reason is not None:
                        yield "finish", index, choice.finish_reason
        for index, choice in enumerate(choices):
            if choice.finish_reason is None:
                if delta := choice.close():
                    yield "delta", index, delta
                yield "finish", index, choice.finish_reason
        yield "usage", -1, sum(len(c.ids) for c in choices)

    return len(prompt), events()
