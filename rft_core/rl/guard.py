"""The RL guard: notices a run that is making its model worse, and acts before it ships.

Watched, against where the run started:
- validation (greedy accuracy and the sampled reward, `rl.guard.metrics`): a value more than
  `margin` below its value at RL start for `patience` validations in a row;
- the KL to the warm-up model per response token above `max_kl` for `iteration_patience` iterations
  in a row (the policy has left the model it started from);
- the policy's entropy per token outside [start / entropy_ratio, start x entropy_ratio] for
  `iteration_patience` iterations in a row (collapse to one answer, or dissolution into noise).

What it does (`action`): `rollback` restores the best validated weights (the start model when
nothing better was validated), clears the optimizer's moments and multiplies the learning rate by
`lr_factor`; after `max_rollbacks` rollbacks, or with `stop`, training stops and the stage ends
with the best validated weights, so the evaluation and the registry gate see those, not the
last. Every trip is an event (iteration, rule, action, message) that the trainer logs, keeps in
its checkpoints and result, and the stage reports to MLflow and the flow's artifact.

A pure state machine over the statistics the trainer already computes; its state is JSON (it
rides in the trainer's checkpoint state, so a resumed run keeps counting where it was).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from rft_core.config import GuardSection

ROLLBACK, STOP = "rollback", "stop"


@dataclass
class GuardEvent:
    """One trip of the guard."""

    iteration: int
    rule: str  # validation, kl, entropy
    action: str  # rollback or stop
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Guard:
    """Decides, after each iteration and each validation, whether the run must roll back or stop."""

    def __init__(self, settings: GuardSection, state: dict[str, Any] | None = None):
        self.settings = settings
        self.state: dict[str, Any] = state if state is not None else {
            "start": {}, "entropy_start": None, "below": 0, "kl_high": 0, "entropy_out": 0,
            "rollbacks": 0, "events": [],
        }

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.state["events"]

    def after_validation(self, iteration: int, metrics: dict[str, float]) -> GuardEvent | None:
        """The first validation (iteration 0, or the first one seen) sets where the run started;
        later ones count how often in a row a watched metric sits more than `margin` below it."""
        if not self.settings.enabled:
            return None
        start = self.state["start"]
        watched = {k: v for k, v in metrics.items() if k in self.settings.metrics and _finite(v)}
        if not start:
            start.update(watched)
            return None
        fallen = {k: (start[k], v) for k, v in watched.items() if k in start and v < start[k] - self.settings.margin}
        self.state["below"] = self.state["below"] + 1 if fallen else 0
        if self.state["below"] < self.settings.patience:
            return None
        words = ", ".join(f"{k} {v:.3f} (start {s:.3f})" for k, (s, v) in fallen.items())
        return self._trip(
            iteration, "validation",
            f"validation fell more than {self.settings.margin:g} below its value at RL start for "
            f"{self.state['below']} validations in a row: {words}",
        )

    def after_iteration(self, iteration: int, stats: dict[str, float]) -> GuardEvent | None:
        """KL to the warm-up model and entropy of this iteration's samples."""
        if not self.settings.enabled:
            return None
        settings = self.settings
        entropy = stats.get("entropy")
        kl = stats["kl"] / max(1.0, stats.get("response_length", 1.0)) if "kl" in stats else None  # per token
        if settings.max_kl is not None and kl is not None:
            self.state["kl_high"] = self.state["kl_high"] + 1 if not (_finite(kl) and kl <= settings.max_kl) else 0
            if self.state["kl_high"] >= settings.iteration_patience:
                return self._trip(
                    iteration, "kl",
                    f"the KL to the warm-up model was above rl.guard.max_kl {settings.max_kl:g} nats per "
                    f"token for {self.state['kl_high']} iterations in a row (now {kl:.3g})",
                )
        if settings.entropy_ratio is not None and entropy is not None:
            if self.state["entropy_start"] is None:
                self.state["entropy_start"] = entropy
            first = self.state["entropy_start"]
            ratio = settings.entropy_ratio
            inside = _finite(entropy) and first / ratio <= entropy <= first * ratio
            self.state["entropy_out"] = 0 if inside else self.state["entropy_out"] + 1
            if self.state["entropy_out"] >= settings.iteration_patience:
                return self._trip(
                    iteration, "entropy",
                    f"the policy's entropy left [{first / ratio:.3g}, {first * ratio:.3g}] nats per token "
                    f"(rl.guard.entropy_ratio {ratio:g} around its first value {first:.3g}) for "
                    f"{self.state['entropy_out']} iterations in a row (now {entropy:.3g})",
                )
        return None

    def _trip(self, iteration: int, rule: str, why: str) -> GuardEvent:
        settings = self.settings
        rollback = settings.action == ROLLBACK and self.state["rollbacks"] < settings.max_rollbacks
        if rollback:
            self.state["rollbacks"] += 1
            what = (
                f"rolled back to the best validated weights and multiplied the learning rate by "
                f"{settings.lr_factor:g} (rollback {self.state['rollbacks']} of {settings.max_rollbacks})"
            )
        else:
            reason = "rl.guard.action is stop" if settings.action == STOP else f"after {settings.max_rollbacks} rollbacks"
            what = f"stopped training ({reason}); the stage ends with the best validated weights"
        # Counting starts over after an action: the run is judged afresh from where it now is.
        self.state.update(below=0, kl_high=0, entropy_out=0)
        event = GuardEvent(iteration, rule, ROLLBACK if rollback else STOP, f"RL iteration {iteration}: {why}; {what}")
        self.events.append(event.to_dict())
        return event


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
