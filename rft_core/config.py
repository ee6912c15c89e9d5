"""The one configuration object of a pipeline run: `RFTConfig` and its sections.

Every section owns its defaults and documents each field. A config loads from YAML
(`RFTConfig.from_yaml`), takes `section.key=value` overrides (`apply_overrides`), and
rejects unknown keys with an error that names the key and the nearest valid one.

TRL's names of the same settings (`rl.beta`, `rl.num_generations`, `sft.learning_rate`, ...: the table
`TRL_ALIASES`) are accepted in YAML and `--set` and renamed to ours before validation, with a log
line that names our key; so a config is always stored, dumped and digested under our names.

Why one module of ~700 lines: it is the reference of every setting. Most of it is field
declarations with their descriptions, read top to bottom in the order of a run (data, model, SFT,
RL, grader, evaluation, tracking, registry); split by section, a reader would page through eight
files to see what one run is configured with, and the loading code (overrides, aliases, errors)
serves all sections alike.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

logger = logging.getLogger("rft.config")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    # allow_inf_nan: `inf` or `nan` is never a usable setting (an infinite lr or number of epochs
    # would run until it broke something); refused where the config is loaded.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


# --------------------------------------------------------------------------- data


class ColumnsConfig(Section):
    """Column names for CSV and Parquet files (other formats have fixed field names)."""

    id: str | None = Field(None, description="Column with a unique item id; None numbers the rows.")
    prompt: str = Field("prompt", description="Column with the task text shown to the model.")
    reference: str = Field("reference", description="Column with the reference (final) answer.")
    solution: str | None = Field(
        "solution", description="Column with a worked solution (optional; used by warm-up SFT)."
    )


class SyntheticConfig(Section):
    """The built-in tasks: multi-step arithmetic word problems, or case reports to rank causes for."""

    task: Literal["arithmetic", "rank"] = Field(
        "arithmetic",
        description="arithmetic: word problems, graded numeric_match; rank: case reports -> a ranked "
        "list of likely causes, graded rank (steps, operands, values, distractors and slips apply to "
        "arithmetic only).",
    )
    n_train: int = Field(2000, ge=1, description="Items in the training file.")
    n_val: int = Field(300, ge=1, description="Items in the validation file (disjoint from train).")
    min_steps: int = Field(1, ge=1, description="Fewest arithmetic steps in a problem.")
    max_steps: int = Field(2, ge=1, description="Most arithmetic steps in a problem.")
    max_operand: int = Field(5, ge=2, description="Largest operand drawn for a step.")
    max_value: int = Field(
        30, ge=4, description="Largest value any quantity may take (every result is an integer in 1..this)."
    )
    distractor_fraction: float = Field(
        0.3, ge=0.0, le=1.0,
        description="Share of problems with one unrelated fact (so the model must look up the right name).",
    )
    solution_fraction: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Share of training items that carry a worked solution (the RFT setting: few; "
        "the rest have only the reference answer).",
    )
    slip_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Share of worked solutions that contain one arithmetic slip (imperfect "
        "demonstrations, as human or weaker-model annotations have); the reference stays right.",
    )
    seed: int = Field(0, description="Seed of the generator.")

    @model_validator(mode="after")
    def _steps_in_order(self) -> SyntheticConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) is larger than max_steps ({self.max_steps})")
        return self

    @model_validator(mode="after")
    def _slips_are_arithmetic(self) -> SyntheticConfig:
        if self.task == "rank" and self.slip_fraction > 0:
            raise ValueError("slip_fraction applies to the arithmetic task only; the rank task has no slips")
        return self


_DELIMITER_NAMES = {"tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


class DataConfig(Section):
    """Where the task items come from and how they are split into train and validation."""

    train_path: str | None = Field(
        None, description="Training data file; None generates the built-in synthetic task."
    )
    val_path: str | None = Field(
        None, description="Validation file; None carves the validation set out of train_path."
    )
    format: Literal["auto", "openai", "gsm8k", "reft", "csv", "parquet"] = Field(
        "auto", description="File format; auto detects it from the extension and the fields."
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    csv_delimiter: str = Field(
        "auto",
        description="Field delimiter of CSV files: one character (',', ';', '|', a tab: \"\\t\" in YAML), "
        "or tab, comma, semicolon, pipe by name, or auto: the one of , ; tab | that splits the header "
        "into the data.columns names, else what csv.Sniffer finds in the first lines, else ',' (tab "
        "for .tsv files).",
    )
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of items held out for validation."
    )
    val_size: int | None = Field(
        None, ge=1, description="Number of items held out for validation (overrides val_fraction)."
    )
    seed: int = Field(0, description="Seed of the train/validation split.")
    max_items: int | None = Field(
        None, ge=1, description="Use at most this many training items (after validation)."
    )
    near_duplicate_threshold: float = Field(
        0.9, gt=0.0, le=1.0,
        description="Word 3-gram Jaccard similarity at or above which a train/validation pair is "
        "reported as possible leakage.",
    )
    strip_calculator_annotations: bool = Field(
        True, description="Remove GSM8K calculator annotations like <<48/2=24>> from solutions."
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("csv_delimiter", mode="before")
    @classmethod
    def _one_character(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = _DELIMITER_NAMES.get(value.lower(), value)
        if value != "auto" and (len(value) != 1 or value in "\"\r\n"):
            raise ValueError(
                f"csv_delimiter must be one character other than a quote or a line break, a name "
                f"({', '.join(_DELIMITER_NAMES)}) or auto; got {value!r}"
            )
        return value


# --------------------------------------------------------------------------- model


class LoraSection(Section):
    """LoRA adapters through peft; disabled means full fine-tuning."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Adapter scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Modules to adapt: a list of names or 'all-linear'."
    )


class TinyModelConfig(Section):
    """The built-in small model: a Llama-style decoder built from a config, with its own tokenizer."""

    hidden_size: int = Field(128, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    intermediate_size: int = Field(384, ge=8, description="Width of the MLP.")
    max_position_embeddings: int = Field(512, ge=32, description="Longest sequence in tokens.")
    vocab_size: int = Field(
        512, ge=300, description="Tokenizer vocabulary size (byte-level BPE, digits split: > 256)."
    )
    pretrain_steps: int = Field(
        200, ge=0,
        description="Steps of language-model pretraining on generated text of the task's family "
        "before anything else (gives the tiny model prior competence, as a real base model has).",
    )
    pretrain_batch_size: int = Field(
        32, ge=1, description="Packed 128-token sequences per pretraining step."
    )
    pretrain_lr: float = Field(1e-3, gt=0.0, description="Peak pretraining learning rate.")
    seed: int = Field(0, description="Seed of the initial weights and of the pretraining data.")


class ModelConfig(Section):
    """The policy model: a hub id, a local path, or the built-in `tiny` preset."""

    name_or_path: str = Field(
        "tiny", description="Hugging Face hub id, local directory, or 'tiny' for the built-in model."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Precision of training and generation. float32: everything in float32. "
        "bfloat16 / float16: mixed precision, as TRL's bf16=True means: the trained weights and "
        "their optimizer state stay float32, forward passes run under autocast to that type "
        "(float16 adds a gradient scaler), and frozen weights (a LoRA base, the RL "
        "reference model) are stored in it. Trained models are saved in float32 (a merged LoRA "
        "model in its base's type). auto: bfloat16 on a GPU that supports it, else float32.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Device; auto picks CUDA, then MPS, then CPU."
    )
    use_chat_template: bool | None = Field(
        None, description="Format prompts with the tokenizer's chat template; None: when it has one."
    )
    prompt_template: str = Field(
        "{prompt}\n",
        description="How a prompt is written for a model without a chat template; {prompt} is the "
        "item's prompt.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    gradient_checkpointing: bool = Field(
        False,
        description="Trade compute for activation memory: decoder layers keep only their inputs and "
        "recompute their activations in the backward pass (SFT and RL updates).",
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


# --------------------------------------------------------------------------- training


class SFTConfig(Section):
    """Warm-up supervised fine-tuning on the items that carry a worked solution."""

    enabled: bool = Field(True, description="Run warm-up SFT; off starts RL from the base model.")
    epochs: float = Field(
        20.0, gt=0.0,
        description="Passes over the items with solutions. 20 is the built-in demo's (the tiny model "
        "on 200 solutions, where 10 left SFT still climbing); a pretrained hub model wants 1-3 (ReFT's "
        "warm-up is 2, as configs/gsm8k.yaml sets). keep_best keeps the best validation checkpoint.",
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps; overrides epochs when set."
    )
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps warming up.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up; cosine and linear decay to 0."
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    max_length: int = Field(512, ge=16, description="Longest prompt+solution in tokens; longer is cut.")
    eval_interval: int = Field(
        25, ge=0, description="Validate every N steps (0: only at the end)."
    )
    checkpoint_interval: int = Field(
        100, ge=0, description="Checkpoint every N steps (0: only at the end)."
    )
    keep_best: bool = Field(
        True, description="End with the checkpoint of best validation accuracy, not the last one."
    )
    seed: int = Field(0, description="Seed of data order and dropout.")


class GRPOSection(Section):
    """Options of the critic-free GRPO update."""

    scale_rewards: bool = Field(
        True, description="Divide group-centred rewards by the group's std (Dr. GRPO turns it off)."
    )


class GuardSection(Section):
    """The guard on an RL run (rft_core/rl/guard.py): watches validation, the KL to the warm-up model
    and the entropy against their values at RL start, and rolls back or stops a run that is making
    its model worse. Validation is watched only when it runs at RL start (rl.eval_interval > 0)."""

    enabled: bool = Field(True, description="Watch the run (on by default).")
    action: Literal["rollback", "stop"] = Field(
        "rollback",
        description="rollback: restore the best validated weights (the start model when nothing better "
        "was validated), clear the optimizer's moments, multiply the lr by lr_factor, and go on; after "
        "max_rollbacks, stop. stop: end training at once. Either way the stage ends with the best "
        "validated weights, which evaluation and the registry gate then see.",
    )
    metrics: list[str] = Field(
        default_factory=lambda: ["val_accuracy", "val_sampled_reward"],
        description="Validation metrics watched (greedy accuracy, mean reward of sampled completions).",
    )
    margin: float = Field(
        0.1, ge=0.0, description="How far below its value at RL start a watched metric may fall (absolute)."
    )
    patience: int = Field(2, ge=1, description="Validations in a row below the margin before acting.")
    max_kl: float | None = Field(
        1.0, gt=0.0,
        description="KL to the warm-up model per response token (nats) above which the policy has run "
        "away from the model it started from; None: not watched.",
    )
    entropy_ratio: float | None = Field(
        5.0, gt=1.0,
        description="The policy's entropy per token may move by this factor from its first value, up "
        "(dissolving into noise) or down (collapsing onto one answer); None: not watched.",
    )
    iteration_patience: int = Field(5, ge=1, description="Iterations in a row past max_kl or entropy_ratio before acting.")
    lr_factor: float = Field(0.5, gt=0.0, le=1.0, description="What a rollback multiplies the learning rate by.")
    max_rollbacks: int = Field(2, ge=0, description="Rollbacks before the guard stops the run instead.")


class RLConfig(Section):
    """Reinforcement with the grader: PPO as in ReFT, or GRPO."""

    enabled: bool = Field(True, description="Run the RL stage.")
    algorithm: Literal["ppo", "grpo"] = Field("ppo", description="ppo (value head, GAE) or grpo.")
    iterations: int = Field(
        300, ge=1, description="Rollout + update iterations (each samples prompts_per_iteration)."
    )
    prompts_per_iteration: int = Field(32, ge=1, description="Prompts sampled per iteration.")
    samples_per_prompt: int = Field(4, ge=1, description="Completions per prompt (ReFT used 1).")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    minibatch_size: int = Field(32, ge=1, description="Completions per gradient step.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Split each minibatch into chunks of this many completions "
        "(gradient accumulation, to bound memory); None: no split.",
    )
    group_by_length: bool = Field(
        True,
        description="Cut each epoch's minibatches from prompt groups sorted by response length (ties "
        "and the minibatches' order shuffled), so each is trimmed of most of its padding (HF "
        "Trainer's group_by_length): less compute per epoch. Each minibatch's loss divides by the "
        "batch's response tokens per minibatch, so an epoch's gradient stays the batch's token mean.",
    )
    shared_prompt_forward: bool = Field(
        True,
        description="Score and train the samples of a prompt with one pass over the prompt (its KV "
        "cache shared by the group): same result, (K-1)/K less prompt compute.",
    )
    generation_batch_size: int = Field(
        256, ge=1, description="Completions generated together (prompts x samples per call)."
    )
    lr: float = Field(2e-4, gt=0.0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear lr warm-up.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine",
        description="Decay over iterations after warm-up: iteration i of n trains at lr x 1 "
        "(constant), 1 - i/n (linear) or (1 + cos(pi i/n))/2 (cosine).",
    )
    kl_coef: float = Field(
        0.05, ge=0.0, description="Per-token KL penalty to the warm-up model (ReFT: 0.05 N-CoT, 0.01 P-CoT)."
    )
    kl_target: float | None = Field(
        None, gt=0.0,
        description="Adaptive KL (Ziegler et al. 2019; verl's AdaptiveKLController, OpenRLHF's "
        "kl_target): after each iteration kl_coef moves by up to 20 % x samples / kl_horizon toward "
        "holding the KL to the warm-up model at this many nats per sample; rl.kl_coef is where it "
        "starts. None: kl_coef stays fixed.",
    )
    kl_horizon: int = Field(
        10000, ge=1, description="Adaptive KL: the samples over which kl_coef may move by 20 %."
    )
    target_kl: float | None = Field(
        None, gt=0.0,
        description="Early stop of an iteration's update (Spinning Up's PPO, TRL's target_kl): once "
        "a step's approx_kl (old policy to new, per token) exceeds 1.5 x this, the iteration's "
        "remaining steps are skipped (rl/update_steps counts the steps taken). None: off.",
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="KL estimator in the reward: k1 = logp - logp_ref (ReFT), k3 (always >= 0)."
    )
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    critic_lam: float | None = Field(
        None, ge=0.0, le=1.0,
        description="GAE lambda of the critic's targets (VC-PPO's decoupled GAE): 1.0 makes them the "
        "Monte-Carlo returns, free of the critic's own errors; the policy's advantages keep rl.lam. "
        "None: rl.lam for both.",
    )
    clip_range: float = Field(0.2, gt=0.0, description="PPO ratio clip.")
    vf_clip_range: float = Field(0.2, gt=0.0, description="Value prediction clip around old values.")
    vf_coef: float = Field(
        0.5, ge=0.0,
        description="Value loss coefficient. The value head shares the policy's trunk, so this weighs "
        "the critic's gradient against the policy's: 0.5 as in shared-trunk PPO (OpenAI baselines, "
        "CleanRL); ReFT's 5 (7B models at lr 3e-7) let the value loss take over the trunk and collapse "
        "the tiny model's policy (bench/README.md).",
    )
    whiten_advantages: bool = Field(True, description="Normalise advantages over the batch.")
    critic_lr: float | None = Field(
        None, gt=0.0,
        description="PPO: peak learning rate of the value head (its own, as verl's and OpenRLHF's "
        "critics have); it follows the same warm-up and decay. None: rl.lr.",
    )
    critic_detached: bool = Field(
        False,
        description="PPO: the value head reads the policy's hidden states detached, so the value loss "
        "trains the head alone and never moves the policy's trunk (as with a separate critic model, "
        "verl's and OpenRLHF's layout); False: the value loss also trains the shared trunk (vf_coef).",
    )
    critic_warmup: int = Field(
        10, ge=0,
        description="PPO: for the first N iterations train only the value head (the policy's trunk "
        "frozen, its optimizer state untouched, no policy loss), so that the critic's values mean "
        "something before they shape the policy's advantages (verl's critic_warmup). The head starts at 0. Must be below "
        "rl.iterations (0 for short runs); GRPO has no critic and ignores it.",
    )
    filter_flat_groups: bool = Field(
        False,
        description="Leave out of the update the prompts whose samples all scored the same (every "
        "sample right, or every one wrong): they carry no comparison between samples (DAPO's dynamic "
        "sampling, without drawing replacements). Their share is logged as rl/flat_groups.",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of rollouts.")
    top_k: int = Field(0, ge=0, description="Top-k sampling: only the k most probable tokens (0: off).")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0,
        description="Nucleus sampling: only the most probable tokens that together hold this much "
        "probability (1: off). With top_k/top_p/min_p on, the RL log-probabilities (old, new, "
        "reference) are those of the truncated distribution sampled from (rft_core/rl/rollout.py).",
    )
    min_p: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Min-p sampling: only tokens at least min_p times as probable as the most probable "
        "one (0: off). Filters apply in the order top_k, top_p, min_p.",
    )
    max_new_tokens: int = Field(48, ge=1, description="Longest sampled completion.")
    max_prompt_length: int = Field(384, ge=8, description="Longer prompts are cut from the left.")
    eval_interval: int = Field(30, ge=0, description="Validate every N iterations (0: only at the end).")
    checkpoint_interval: int = Field(10, ge=0, description="Checkpoint every N iterations.")
    keep_best: bool = Field(
        False, description="End with the iterate of best validation accuracy instead of the last."
    )
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    guard: GuardSection = Field(default_factory=GuardSection)
    seed: int = Field(0, description="Seed of prompt order and sampling.")

    @model_validator(mode="after")
    def _policy_trains(self) -> RLConfig:
        if self.algorithm == "ppo" and self.critic_warmup >= self.iterations:
            raise ValueError(
                f"critic_warmup ({self.critic_warmup}) leaves no iteration of rl.iterations "
                f"({self.iterations}) to train the policy: set rl.critic_warmup below it "
                "(rl.critic_warmup=0 for a short run)"
            )
        return self


# --------------------------------------------------------------------------- grading, evaluation


DEFAULT_GRADER: dict[str, Any] = {
    "type": "numeric_match",
    "name": "answer",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.reference }}",
    "partial_credit": 0.1,
}


class GraderConfig(Section):
    """The grader that scores samples, in OpenAI's RFT grader JSON (plus numeric_match and rank)."""

    spec: dict[str, Any] | None = Field(
        None, description="Grader JSON inline; None and no file: numeric_match on item.reference."
    )
    file: str | None = Field(None, description="Path to a grader JSON/YAML file (instead of spec).")
    workers: int = Field(
        0, ge=0, description="Grading processes (0: in-process, except the python grader)."
    )
    timeout_s: float = Field(
        10.0, gt=0.0,
        description="Time limit of one python-grader call, end to end: loading the grader's source "
        "(its imports) included.",
    )
    memory_mb: int = Field(1024, ge=64, description="Memory limit of the python-grader process.")
    max_error_share: float = Field(
        0.2, ge=0.0, le=1.0,
        description="A stage fails when more than this share of the samples of one RL iteration, one "
        "validation or one evaluation are grader errors (the grader raised, timed out, returned no "
        "score): rewards made mostly of errors train and rank on nothing.",
    )
    sandbox: Literal["namespaces", "none"] = Field(
        "namespaces",
        description="How python graders are isolated. namespaces: Linux user/mount/network/PID/IPC "
        "namespaces, read-only root, private /tmp, limits (refused where the kernel allows none); "
        "none: NO isolation, for trusted grader code only (warned about and tagged on every run).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> GraderConfig:
        if self.spec is not None and self.file is not None:
            raise ValueError("give grader.spec or grader.file, not both")
        return self

    def resolved_spec(self) -> dict[str, Any]:
        """The grader JSON this section describes (inline, from the file, or the default)."""
        if self.file is not None:
            from rft_core.graders import load_grader_spec

            return load_grader_spec(self.file)
        return dict(self.spec) if self.spec is not None else dict(DEFAULT_GRADER)


class EvalConfig(Section):
    """Evaluation on the validation set: greedy accuracy, mean reward, pass@k, maj@k."""

    max_items: int | None = Field(None, ge=1, description="Evaluate at most this many items.")
    pass_threshold: float = Field(
        1.0, ge=0.0, le=1.0, description="A sample is correct when its reward is at least this."
    )
    k: int = Field(0, ge=0, description="Samples per item for pass@k and maj@k (0: greedy only).")
    temperature: float = Field(1.0, gt=0.0, description="Temperature of the k samples.")
    top_k: int = Field(0, ge=0, description="Top-k filter of the k samples (0: off).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus (top-p) filter of the k samples (1: off).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Min-p filter of the k samples (0: off).")
    max_new_tokens: int = Field(48, ge=1, description="Longest generated answer.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    num_logged_samples: int = Field(32, ge=0, description="Completions kept in the samples table.")
    sampled_validation: bool = Field(
        True,
        description="Validation during training also samples one completion per item at "
        "eval.temperature and logs its mean reward (val_sampled_reward, beside the greedy val_accuracy); "
        "costs one more generation pass per validation.",
    )
    seed: int = Field(0, description="Seed of the sampled completions.")


# --------------------------------------------------------------------------- tracking, registry


class TrackingConfig(Section):
    """Where MLflow runs go."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; None uses MLFLOW_TRACKING_URI, else "
        "sqlite:///<output_dir>/mlflow.db.",
    )
    log_models: bool = Field(True, description="Log the trained model to MLflow.")


class RegistryConfig(Section):
    """Model registry: which name to register under and when the champion alias moves."""

    enabled: bool = Field(True, description="Register the trained model as a new version.")
    model_name: str = Field("rft-model", description="Registered model name.")
    metric: str = Field("eval/accuracy", description="Validation metric the gate compares.")
    greater_is_better: bool = Field(True, description="Direction of the gate's metric.")
    min_improvement: float = Field(
        0.0, ge=0.0, description="How much the challenger must beat the champion by."
    )
    promote: bool = Field(True, description="Run the promotion gate after registering.")
    max_grader_error_share: float = Field(
        0.5, ge=0.0, le=1.0,
        description="The gate never promotes a version whose validation grades were more than this "
        "share grader errors (tag metric.eval/grader_error_share), even with no champion yet.",
    )

    @field_validator("model_name")
    @classmethod
    def _registrable(cls, name: str) -> str:
        problem = registered_name_problem(name)
        if problem:
            raise ValueError(problem)
        return name


def registered_name_problem(name: str) -> str | None:
    """Why `name` cannot be a registered model's name in MLflow and in rft's model URIs
    (`models:/NAME@champion`), or None. MLflow refuses '/' and ':' only when registering, after
    training; '@' would make the alias URI ambiguous."""
    if not name.strip() or name != name.strip():
        return f"{name!r} is empty, or has spaces at its ends"
    bad = sorted({c for c in name if c in "/:@" or not c.isprintable()})
    if bad:
        fixed = "".join("-" if c in bad else c for c in name)
        return f"{name!r} may not contain {' '.join(map(repr, bad))} (e.g. {fixed!r})"
    if name in (".", "..") or name.endswith(".rft-lock"):
        return f"{name!r} is reserved"
    return None


# --------------------------------------------------------------------------- the whole


class RFTConfig(Section):
    """A whole pipeline run: data, model, SFT, RL, grader, evaluation, tracking, registry."""

    experiment: str = Field("rft", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Name of the MLflow parent run.")
    output_dir: str = Field("rft_runs", description="Checkpoints, manifests, reports and caches.")
    seed: int = Field(0, description="Global seed (torch, python, numpy) set at every stage.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    grader: GraderConfig = Field(default_factory=GraderConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @model_validator(mode="before")
    @classmethod
    def _trl_names(cls, data: Any) -> Any:
        """TRL's names become ours before validation, whichever way the config arrives."""
        if not isinstance(data, dict):
            return data
        try:
            return canonical_names(data)
        except ConfigError as exc:
            raise PydanticCustomError("trl_alias", "{message}", {"message": str(exc)}) from None

    # ---- construction

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RFTConfig:
        """Build a config, turning pydantic's errors into one message per bad key."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RFTConfig:
        """Load a YAML (or JSON) file, then apply `section.key=value` overrides."""
        from rft_core.files import FileProblem, read_text, yaml_error

        path = Path(path)
        try:
            raw = yaml.safe_load(read_text(path, "config file")) or {}
        except FileProblem as exc:
            raise ConfigError(str(exc)) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_error(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections, got {type(raw).__name__}")
        try:
            raw = canonical_names(raw)  # before the overrides, so that `--set` wins over the file
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls.from_dict(apply_overrides(raw, overrides or []), source=str(path))

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> RFTConfig:
        """The config a CLI call means: a file plus overrides, or the defaults plus overrides."""
        if path is not None:
            return cls.from_yaml(path, overrides)
        return cls.from_dict(apply_overrides({}, overrides or []), source="--set")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    # ---- digests: cache keys of the stages

    def digest(self, *sections: str) -> str:
        """A short stable hash of the named sections (all of them when none is named)."""
        dumped = self.model_dump(mode="json")
        if sections:
            dumped = {name: dumped[name] for name in sections}
        text = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- TRL's names


TRL_ALIASES: dict[str, dict[str, str]] = {
    # section -> {TRL's name: ours}. TRL's SFTConfig/GRPOConfig are flat TrainingArguments; here the
    # same setting lives in the section of the stage it belongs to.
    "sft": {
        "learning_rate": "lr",
        "per_device_train_batch_size": "batch_size",  # both: sequences per micro-batch per process
        "gradient_accumulation_steps": "grad_accum",
        "num_train_epochs": "epochs",
        "lr_scheduler_type": "lr_scheduler",
        "max_seq_length": "max_length",  # TRL's SFTConfig before 0.20
    },
    "rl": {
        "learning_rate": "lr",
        "beta": "kl_coef",
        "num_generations": "samples_per_prompt",
        "max_completion_length": "max_new_tokens",
        "num_iterations": "ppo_epochs",  # GRPOConfig: "iterations per batch" (mu), not our rl.iterations
        "num_ppo_epochs": "ppo_epochs",  # TRL's PPOConfig
        "epsilon": "clip_range",  # GRPOConfig
        "cliprange": "clip_range",  # PPOConfig
        "cliprange_value": "vf_clip_range",  # PPOConfig
        "lr_scheduler_type": "lr_scheduler",
    },
}

# TRL's names with no one-to-one key in a section: refused, with what to set instead.
TRL_REFUSED: dict[str, dict[str, str]] = {
    "rl": {
        "per_device_train_batch_size": (
            "TRL counts completions per process per micro-step; here rl.minibatch_size is the completions "
            "per optimizer step over all processes (TRL: per_device_train_batch_size x "
            "gradient_accumulation_steps x processes) and rl.micro_batch_size splits it to bound memory"
        ),
        "gradient_accumulation_steps": (
            "set rl.minibatch_size (completions per optimizer step) and rl.micro_batch_size (completions "
            "per forward/backward); their ratio is the accumulation"
        ),
        "num_train_epochs": (
            "RL runs rl.iterations iterations of rl.prompts_per_iteration prompts each: for TRL's "
            "num_train_epochs E on N training prompts set rl.iterations = E x N / rl.prompts_per_iteration "
            "(TRL's num_iterations, passes over each batch, is rl.ppo_epochs)"
        ),
    },
}


# TRL names that are ours too (GRPOConfig's generation and PPO settings): only their place differs.
TRL_SAME_NAME = ("temperature", "top_k", "top_p", "min_p", "max_prompt_length", "kl_coef", "vf_coef", "gamma", "lam")


def _trl_targets(name: str) -> list[str]:
    """Our dotted keys for a TRL name, in any section (for errors about a name in the wrong place)."""
    targets = [f"{section}.{ours}" for section, table in TRL_ALIASES.items() for trl, ours in table.items() if trl == name]
    if name in TRL_SAME_NAME:
        targets.append(f"rl.{name}")
    return targets


def canonical_names(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with TRL's names in the sections renamed to ours (logged); giving a TRL name
    and our name of the same setting is an error that names both."""
    result = dict(raw)
    for section, table in TRL_ALIASES.items():
        values = result.get(section)
        if not isinstance(values, dict) or not any(name in values for name in table):
            continue
        values = dict(values)
        given: dict[str, str] = {}  # our key -> the name it was given under
        for name in list(values):
            ours = table.get(name)
            if ours is None:
                continue
            for other in (ours, *(trl for trl, target in table.items() if target == ours and trl != name)):
                if other in values:
                    first, second = sorted((f"{section}.{name}", f"{section}.{other}"))
                    raise ConfigError(
                        f"'{first}' and '{second}' are the same setting ('{section}.{ours}'; TRL's "
                        f"name is accepted as an alias): give it once"
                    )
            given[ours] = name
            values[ours] = values.pop(name)
        for ours, name in given.items():
            logger.info("%s.%s is TRL's name: using %s.%s", section, name, section, ours)
        result[section] = values
    return result


# --------------------------------------------------------------------------- overrides, errors


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars or flow collections: 3, 0.1, true, null, [a, b], {a: 1}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `a.b.c=value` applied; keys are checked on validation.

    A TRL name (`rl.beta=0.1`) sets our key (`rl.kl_coef`), so it overrides the file's value under
    either name; giving both names of one setting in the same list is an error."""
    result = json.loads(json.dumps(raw))
    spelled: dict[str, str] = {}  # our dotted key -> how this list spelled it
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set {item!r}: empty key")
        if len(keys) == 2 and keys[1] in TRL_ALIASES.get(keys[0], {}):
            ours = TRL_ALIASES[keys[0]][keys[1]]
            logger.info("%s.%s is TRL's name: using %s.%s", keys[0], keys[1], keys[0], ours)
            keys = [keys[0], ours]
        written, canonical = ".".join(k for k in dotted.strip().split(".") if k), ".".join(keys)
        if spelled.setdefault(canonical, written) != written:
            first, second = sorted((spelled[canonical], written))
            raise ConfigError(
                f"--set '{first}' and '{second}' are the same setting ('{canonical}'; TRL's name is "
                "accepted as an alias): give it once"
            )
        node = result
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[keys[-1]] = _parse_value(value)
    return result


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section class that owns the key at `loc` (for 'did you mean' suggestions)."""
    model: type[BaseModel] | None = RFTConfig
    for key in loc[:-1]:
        if model is None or not isinstance(key, str) or key not in model.model_fields:
            return None
        annotation = model.model_fields[key].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _unknown_key_hint(loc: tuple[Any, ...]) -> str:
    """What to say after "unknown key 'x.y'": TRL's names first, then the nearest valid key."""
    name, parent = str(loc[-1]), ".".join(map(str, loc[:-1]))
    section = parent if len(loc) == 2 else None
    refused = TRL_REFUSED.get(section or "", {}).get(name)
    if refused:
        return f": TRL's name, with no one-to-one key here: {refused}"
    targets = [t for t in _trl_targets(name) if t != f"{parent}.{name}"]
    if targets:
        where = " or ".join(f"'{t}'" for t in targets)
        return f"; '{name}' is TRL's name, here it is {where}"
    owner = _model_at(loc)
    known = list(owner.model_fields) if owner else []
    aliases = TRL_ALIASES.get(section or "", {})
    close = difflib.get_close_matches(name, known + list(aliases), n=1, cutoff=0.5)
    prefix = f"{parent}." if parent else ""
    if close and close[0] in aliases:
        return f"; did you mean '{prefix}{close[0]}' (TRL's name for '{prefix}{aliases[close[0]]}')?"
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f" (valid keys: {', '.join(known)})" if known else ""


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(part) for part in loc)
        if err["type"] == "trl_alias":
            lines.append(f"{source}: {err['msg']}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{dotted}'{_unknown_key_hint(loc)}")
        elif err["type"] == "value_error":  # our validators' own words, which show the value
            lines.append(f"{source}: {dotted or '<root>'}: {err['ctx']['error']}")
        else:
            lines.append(f"{source}: {dotted or '<root>'}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
