"""Load causal LMs and tokenizers (hub id or local path), pick device and dtype, add or merge LoRA.

Text <-> tokens lives here too, because it depends on the tokenizer (and the model's generation
config): prompts are rendered with a chat template when the tokenizer has one (and the config
allows it), else with `model.prompt_template`. Where a response ends has one definition,
`end_of_response`: SFT targets end with its `token_id`, and rollouts, evaluation and the served
model stop on any of its `stop_ids`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from rft_core.config import ModelConfig
from rft_core.integrity import reading

if TYPE_CHECKING:
    import pandas as pd
    from peft import LoraConfig, PeftModel

# peft is imported where LoRA is used: a logged model that serves a full model (see
# rft_core.tracking.models) loads this module without it.

# Library progress bars for every shard load/save drown the stage's own progress lines.
hf_logging.disable_progress_bar()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when available, then Apple MPS, then CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, float32 elsewhere (CPU training stays exact)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def compute_in(device: torch.device, precision: torch.dtype) -> contextlib.AbstractContextManager:
    """Forward passes in `precision` over float32 weights (autocast), as training and validation
    run them; nothing to do in float32."""
    if precision == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision)


def load_tokenizer(name_or_path: str | Path, cfg: ModelConfig | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer ready for batched generation: a pad token and left padding."""
    cfg = cfg or ModelConfig()
    with reading(name_or_path, "tokenizer") if Path(name_or_path).is_dir() else contextlib.nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without one; the EOS token is the usual stand-in
        # (positions are masked everywhere it is used as padding).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    name_or_path: str | Path,
    cfg: ModelConfig | None = None,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a causal LM (hub id or directory) on `device` in `dtype`, in train mode."""
    cfg = cfg or ModelConfig()
    device = device or pick_device(cfg.device)
    dtype = dtype or pick_dtype(cfg.dtype, device)
    # A local directory's files are ours (a checkpoint, a stage's model): an error reading them
    # names the directory (safetensors' own messages, e.g. "incomplete metadata", do not).
    local = Path(name_or_path).is_dir()
    with reading(name_or_path, "model weights") if local else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
        )
    if cfg.gradient_checkpointing:
        # Non-reentrant (gradients reach LoRA adapters behind frozen embeddings); transformers 5
        # names it activation checkpointing (the old name warns) and makes that the default.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.to(device)


def lora_config(cfg: ModelConfig) -> LoraConfig:
    """The peft LoraConfig the `model.lora` section describes."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model: PreTrainedModel, cfg: ModelConfig) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters (B = 0, so the wrapped model equals the base)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg))


def merge_lora(model: torch.nn.Module) -> PreTrainedModel:
    """Fold LoRA adapters into the weights; a plain model passes through unchanged."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """`save_pretrained` for model (or adapter) and tokenizer into one directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- text <-> tokens


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.use_chat_template is None:
        return has_template
    if cfg.use_chat_template and not has_template:
        raise ValueError("model.use_chat_template is true but the tokenizer has no chat template")
    return cfg.use_chat_template


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    cfg: ModelConfig,
    prompt: str,
    messages: list[dict[str, Any]] | None = None,
) -> str:
    """The text the model continues: chat template with a generation prompt, or the template."""
    if uses_chat_template(tokenizer, cfg):
        chat = list(messages) if messages else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return cfg.prompt_template.format(prompt=prompt)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, text: str) -> list[int]:
    """Token ids of a rendered prompt. Chat templates carry their own BOS; plain text gets it added."""
    add_special = not uses_chat_template(tokenizer, cfg)
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    # Some tokenizers append EOS as a special token; a prompt must not end the sequence.
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def row_prompt_ids(tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, row: Any) -> list[int]:
    """Token ids of a canonical row's prompt: its `messages` when it has some, else its `prompt`."""
    messages = row.get("messages")
    messages = list(messages) if isinstance(messages, list | tuple) and len(messages) else None
    return encode_prompt(tokenizer, cfg, render_prompt(tokenizer, cfg, row["prompt"], messages))


def prompt_token_ids(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, max_length: int
) -> list[list[int]]:
    """Rendered and tokenized prompts of a frame; longer ones keep their last `max_length` tokens."""
    return [row_prompt_ids(tokenizer, cfg, row)[-max_length:] for _, row in frame.iterrows()]


# A stand-in for an assistant message's content: no whitespace (templates may trim), no markup.
_PROBE = "RFTRESPONSEPROBE"


def chat_turn_end(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token a chat template writes right after an assistant message's content: `<|im_end|>`
    (Qwen, SmolLM), `<|eot_id|>` (Llama 3), `<end_of_turn>` (Gemma).

    Read off the template itself: a user turn and a one-message assistant turn are rendered, and
    the first special (or added) token of the text after the assistant's content is the turn end.
    None when the template writes no such token there (e.g. a plain `role: content` template) or
    cannot render that conversation.
    """
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template may reject the probe conversation: no turn end is read then
        return None
    if not isinstance(text, str) or _PROBE not in text:
        return None
    after = text[text.rindex(_PROBE) + len(_PROBE):]
    marked = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in marked:
            return token_id
    return None


def generation_eos_ids(source: Any) -> list[int]:
    """The `eos_token_id` (int or list) of a generation config: of a model (`.generation_config`),
    or of a model directory / hub id (its generation_config.json, else its config.json)."""
    if source is None:
        return []
    if isinstance(source, str | Path):
        from transformers import AutoConfig, GenerationConfig

        try:
            config: Any = GenerationConfig.from_pretrained(str(source))
        except OSError:  # no generation_config.json: transformers derives one from config.json
            try:
                config = AutoConfig.from_pretrained(str(source))
            except (OSError, ValueError):
                return []
    else:
        config = getattr(source, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(i) for i in ([eos] if isinstance(eos, int) else eos)]


@dataclass(frozen=True)
class ResponseEnd:
    """Where a response ends. SFT targets end with `token_id`; generation (rollouts, evaluation,
    the served model) stops on any of `stop_ids`."""

    token_id: int
    stop_ids: tuple[int, ...]


def end_of_response(
    tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig | None = None, generation_source: Any = None
) -> ResponseEnd:
    """The one definition of the end of a response.

    With a chat template (`uses_chat_template`): the template's turn end (`chat_turn_end`, e.g.
    Qwen's `<|im_end|>`, Llama 3's `<|eot_id|>`), so a model fine-tuned here ends its turn as the
    instruct model it started from does, whatever the tokenizer calls EOS (Qwen2.5 base ships EOS
    `<|endoftext|>` and the same template). Without one (plain `prompt_template`), or when the
    template writes no turn-end token: the tokenizer's EOS.

    Stop ids: that token, the tokenizer's EOS, and the generation config's `eos_token_id` list of
    `generation_source` (a model, or a model directory / hub id): whatever the model was shipped
    to stop on ends a response too.
    """
    cfg = cfg or ModelConfig()
    token_id = chat_turn_end(tokenizer) if uses_chat_template(tokenizer, cfg) else None
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError(
            "cannot tell where a response ends: the tokenizer has no EOS token and no chat template "
            "that ends an assistant turn with a special token"
        )
    stops = {token_id, *generation_eos_ids(generation_source)}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return ResponseEnd(token_id, tuple(sorted(stops)))


def encode_completion(tokenizer: PreTrainedTokenizerBase, text: str, end_token_id: int | None = None) -> list[int]:
    """Token ids of a target completion, ending with `end_token_id` (`end_of_response(...).token_id`;
    default the tokenizer's EOS, as documents end) so the model learns to stop."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id if end_token_id is None else end_token_id]


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The text of a response's token ids, special tokens (EOS, padding) left out."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)
