"""One run of `bench/gpu.py`: our `RLTrainer` or TRL's `GRPOTrainer`, a few iterations, timed.

    python bench/_gpu_worker.py SPEC.json OUT.json        (started by gpu.py, one process per run)

A process per run, so each peak-memory reading (`torch.cuda.max_memory_allocated`) covers one
trainer alone. Per iteration: wall time (the device synchronised at both ends), the time spent
generating and how many tokens were generated, the time of the update (forward, backward and
optimizer steps over all epochs) and how many tokens (prompt + response) went through it.

Ours: `RLTrainer.iteration` (rollout, statistics, update: what `run_rl` runs per iteration, without
validation and checkpoints); its own statistics give the tokens and times (`rollout_tokens_per_s`,
`update_tokens_per_s`, `time_generate`, `time_update`). TRL: `trl.GRPOTrainer.train()`, with
instance-level wrappers around its generation (`_generate`) and its rollout
(`_generate_and_score_completions`: generation, rewards, old and reference log-probs); its update
is the rest of the iteration.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _memory(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        import torch

        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def _allocated_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.memory_allocated() / 2**30


def summarise(its: list[dict[str, float]], warmup: int, samples_per_iteration: int) -> dict[str, Any]:
    """Throughput over the iterations after the warm-up ones."""
    measured = its[warmup:]
    if not measured:
        raise ValueError(f"need more than {warmup} iterations to measure")

    def total(key: str) -> float:
        return sum(it[key] for it in measured)

    wall = total("wall_s")
    return {
        "measured_iterations": len(measured),
        "seconds_per_iteration": wall / len(measured),
        "samples_per_s": samples_per_iteration * len(measured) / wall,
        "rollout_tokens_per_s": total("generated_tokens") / total("generate_s"),
        "update_tokens_per_s": total("update_tokens") / total("update_s"),
        "generated_tokens_per_iteration": total("generated_tokens") / len(measured),
        "update_tokens_per_iteration": total("update_tokens") / len(measured),
        "split_s": {k: total(k) / len(measured) for k in ("generate_s", "rollout_s", "update_s", "wall_s")},
    }


# --------------------------------------------------------------------------- ours


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from rft_core.config import RFTConfig
    from rft_core.data import load_items
    from rft_core.graders import build_grader
    from rft_core.rl.trainer import RLTrainer

    device = spec["device"]
    cfg = RFTConfig.from_dict(
        {
            "seed": spec["seed"],
            "model": {
                "name_or_path": spec["model_dir"],
                "device": device,
                "dtype": spec["dtype"],
                "gradient_checkpointing": spec["gradient_checkpointing"],
                "lora": {"enabled": spec["mode"] == "lora", **LORA},
            },
            "grader": {"spec": spec["grader"]},
            "rl": {
                "algorithm": spec["algorithm"],
                "iterations": spec["iterations"],
                "critic_warmup": 0,  # throughput: every iteration a full update, as TRL's
                "prompts_per_iteration": spec["prompts"],
                "samples_per_prompt": spec["samples"],
                "minibatch_size": spec["minibatch"],
                "ppo_epochs": spec["epochs"],
                "max_new_tokens": spec["max_new_tokens"],
                "temperature": spec["temperature"],
                "kl_coef": spec["kl_coef"],
                "lr": spec["lr"],
                "lr_scheduler": "constant",
                "eval_interval": 0,
                "checkpoint_interval": 0,
                "seed": spec["seed"],
            },
        }
    )
    torch.manual_seed(spec["seed"])
    train = load_items(spec["train_file"]).frame
    grader = build_grader(cfg.grader.resolved_spec())
    with tempfile.TemporaryDirectory(prefix="rft-gpu-") as out_dir:
        t0 = time.perf_counter()
        trainer = RLTrainer(cfg, train, train.iloc[:1], spec["model_dir"], out_dir, grader=grader)
        _sync(device)
        setup_s = time.perf_counter() - t0
        allocated_after_setup = _allocated_gib(device)
        its = []
        for iteration in range(spec["iterations"]):
            _sync(device)
            start = time.perf_counter()
            stats = trainer.iteration(iteration)
            _sync(device)
            its.append(
                {
                    "wall_s": time.perf_counter() - start,
                    "generate_s": stats["time_generate"],
                    "rollout_s": stats["time_generate"] + stats["time_grade"] + stats["time_score"],
                    "update_s": stats["time_update"],
                    "generated_tokens": stats["rollout_tokens_per_s"] * stats["time_generate"],
                    "update_tokens": stats["update_tokens_per_s"] * stats["time_update"],
                    "response_length": stats["response_length"],
                    "stop_rate": stats["stop_rate"],
                    "reward_mean": stats["reward_mean"],
                    "kl": stats["kl"],
                }
            )
        params = trainer.params
        return {
            "setup_s": setup_s,
            "allocated_after_setup_gib": allocated_after_setup,
            "trainable_params": sum(p.numel() for p in params),
            "model_params": sum(p.numel() for p in trainer.policy.parameters()),
            "trainable_dtype": str(params[0].dtype),
            "model_dtype": str(next(trainer.policy.parameters()).dtype),
            "has_reference_copy": trainer.reference is not None,
            "iterations": its,
            **summarise(its, spec["warmup"], spec["prompts"] * spec["samples"]),
        }


# --------------------------------------------------------------------------- TRL


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import trl
    from _worker_common import trl_grpo_settings
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rft_core.graders import build_grader, grade_batch

    device = spec["device"]
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    # Compute in spec["dtype"] (bf16: autocast, as ours), weights stored as our trainer stores them.
    dtype, weights_dtype = dtypes[spec["dtype"]], dtypes[spec["trl_weights_dtype"]]
    records = [json.loads(line) for line in Path(spec["prompts_file"]).read_text().splitlines()]
    dataset = Dataset.from_list(records)
    grader = build_grader(spec["grader"])
    k, p, m, e = spec["samples"], spec["prompts"], spec["minibatch"], spec["epochs"]
    steps_per_iteration = p * k // m * e

    prompts_seen: list[str] = []  # each prompt once, in the order TRL generated for them

    def numeric_match(prompts, completions, reference, **kwargs):
        results = grade_batch(grader, completions, [{"reference": r} for r in reference])
        prompts_seen.extend(prompts[::k])  # a group's K copies are adjacent
        return [r.reward for r in results]

    current: dict[str, float] = {}

    def timed(name: str, fn, on_result=None):
        def wrapper(*args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            current[name] = current.get(name, 0.0) + time.perf_counter() - t0
            if on_result is not None:
                on_result(out)
            return out

        return wrapper

    def count_tokens(out: dict) -> None:
        completion = float(out["completion_mask"].sum())
        current["generated_tokens"] = current.get("generated_tokens", 0.0) + completion
        # Every token of the batch goes through forward and backward once per epoch (num_iterations).
        current["update_tokens"] = current.get("update_tokens", 0.0) + (float(out["prompt_mask"].sum()) + completion) * e

    class Timer(TrainerCallback):
        def __init__(self):
            self.last, self.its = None, []

        def on_train_begin(self, args, state, control, **kw):
            _sync(device)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps_per_iteration:
                return
            _sync(device)
            now = time.perf_counter()
            it = {"wall_s": now - self.last, **current}
            it.setdefault("generate_s", 0.0)
            it.setdefault("rollout_s", 0.0)
            it["update_s"] = it["wall_s"] - it["rollout_s"]
            self.its.append(it)
            current.clear()
            self.last = now

    timer = Timer()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    peft_config = None
    if spec["mode"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], bias="none", task_type="CAUSAL_LM",
        )
    with tempfile.TemporaryDirectory(prefix="trl-gpu-") as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            use_cpu=device == "cpu",
            bf16=dtype == torch.bfloat16,
            fp16=False,
            model_init_kwargs={"dtype": weights_dtype},
            logging_steps=steps_per_iteration,
            **trl_grpo_settings(spec, minibatch=m, prompts=p, group=k, epochs=e,
                                steps_per_iteration=steps_per_iteration,
                                gradient_checkpointing=spec["gradient_checkpointing"]),
        )
        t0 = time.perf_counter()
        trainer = GRPOTrainer(
            model=spec["model_dir"],
            reward_funcs=numeric_match,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
            peft_config=peft_config,
        )
        trainer._generate = timed("generate_s", trainer._generate)
        trainer._generate_and_score_completions = timed(
            "rollout_s", trainer._generate_and_score_completions, count_tokens
        )
        _sync(device)
        setup_s = time.perf_counter() - t0
        allocated_after_setup = _allocated_gib(device)
        trainer.train()
    trainable = [q for q in trainer.model.parameters() if q.requires_grad]
    return {
        "trl_version": trl.__version__,
        "setup_s": setup_s,
        "allocated_after_setup_gib": allocated_after_setup,
        "trainable_params": sum(q.numel() for q in trainable),
        "model_params": sum(q.numel() for q in trainer.model.parameters()),
        "trainable_dtype": str(trainable[0].dtype),
        "model_dtype": str(next(trainer.model.parameters()).dtype),
        "has_reference_copy": trainer.ref_model is not None,
        "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "iterations": timer.its,
        "prompts_seen": prompts_seen,
        **summarise(timer.its, spec["warmup"], p * k),
    }


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = run_ours(spec) if spec["side"] == "ours" else run_trl(spec)
    result.update(_memory(spec["device"]))
    result.update({k: spec[k] for k in ("side", "algorithm", "mode")})
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
