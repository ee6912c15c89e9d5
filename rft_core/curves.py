"""The pictures of a pipeline run: validation scores against training progress, SFT then RL
(`plot_training`); and the RL stage's health (`plot_rl_signals`).

One x axis: warm-up SFT steps, then RL iterations after them (an RL iteration is drawn one unit
wide, like an SFT step; a dashed line marks where RL starts). Two curves, as OpenAI's RFT
dashboard shows them: greedy validation accuracy (`val_accuracy`, the headline figure) and the
mean grader reward of completions sampled at `eval.temperature` (`val_sampled_reward`, temperature 1 by default).
The SFT checkpoint the RL stage started from (the best one, when SFT kept its best) and the RL
model's final point are marked and labelled with their accuracy.

Input is the stages' own histories (`result.json`: a list of `{"step": n, "val_...": x}`), so a
picture can be redrawn from any finished run directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

History = Sequence[Mapping[str, Any]]

CURVES = {
    "val_accuracy": "greedy accuracy",
    "val_sampled_reward": "mean reward of sampled completions",
}


def _points(history: History, key: str, offset: float) -> tuple[list[float], list[float]]:
    rows = [h for h in history if key in h and h[key] is not None]
    return [offset + float(h["step"]) for h in rows], [float(h[key]) for h in rows]


def plot_training(
    sft_history: History,
    rl_history: History,
    path: str | Path,
    *,
    sft_chosen_step: int | None = None,
    title: str = "Validation during training",
) -> Path:
    """Write the PNG to `path` and return it.

    `sft_chosen_step` is the SFT step whose weights RL started from (default: SFT's last
    evaluated step). Either history may be empty (a run without SFT or without RL).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    import matplotlib.pyplot as plt

    sft_end = max((float(h["step"]) for h in sft_history), default=0.0)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    colors = {"val_accuracy": "tab:blue", "val_sampled_reward": "tab:orange"}
    top = 0.0
    for key, label in CURVES.items():
        # Two segments: RL's iteration 0 is the SFT model it started from (the best one, not
        # necessarily SFT's last), so the curves are not joined across the boundary.
        for history, offset in ((sft_history, 0.0), (rl_history, sft_end)):
            xs, ys = _points(history, key, offset)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, color=colors[key], label=label)
                label, top = None, max(top, *ys)

    chosen = _chosen(sft_history, sft_chosen_step)
    if chosen is not None and "val_accuracy" in chosen:
        x, y = float(chosen["step"]), float(chosen["val_accuracy"])
        ax.scatter([x], [y], s=90, facecolors="none", edgecolors="black", zorder=5)
        ax.annotate(f"SFT best {100 * y:.1f}%", (x, y), textcoords="offset points", xytext=(6, 10), ha="left")
    final = next((h for h in reversed(rl_history) if "val_accuracy" in h), None)
    if final is not None:
        x, y = sft_end + float(final["step"]), float(final["val_accuracy"])
        ax.scatter([x], [y], s=120, marker="*", color="black", zorder=5)
        ax.annotate(f"RL final {100 * y:.1f}%", (x, y), textcoords="offset points", xytext=(-10, 12), ha="right")
    if rl_history and sft_history:
        ax.axvline(sft_end, color="grey", linestyle="--", linewidth=1)
        ax.text(sft_end, 1.02, " RL starts", transform=ax.get_xaxis_transform(), color="grey", va="bottom")

    ax.set_xlabel("training progress: SFT steps, then RL iterations")
    ax.set_ylabel("validation score")
    ax.set_ylim(0.0, min(1.0, max(0.1, top * 1.3)))
    ax.set_title(title, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _chosen(history: History, step: int | None) -> Mapping[str, Any] | None:
    evaluated = [h for h in history if "val_accuracy" in h]
    if not evaluated:
        return None
    if step is None:
        return evaluated[-1]
    return next((h for h in evaluated if int(h["step"]) == int(step)), evaluated[-1])


# The RL run's health: the signals people read for collapse and reward hacking, in one picture.
SIGNAL_PANELS = (
    ("reward", (("reward_mean", "training reward (rollouts)"), ("val_sampled_reward", "validation reward (sampled)"),
                ("val_accuracy", "validation accuracy (greedy)"))),
    ("KL to the warm-up model (nats per sample)", (("kl", None),)),
    ("entropy (nats per token)", (("entropy", None),)),
    ("response length (tokens)", (("response_length", None),)),
)


def plot_rl_signals(
    signals: History, events: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "RL signals"
) -> Path:
    """Four panels over RL iterations: training reward against validation reward and accuracy (a
    training reward that rises while validation falls is reward hacking or overfitting), the KL to
    the warm-up model, the entropy (a collapse to one answer, or noise), the response length. The
    guard's events are marked on every panel. Writes the PNG to `path` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), dpi=100, sharex=True)
    for ax, (name, series) in zip(axes.flat, SIGNAL_PANELS, strict=True):
        for key, label in series:
            xs, ys = _points(signals, key, 0.0)
            if xs:
                ax.plot(xs, ys, marker="o" if key.startswith("val_") else None, markersize=3, linewidth=1, label=label)
        for event in events:
            ax.axvline(float(event["iteration"]), color="tab:red", linestyle=":", linewidth=1)
        ax.set_title(name, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="lower left", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("RL iteration" + ("  (red: the guard acted)" if events else ""))
    fig.suptitle(title, x=0.01, ha="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
