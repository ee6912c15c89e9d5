"""Our GRPO and PPO against TRL's, on the same tiny models, prompts, reward and settings.

    python bench/vs_trl.py --out bench/results/vs_trl.json --seeds 3

Compares completed samples per second (over the iterations after a warm-up one) and the peak
resident memory of the process, for our `RLTrainer` against
- GRPO: `trl.GRPOTrainer` of the current TRL release (virtualenv `--trl-python`);
- PPO: `trl.experimental.ppo.PPOTrainer` of TRL 1.12, the last release that has it (`--trl-ppo-python`);
at two model sizes (~1M and ~20M parameters). TRL is not a dependency of the project: each side
runs as its own subprocess, ours in this venv, TRL's in its own venv (made on first use under
bench/.envs/ by bench/trl_envs.py, sharing this interpreter's torch and transformers), one after
the other with identical thread settings (OMP/MKL_NUM_THREADS and torch.set_num_threads).
With `--seeds N` every pair runs N times with different seeds (which side goes first alternates)
and the table gives medians. Also reports our PPO's rollout and update tokens/s and where its
iteration time goes.

Everything both sides get is built here once per size: the synthetic task's items, one tokenizer,
one randomly initialised Llama-style model saved with `save_pretrained` (tokenizer included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trl_envs import ENVS, TRL_GRPO, TRL_PPO, ensure_env, env_versions

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent

# name -> TinyModelConfig fields
SIZES: dict[str, dict[str, int]] = {
    "1M": {},  # TinyModelConfig() defaults: hidden 128, 4 layers, 4 heads, MLP 384
    "20M": {"hidden_size": 384, "num_layers": 10, "num_heads": 6, "intermediate_size": 1152},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(BENCH / "results" / "vs_trl.json"), help="JSON result path")
    ap.add_argument("--seeds", type=int, default=3, help="repetitions of every pair (different seeds); medians reported")
    ap.add_argument("--sizes", default="1M,20M", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--algorithms", default="grpo,ppo", help="comma-separated: grpo, ppo")
    ap.add_argument("--trl-version", default=TRL_GRPO, help="TRL release of the GRPO side (its env: bench/.envs/trl-VERSION)")
    ap.add_argument("--trl-ppo-version", default=TRL_PPO, help="TRL release of the PPO side (the last with PPO: 1.12.0)")
    ap.add_argument("--trl-python", default=None, help="python of an existing TRL env for GRPO (default: made on first use)")
    ap.add_argument("--trl-ppo-python", default=None, help="python of an existing TRL env for PPO (default: made on first use)")
    ap.add_argument("--envs-dir", default=str(ENVS), help="where the TRL envs are made (default bench/.envs, git-ignored)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for both sides")
    ap.add_argument("--iterations", type=int, default=4, help="rollout+update iterations per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="iterations left out of the measurement")
    ap.add_argument("--prompts", type=int, default=8, help="GRPO prompts per iteration")
    ap.add_argument("--samples", type=int, default=4, help="GRPO completions per prompt (TRL num_generations)")
    ap.add_argument("--ppo-prompts", type=int, default=32, help="PPO prompts per iteration (one completion each)")
    ap.add_argument("--minibatch", type=int, default=16, help="completions per optimizer step")
    ap.add_argument("--epochs", type=int, default=2, help="passes over each rollout batch (TRL num_iterations / num_ppo_epochs)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="completion length cap (TRL max_completion_length / response_length)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--kl-coef", type=float, default=0.05, help="our kl_coef = TRL beta (GRPO) / kl_coef (PPO)")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--vf-coef", type=float, default=5.0, help="PPO value-loss coefficient (both sides)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true", help="leave TRL's gradient checkpointing on (ours stays off)")
    ap.add_argument(
        "--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
        help="set glibc's MALLOC_MMAP_THRESHOLD_ for both sides (e.g. 131072): freed tensors go back to the OS, "
        "so peak RSS tracks live memory instead of heap the allocator kept (default: the allocator's defaults)",
    )
    ap.add_argument("--n-train", type=int, default=1000, help="synthetic training items (the prompt pool)")
    ap.add_argument("--workdir", default=None, help="keep models, specs and logs here (default: a temporary directory)")
    ap.add_argument("--run-timeout", type=int, default=900, help="seconds before one side's run is abandoned")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- shared inputs


def prepare_inputs(args: argparse.Namespace, workdir: Path, sizes: list[str]) -> dict[str, Any]:
    """Items, prompts (rendered as our trainer renders them), one tokenizer, one model per size."""
    from rft_core.config import RFTConfig, SyntheticConfig, TinyModelConfig
    from rft_core.data import load_items
    from rft_core.data.synthetic import write_synthetic
    from rft_core.models import count_parameters, render_prompt
    from rft_core.tiny import build_model, train_tokenizer

    train_file, _ = write_synthetic(SyntheticConfig(n_train=args.n_train, n_val=20, max_steps=3, seed=0), workdir / "data")
    frame = load_items(train_file).frame
    texts = list(frame["prompt"]) + [s for s in frame["solution"] if isinstance(s, str)]
    base = TinyModelConfig()
    tokenizer = train_tokenizer(texts, base.vocab_size)
    cfg = RFTConfig()
    prompts = [
        {"prompt": render_prompt(tokenizer, cfg.model, p), "reference": str(r)}
        for p, r in zip(frame["prompt"], frame["reference"], strict=True)
    ]
    models = {}
    for name in sizes:
        tiny = TinyModelConfig(**SIZES[name])
        model = build_model(tiny, tokenizer)
        path = workdir / f"model-{name}"
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
        models[name] = {"dir": str(path), "params": count_parameters(model), "config": tiny.model_dump()}
    return {"train_file": str(train_file), "prompts": prompts, "models": models}


def ordered_prompts(prompts: list[dict], iterations: int, per_iteration: int, seed: int) -> list[dict]:
    """The prompts in the order our trainer draws them, so TRL (unshuffled) sees the same ones."""
    from rft_core.training import step_positions

    out = []
    for iteration in range(iterations):
        out.extend(prompts[i] for i in step_positions(iteration, per_iteration, len(prompts), seed))
    return out


# --------------------------------------------------------------------------- running one side


def run_side(python: str, script: str, spec: dict, workdir: Path, tag: str, env: dict, timeout: int) -> dict:
    spec_path, out_path, log_path = (workdir / f"{tag}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec, indent=1))
    out_path.unlink(missing_ok=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(
                [python, str(BENCH / script), str(spec_path), str(out_path)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
            )
            failed = proc.returncode != 0 or not out_path.exists()
        except subprocess.TimeoutExpired:
            failed = True
    wall = time.perf_counter() - started
    if failed:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{tag} failed after {wall:.0f}s (log {log_path}):\n{tail}")
    result = json.loads(out_path.read_text())
    result["wall_s"] = wall
    return result


def child_env(threads: int, mmap_threshold: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env.update(
        TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1", PYTHONHASHSEED="0", TRANSFORMERS_VERBOSITY="error",
    )
    env.pop("PYTHONPATH", None)
    return env


# --------------------------------------------------------------------------- aggregation


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ppo_profile(runs: list[dict]) -> dict[str, Any]:
    """Our PPO's tokens/s and time split over the measured iterations (medians over seeds)."""
    per_run = []
    for run in runs:
        its = run["iterations"][run["warmup"] :]

        def tot(key: str, its: list[dict] = its) -> float:
            return sum(it.get(key, 0.0) for it in its)

        iteration_s = sum(run["iteration_s"][run["warmup"] :])
        score_ref = tot("score_reference")
        update_parts = {
            "update_forward_loss": tot("update_forward_loss"),
            "update_backward": tot("update_backward"),
            "update_optimizer": tot("update_optimizer"),
        }
        split = {
            "generation": tot("generate"),
            "grading": tot("grade"),
            "score_policy_value": tot("score") - score_ref,
            "score_reference": score_ref,
            **update_parts,
            "update_other": tot("update") - sum(update_parts.values()),
        }
        split["other"] = iteration_s - sum(split.values())  # advantages, statistics, packing
        per_run.append(
            {
                "rollout_tokens_per_s": tot("generated_tokens") / tot("generate"),
                "update_tokens_per_s": tot("update_tokens") / tot("update"),
                "iteration_s": iteration_s / len(its),
                "split_s": {k: v / len(its) for k, v in split.items()},
                "split_share": {k: v / iteration_s for k, v in split.items()},
                "response_length": statistics.mean(it["response_length"] for it in its),
            }
        )
    keys = per_run[0]["split_s"].keys()
    return {
        "rollout_tokens_per_s": median([r["rollout_tokens_per_s"] for r in per_run]),
        "update_tokens_per_s": median([r["update_tokens_per_s"] for r in per_run]),
        "iteration_s": median([r["iteration_s"] for r in per_run]),
        "response_length": median([r["response_length"] for r in per_run]),
        "split_s_per_iteration": {k: median([r["split_s"][k] for r in per_run]) for k in keys},
        "split_share": {k: median([r["split_share"][k] for r in per_run]) for k in keys},
        "notes": "rollout tokens/s = generated tokens / generation time; update tokens/s = (prompt + response) "
        "tokens through forward+backward, all epochs / update time. score_policy_value = the shared-trunk "
        "policy+value forward at rollout; update_other = minibatch bookkeeping outside forward/backward/step.",
    }


def section_split(run: dict, keys: list[str]) -> dict[str, float]:
    """Per-iteration seconds of named sections over a run's measured iterations."""
    its = run["iterations"] if run["side"] == "ours" else run["splits"]
    its = its[run["warmup"] :]
    return {k: sum(it.get(k, 0.0) for it in its) / len(its) for k in keys}


_OURS_SECTIONS = ["generate", "score", "update", "update_forward_loss", "update_backward",
                  "update_forward_loss_cpu", "update_backward_cpu"]
_TRL_SECTIONS = {
    "grpo": ["generate", "rollout", "update_forward_loss", "update_backward", "generate_cpu", "rollout_cpu",
             "update_forward_loss_cpu", "update_backward_cpu"],
    "ppo": ["reward_model_forward", "reward_model_forward_cpu"],
}


def build_row(name: str, algorithm: str, params: int, pairs: list[tuple[dict, dict]], settings: dict) -> dict:
    ours = [o for o, _ in pairs]
    trl = [t for _, t in pairs]
    row: dict[str, Any] = {
        "model_size": name,
        "model_params": params,
        "algorithm": algorithm,
        "trl_version": trl[0]["trl_version"],
        "ours_samples_per_s": median([o["samples_per_s"] for o in ours]),
        "trl_samples_per_s": median([t["samples_per_s"] for t in trl]),
        "throughput_ratio": median([o["samples_per_s"] / t["samples_per_s"] for o, t in pairs]),
        "ours_samples_per_cpu_s": median([o["samples_per_cpu_s"] for o in ours]),
        "trl_samples_per_cpu_s": median([t["samples_per_cpu_s"] for t in trl]),
        "cpu_throughput_ratio": median([o["samples_per_cpu_s"] / t["samples_per_cpu_s"] for o, t in pairs]),
        "ours_peak_mb": median([o["peak_rss_mb"] for o in ours]),
        "trl_peak_mb": median([t["peak_rss_mb"] for t in trl]),
        "memory_ratio": median([o["peak_rss_mb"] / t["peak_rss_mb"] for o, t in pairs]),
        "ours_peak_above_imports_mb": median([o["peak_rss_mb"] - o["rss_after_imports_mb"] for o in ours]),
        "trl_peak_above_imports_mb": median([t["peak_rss_mb"] - t["rss_after_imports_mb"] for t in trl]),
        "ours_response_length": median([statistics.mean(i["response_length"] for i in o["iterations"][o["warmup"]:]) for o in ours]),
        "ours_seconds_per_iteration": median([o["measured_s"] / o["measured_iterations"] for o in ours]),
        "trl_seconds_per_iteration": median([t["measured_s"] / t["measured_iterations"] for t in trl]),
        "ours_split_s": {
            k: median([section_split(o, _OURS_SECTIONS)[k] for o in ours]) for k in _OURS_SECTIONS
        },
        "trl_split_s": {
            k: median([section_split(t, _TRL_SECTIONS[algorithm])[k] for t in trl]) for k in _TRL_SECTIONS[algorithm]
        },
        "seeds": len(pairs),
        "per_seed_throughput_ratio": [o["samples_per_s"] / t["samples_per_s"] for o, t in pairs],
        "per_seed_memory_ratio": [o["peak_rss_mb"] / t["peak_rss_mb"] for o, t in pairs],
        "per_seed_cpu_throughput_ratio": [o["samples_per_cpu_s"] / t["samples_per_cpu_s"] for o, t in pairs],
    }
    if algorithm == "grpo":
        row["trl_response_length"] = median([t["response_length"] for t in trl])
        row["same_prompts"] = all(t.get("same_prompts", False) for t in trl)
        row["notes"] = (
            f"{settings['prompts']} prompts x {settings['samples']} completions, minibatch {settings['minibatch']}, "
            f"{settings['epochs']} epochs (TRL num_iterations), <= {settings['max_new_tokens']} new tokens, "
            f"KL {settings['kl_coef']} (TRL beta: both keep a reference model), float32 CPU, "
            f"{settings['threads']} thread(s). TRL gradient checkpointing "
            f"{'on' if settings['trl_gradient_checkpointing'] else 'off'} (ours off). TRL computes old log-probs "
            "in a separate pass (num_iterations > 1), as ours always does; ours shares the prompt's prefill "
            "across its group's samples and drops finished rows during sampling, TRL's generate() does neither. "
            "Peak = ru_maxrss of the whole process (imports included)."
        )
    else:
        row["trl_samples_per_s_without_reward_model"] = median([t["samples_per_s_without_reward_model"] for t in trl])
        row["notes"] = (
            f"{settings['ppo_prompts']} prompts x 1 completion, minibatch {settings['minibatch']}, "
            f"{settings['epochs']} PPO epochs, <= {settings['max_new_tokens']} new tokens, KL {settings['kl_coef']} (k1 "
            f"in the reward, both), vf_coef {settings['vf_coef']}. Ours: one model (value head on the policy's "
            "trunk), graded by the numeric_match function, plus a frozen reference. TRL 1.12: separate policy, "
            "value, reference and reward models (value/reward = sequence-classification models of the policy's "
            "size; reward scores meaningless: a throughput/memory comparison only); its policy log-probs at "
            "rollout come from generate()'s scores, ours from a separate forward. "
            "trl_samples_per_s_without_reward_model leaves out TRL's reward-model forward time."
        )
    return row


def print_table(rows: list[dict], profiles: dict[str, dict]) -> None:
    headers = ["size", "algo", "TRL", "ours/s", "TRL/s", "x TRL", "x TRL cpu", "ours MB", "TRL MB", "mem ratio"]
    lines = [
        [f"{r['model_size']} ({r['model_params'] / 1e6:.2f}M)", r["algorithm"], r["trl_version"],
         f"{r['ours_samples_per_s']:.2f}", f"{r['trl_samples_per_s']:.2f}", f"{r['throughput_ratio']:.2f}",
         f"{r['cpu_throughput_ratio']:.2f}", f"{r['ours_peak_mb']:.0f}", f"{r['trl_peak_mb']:.0f}",
         f"{r['memory_ratio']:.2f}"]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="ours vs TRL (medians over seeds)")
        for h in headers:
            table.add_column(h, justify="left" if h in ("size", "algo", "TRL") else "right", no_wrap=True)
        for line in lines:
            table.add_row(*line)
        Console(width=140).print(table)
    except ImportError:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
    for size, prof in profiles.items():
        split = ", ".join(f"{k} {v * 100:.0f}%" for k, v in prof["split_share"].items())
        print(
            f"our PPO, {size}: rollout {prof['rollout_tokens_per_s']:.0f} tok/s, update "
            f"{prof['update_tokens_per_s']:.0f} tok/s, {prof['iteration_s']:.2f} s/iteration: {split}"
        )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r}; use {', '.join(SIZES)}")
    for a in algorithms:
        if a not in ("grpo", "ppo"):
            raise SystemExit(f"unknown algorithm {a!r}; use grpo, ppo")
    if args.prompts * args.samples % args.minibatch or args.ppo_prompts % args.minibatch:
        raise SystemExit("--minibatch must divide prompts x samples (GRPO) and --ppo-prompts (PPO)")
    given = {"grpo": args.trl_python, "ppo": args.trl_ppo_python}
    versions = {"grpo": args.trl_version, "ppo": args.trl_ppo_version}
    pythons: dict[str, str] = {}
    for a in algorithms:
        if given[a]:
            if not Path(given[a]).exists():
                raise SystemExit(f"TRL python for {a} not found at {given[a]}")
            pythons[a] = given[a]
        else:  # made on first use (bench/trl_envs.py): a venv sharing this interpreter's torch + trl
            pythons[a] = str(ensure_env(versions[a], Path(args.envs_dir)))

    from rft_core.config import DEFAULT_GRADER

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="vs-trl-")
        workdir = Path(tmp.name)
    began = time.perf_counter()
    inputs = prepare_inputs(args, workdir, sizes)
    (workdir / "prompts-all.jsonl").write_text("".join(json.dumps(p) + "\n" for p in inputs["prompts"]))
    env = child_env(args.threads, args.malloc_mmap_threshold)
    settings = {
        k: getattr(args, k)
        for k in ("threads", "iterations", "warmup", "prompts", "samples", "ppo_prompts", "minibatch", "epochs",
                  "max_new_tokens", "temperature", "kl_coef", "lr", "vf_coef", "trl_gradient_checkpointing", "n_train",
                  "malloc_mmap_threshold")
    }
    runs: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for seed in range(args.seeds):
        for name in sizes:
            model = inputs["models"][name]
            for algorithm in algorithms:
                per_iteration = args.prompts if algorithm == "grpo" else args.ppo_prompts
                spec = {
                    "repo_root": str(REPO), "model_dir": model["dir"], "train_file": inputs["train_file"],
                    "grader": dict(DEFAULT_GRADER), "algorithm": algorithm, "seed": seed,
                    "threads": args.threads, "iterations": args.iterations, "warmup": args.warmup,
                    "prompts_per_iteration": per_iteration,
                    "samples_per_prompt": args.samples if algorithm == "grpo" else 1,
                    "minibatch_size": args.minibatch, "ppo_epochs": args.epochs,
                    "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                    "kl_coef": args.kl_coef, "lr": args.lr, "vf_coef": args.vf_coef,
                    "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
                }
                expected = ordered_prompts(inputs["prompts"], args.iterations, per_iteration, seed)
                prompts_file = workdir / f"prompts-{algorithm}-seed{seed}.jsonl"
                if algorithm == "grpo":
                    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in expected))
                else:  # TRL's PPO shuffles its dataloader itself: it gets the whole pool
                    prompts_file = workdir / "prompts-all.jsonl"
                spec["prompts_file"] = str(prompts_file)
                script = "_trl_grpo.py" if algorithm == "grpo" else "_trl_ppo.py"
                sides = [("ours", sys.executable, "_ours_rl.py"), ("trl", pythons[algorithm], script)]
                if seed % 2:
                    sides.reverse()  # alternate which side runs first, against drift in machine load
                results = {}
                for side, python, worker in sides:
                    tag = f"{name}-{algorithm}-seed{seed}-{side}"
                    print(f"[{time.perf_counter() - began:6.0f}s] {tag} ...", flush=True)
                    results[side] = run_side(python, worker, spec, workdir, tag, env, args.run_timeout)
                    results[side]["warmup"] = args.warmup
                    print(
                        f"         {results[side]['samples_per_s']:.2f} samples/s "
                        f"({results[side]['samples_per_cpu_s']:.2f} per CPU-s), "
                        f"peak {results[side]['peak_rss_mb']:.0f} MB, wall {results[side]['wall_s']:.0f}s",
                        flush=True,
                    )
                if algorithm == "grpo":
                    seen = results["trl"].get("prompts_seen", [])
                    results["trl"]["same_prompts"] = seen == [p["prompt"] for p in expected[: len(seen)]] and len(seen) > 0
                runs.setdefault((name, algorithm), []).append((results["ours"], results["trl"]))

    rows = [
        build_row(name, algorithm, inputs["models"][name]["params"], runs[(name, algorithm)], settings)
        for name in sizes
        for algorithm in algorithms
    ]
    profiles = {
        name: ppo_profile([o for o, _ in runs[(name, "ppo")]]) for name in sizes if (name, "ppo") in runs
    }
    import torch
    import transformers

    report = {
        "benchmark": "vs_trl",
        "rows": rows,
        "ppo_profile": profiles,
        "settings": settings,
        "models": {k: {"params": v["params"], "config": v["config"]} for k, v in inputs["models"].items()},
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "trl_python": pythons.get("grpo"), "trl_ppo_python": pythons.get("ppo"),
            "trl_envs": {a: env_versions(p) for a, p in pythons.items()},
        },
        "measurement": "samples/s = completions finished per second over the iterations after the warm-up "
        "(rollout + update, wall clock); per CPU-s: the same per second of the process's CPU time (less "
        "sensitive to other load on the machine); peak MB = ru_maxrss of the side's process. Medians over seeds; the "
        "ratios are medians of the per-seed ratios (each pair ran back to back).",
        "runs": {
            f"{n}-{a}": [{"ours": o, "trl": t} for o, t in pairs] for (n, a), pairs in runs.items()
        },
        "total_s": time.perf_counter() - began,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(rows, profiles)
    print(f"wrote {out} ({report['total_s']:.0f}s)")
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
