"""What a registered version is, in words: the markdown description the MLflow UI shows on the
version's page (base model, task, data digests, algorithm, validation figures, gate decision).

`version_description` writes it at registration, with the gate still to decide; `with_gate`
replaces its gate section when `promotion.promote` decides, so every path that gates a version
(the pipeline, `rft promote`, the promote-model flow) leaves the decision on the page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rft_core.tracking.gate import GateDecision, fmt
from rft_core.tracking.tags import GATE_DECISION, GATE_REASON, GATE_RULE, GATE_TIME

if TYPE_CHECKING:
    from rft_core.config import RFTConfig

GATE_HEADING = "### Gate"

# The validation figures a description shows: evaluation metric key -> column title.
FIGURES = {
    "accuracy": "greedy accuracy",
    "reward_mean": "mean reward (greedy)",
    "sampled_reward_mean": "mean reward (sampled)",
}


def base_model(cfg: RFTConfig) -> str:
    """The model training started from, as a reader knows it."""
    if cfg.model.name_or_path != "tiny":
        revision = f" (revision {cfg.model.revision})" if cfg.model.revision else ""
        return f"`{cfg.model.name_or_path}`{revision}"
    tiny = cfg.model.tiny
    return (
        f"the built-in tiny model (`tiny`: a Llama-style decoder, {tiny.num_layers} layers of width "
        f"{tiny.hidden_size}, its own tokenizer, pretrained {tiny.pretrain_steps} steps on the task's text)"
    )


def task(cfg: RFTConfig) -> str:
    """Where the items came from: the training file, or the built-in synthetic task."""
    if cfg.data.train_path is None:
        return f"built-in synthetic {cfg.data.synthetic.task} task"
    validation = f", validation `{cfg.data.val_path}`" if cfg.data.val_path else ""
    return f"`{cfg.data.train_path}`{validation}"


def algorithm(cfg: RFTConfig) -> str:
    """The training recipe: warm-up SFT (or not), then PPO / GRPO (or not)."""
    steps = ["warm-up SFT"] if cfg.sft.enabled else []
    if cfg.rl.enabled:
        steps.append(f"{cfg.rl.algorithm.upper()} ({cfg.rl.iterations} iterations, KL {cfg.rl.kl_coef:g})")
    return " then ".join(steps) or "none (the base model as it is)"


def version_description(
    cfg: RFTConfig,
    *,
    data_digest: str,
    metrics: Mapping[str, Mapping[str, float]],
    split_digest: str | None = None,
    run_id: str | None = None,
) -> str:
    """The description of a version registered from a pipeline run of `cfg`.

    `data_digest` is the digest of the validation items the `metrics` (model name -> evaluation
    metrics, e.g. sft and rl) were measured on; the gate compares versions on it.
    """
    grader = cfg.grader.resolved_spec().get("type", "?")
    lines = [
        f"Reinforcement fine-tuned by rft: {algorithm(cfg)}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base_model(cfg)} |",
        f"| task | {task(cfg)}; grader `{grader}` |",
        f"| validation data digest | `{data_digest}` |",
    ]
    if split_digest:
        lines.append(f"| split manifest digest | `{split_digest}` |")
    lines.append(f"| config digest | `{cfg.digest()}` |")
    if run_id:
        lines.append(f"| MLflow pipeline run | `{run_id}` |")
    lines += ["", "### Validation", "", _figures_table(cfg, metrics), "", GATE_HEADING, "", "Not decided yet."]
    return "\n".join(lines)


def _figures_table(cfg: RFTConfig, metrics: Mapping[str, Mapping[str, float]]) -> str:
    names = {"sft": "SFT" if cfg.sft.enabled else "base (no SFT)", "rl": cfg.rl.algorithm.upper()}
    keys = [key for key in FIGURES if any(key in m for m in metrics.values())]
    n = max((int(m.get("items", 0)) for m in metrics.values()), default=0)
    rows = [
        "| model | " + " | ".join(FIGURES[key] for key in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, values in metrics.items():
        cells = [f"{values[key]:.4f}" if key in values else "" for key in keys]
        rows.append(f"| {names.get(name, name)} | " + " | ".join(cells) + " |")
    if n:
        rows.append(f"\n{n} validation items; accuracy: reward >= {cfg.eval.pass_threshold:g}.")
    return "\n".join(rows)


def gate_section(
    decision: GateDecision, metric: str, when: str, earlier: Sequence[Mapping[str, str]] = ()
) -> str:
    """The gate section of a description: the decision, its rule and reason, the numbers compared,
    then the `earlier` decisions on the version (the `gate.history` tag's entries), newest first."""
    verdict = "**promoted** to champion" if decision.promoted else "**refused** (champion unchanged)"
    champion = (
        "none"
        if decision.champion_version is None
        else f"v{decision.champion_version} ({fmt(decision.champion_value)})"
    )
    rule = f" (rule `{decision.rule}`)" if decision.rule else ""
    lines = [
        GATE_HEADING,
        "",
        f"{verdict} on `{metric}`{rule}: {decision.reason}",
        "",
        f"This version: {fmt(decision.challenger_value)}; champion before: {champion}. Decided {when}.",
    ]
    if earlier:
        lines += ["", "Earlier decisions:"]
        for entry in reversed(earlier):
            rule = f" ({entry[GATE_RULE]})" if entry.get(GATE_RULE) else ""
            lines.append(
                f"- {entry.get(GATE_TIME, '?')}: {entry.get(GATE_DECISION, '?')}{rule}: {entry.get(GATE_REASON, '')}"
            )
    return "\n".join(lines)


def event_section(
    decision: str, rule: str, reason: str, when: str, earlier: Sequence[Mapping[str, str]] = ()
) -> str:
    """The gate section after a decision that was not the gate's (a rollback): what happened, then
    the `earlier` decisions on the version, newest first."""
    lines = [GATE_HEADING, "", f"**{decision}** (rule `{rule}`): {reason}. Decided {when}."]
    if earlier:
        lines += ["", "Earlier decisions:"]
        for entry in reversed(earlier):
            tag = f" ({entry[GATE_RULE]})" if entry.get(GATE_RULE) else ""
            lines.append(
                f"- {entry.get(GATE_TIME, '?')}: {entry.get(GATE_DECISION, '?')}{tag}: {entry.get(GATE_REASON, '')}"
            )
    return "\n".join(lines)


def with_gate(description: str | None, section: str) -> str:
    """`description` with its gate section replaced by `section` (appended when it has none)."""
    text = description or ""
    at = text.find(GATE_HEADING)
    head = text[:at] if at >= 0 else (text + "\n\n" if text else "")
    return head + section
