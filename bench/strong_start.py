"""The first RL iterations from a strong start, signal by signal: what moves first when PPO or GRPO
starts from a warm-up SFT that is already good (learning.py's `all` regime, every item with a solution).

Per seed: the learning benchmark's task, base model and SFT (the same settings, so the same start);
then one short RL run per variant (a named set of overrides), each logging every statistic of every
iteration: KL to the warm-up model, entropy, approx_kl, clip fraction, value loss, explained variance,
advantage mean and std, response length, the share of prompt groups with no reward variance, greedy
validation accuracy (every `--eval-interval` iterations). The learning rate is held constant over the
window (`rl.lr_scheduler=constant`): the first 40-60 iterations of learning.py's 400-iteration cosine
sit within 5 % of its peak. Writes the JSON (one list of per-iteration dicts per variant) and one PNG
per variant (nine panels). `--continue-sft LR` adds the control: one more epoch of SFT on the same
worked solutions at that constant lr, validated every 8 steps (does any training knock the model down?).

    python bench/strong_start.py --seed 10 --iterations 40 --continue-sft 5e-5 --continue-sft 2e-4 \
        --variant old="rl.lr=2e-4" --variant new="rl.lr=5e-5,rl.filter_flat_groups=true" \
        --out bench/results/strong_start.json --plots bench/results/strong_start
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import REGIME_SETTINGS, REGIMES, SETTINGS  # noqa: E402

PANELS = (
    ("greedy validation accuracy", ("val_accuracy",)),
    ("KL to the warm-up model (nats/sample)", ("kl",)),
    ("entropy (nats/token)", ("entropy",)),
    ("approx_kl of the update", ("approx_kl",)),
    ("clip fraction", ("clipfrac",)),
    ("critic: value loss, explained variance, value mean", ("vf_loss", "explained_variance", "value_mean")),
    ("advantage mean / std", ("advantage_mean", "advantage_std")),
    ("response length (tokens)", ("response_length",)),
    ("share of flat prompt groups", ("flat_groups",)),
)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise SystemExit(f"--variant wants NAME=key=value[,key=value...], got {text!r}")
    return name, [o for o in overrides.split(",") if o]


def plot(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(13, 9), dpi=90, sharex=True)
    for ax, (name, keys) in zip(axes.flat, PANELS, strict=True):
        for key in keys:
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if key.startswith("val_") else None, markersize=3, linewidth=1, label=key)
        ax.set_title(name, loc="left", fontsize=9)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("RL iteration")
    fig.suptitle(title, x=0.01, ha="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--regime", choices=list(REGIMES), default="all")
    parser.add_argument("--algorithm", choices=["ppo", "grpo"], default="ppo")
    parser.add_argument("--iterations", type=int, default=40, help="RL iterations per variant (critic warm-up included)")
    parser.add_argument("--eval-interval", type=int, default=4)
    parser.add_argument("--variant", action="append", default=[], help="NAME=key=value[,key=value...] (repeat)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every variant")
    parser.add_argument("--workdir", type=Path, default=Path("bench/results/strong-start-work"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/strong_start.json"))
    parser.add_argument("--plots", type=Path, default=Path("bench/results/strong_start"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", type=Path, default=None,
                        help="start from this config (e.g. configs/rank.yaml) instead of learning.py's settings")
    parser.add_argument("--keep-schedule", action="store_true",
                        help="keep the config's lr schedule and iterations' meaning (no constant lr)")
    parser.add_argument("--k", type=int, default=8, help="pass@k of the SFT model (sampled, eval.temperature)")
    parser.add_argument("--continue-sft", action="append", default=[], metavar="LR",
                        help="the control: one more SFT epoch on the same worked solutions from the SFT model, "
                        "at this constant lr, validated every 8 steps (repeat for several lrs)")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]

    import torch

    torch.set_num_threads(args.threads)
    from rft_core.config import RFTConfig
    from rft_core.data import load_items
    from rft_core.data.synthetic import write_synthetic
    from rft_core.evaluate import evaluate
    from rft_core.graders import build_grader
    from rft_core.models import load_model, load_tokenizer
    from rft_core.rl.trainer import run_rl
    from rft_core.sft import run_sft
    from rft_core.tiny import prepare_tiny_model

    seed, regime, root = args.seed, args.regime, args.workdir
    task = [] if args.config else [*SETTINGS, *REGIME_SETTINGS[regime], f"data.synthetic.solution_fraction={REGIMES[regime]}"]
    common = [
        *task, f"data.synthetic.seed={seed}", f"model.tiny.seed={seed}", f"sft.seed={seed}", f"rl.seed={seed}",
        f"eval.seed={seed}", f"eval.k={args.k}", f"output_dir={root}", *args.overrides,
    ]
    cfg = RFTConfig.load(args.config, common)
    regime = args.config.stem if args.config else regime
    work = root / f"seed{seed}-{regime}"
    shutil.rmtree(work, ignore_errors=True)
    train_path, val_path = write_synthetic(cfg.data.synthetic, work / "data")
    train, val = load_items(train_path).frame, load_items(val_path).frame
    base = prepare_tiny_model(cfg, list(train["prompt"]), root / f"cache-seed{seed}", exclude_prompts=set(val["prompt"]))
    grader = build_grader(cfg.grader.resolved_spec())
    out: dict = {"seed": seed, "regime": regime, "config": str(args.config) if args.config else None,
                 "algorithm": args.algorithm, "settings": common,
                 "torch_threads": args.threads, "variants": {}}
    try:
        sft = run_sft(cfg, train, val, base, work / "sft", grader=grader)
        tok = load_tokenizer(sft.model_dir)
        start = evaluate(load_model(sft.model_dir, cfg.model), tok, val, grader, cfg).metrics
        out["sft_best"] = start["accuracy"]
        out["sft_metrics"] = {k: v for k, v in start.items() if isinstance(v, int | float)}
        print(f"seed {seed} {regime}: SFT {json.dumps(out['sft_metrics'])}", flush=True)
        for lr in args.continue_sft:
            # Does any further training at this lr knock an annealed SFT model down, or only RL?
            ccfg = RFTConfig.load(args.config, [
                *common, f"sft.lr={lr}", "sft.lr_scheduler=constant", "sft.warmup_ratio=0", "sft.epochs=1",
                "sft.eval_interval=8", "sft.keep_best=false",
            ])
            more = run_sft(ccfg, train, val, sft.model_dir, work / f"sft-continued-{lr}", grader=grader)
            curve = [(h["step"], h["val_accuracy"]) for h in more.history if "val_accuracy" in h]
            out.setdefault("continued_sft", {})[lr] = {"curve": curve, "min_val_accuracy": min(a for _, a in curve)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))
            print(f"SFT on at lr {lr}: min {100 * min(a for _, a in curve):5.1f}  curve "
                  f"{' '.join(f'{100 * a:.0f}' for _, a in curve)}", flush=True)
        for name, overrides in variants:
            schedule = [] if args.keep_schedule else ["rl.lr_scheduler=constant"]
            vcfg = RFTConfig.load(args.config, [
                *common, f"rl.algorithm={args.algorithm}", f"rl.iterations={args.iterations}",
                *schedule, f"rl.eval_interval={args.eval_interval}",
                # the raw dynamics: the guard would roll a falling run back (learning.py keeps it on)
                "rl.guard.enabled=false", *overrides,
            ])
            history: list[dict] = []
            started = time.perf_counter()
            run_rl(vcfg, train, val, sft.model_dir, work / f"rl-{name}", grader=grader,
                   log=lambda m, s, h=history: h.append({"step": s, **{k: v for k, v in m.items()
                                                                       if isinstance(v, int | float)}}))
            accuracy = [h["val_accuracy"] for h in history if "val_accuracy" in h]
            rewards = [h["val_reward_mean"] for h in history if "val_reward_mean" in h]
            out["variants"][name] = {"overrides": overrides, "seconds": time.perf_counter() - started,
                                     "val_reward": rewards,
                                     "min_val_accuracy": min(accuracy) if accuracy else None,
                                     "last_val_accuracy": accuracy[-1] if accuracy else None, "history": history}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))
            plot(history, args.plots / f"seed{seed}-{regime}-{args.algorithm}-{name}.png",
                 f"{args.algorithm} from SFT {100 * out['sft_best']:.1f} % (seed {seed}, {regime}): {name} "
                 f"({', '.join(overrides)})")
            print(f"{name:<12} min {100 * min(accuracy):5.1f}  last {100 * accuracy[-1]:5.1f}  "
                  f"curve {' '.join(f'{100 * a:.0f}' for a in accuracy)}", flush=True)
    finally:
        grader.close()


if __name__ == "__main__":
    main()
