"""The built-in `tiny` model: a ~1M-parameter Llama-style decoder with its own tokenizer.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the task's text (digits
split one by one, so arithmetic is visible to the model). The model is built from a config, given an
optional short pretraining on generated text of the task's family (prior competence, as a real base
model has), and saved with `save_pretrained`: from then on it loads exactly as a hub model does.
Built models are cached by a digest of everything that shaped them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rft_core.config import RFTConfig, SFTConfig, TinyModelConfig
from rft_core.integrity import directory_problem, publish

logger = logging.getLogger("rft.tiny")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PRETRAIN_BLOCK = 128  # tokens per packed pretraining sequence


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes, decoding is exact) with single-digit tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama-style decoder sized by `cfg`, seeded."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return model


def tiny_digest(cfg: RFTConfig, task_texts: Sequence[str]) -> str:
    """What shapes the tiny model: its section, the pretraining family, and the task's text."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model.tiny.model_dump(mode="json"), sort_keys=True).encode())
    h.update(json.dumps(cfg.data.synthetic.model_dump(mode="json"), sort_keys=True).encode())
    for text in task_texts:
        h.update(text.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def prepare_tiny_model(
    cfg: RFTConfig,
    task_texts: Sequence[str],
    cache_dir: str | Path,
    *,
    exclude_prompts: set[str] | None = None,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> Path:
    """Build (or reuse from the cache) the tiny model for this task; returns its directory.

    `task_texts`: the training prompts and solutions (the tokenizer learns their vocabulary).
    `exclude_prompts`: validation prompts the pretraining text must never contain.
    """
    from rft_core.data.synthetic import pretraining_documents

    tiny = cfg.model.tiny
    target = Path(cache_dir) / f"tiny-{tiny_digest(cfg, task_texts)}"
    if (target / "config.json").exists():
        problem = directory_problem(target)
        if problem is None:
            return target
        logger.warning("the cached tiny model %s is damaged (%s): building it again", target, problem)
    documents: list[str] = []
    if tiny.pretrain_steps > 0:
        # Enough documents to fill every packed block of the pretraining once (~25 tokens each).
        n_docs = tiny.pretrain_steps * tiny.pretrain_batch_size * PRETRAIN_BLOCK // 25
        documents = pretraining_documents(
            cfg.data.synthetic, n_docs, seed=tiny.seed, exclude=set(exclude_prompts or ())
        )
    tokenizer = train_tokenizer(list(task_texts) + documents[:20000], tiny.vocab_size)
    model = build_model(tiny, tokenizer)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if documents:
        from rft_core.sft import train_language_model

        settings = SFTConfig(
            max_steps=tiny.pretrain_steps,
            batch_size=tiny.pretrain_batch_size,
            lr=tiny.pretrain_lr,
            warmup_ratio=0.05,
            lr_scheduler="cosine",
            max_length=PRETRAIN_BLOCK,
            checkpoint_interval=0,
            eval_interval=0,
            keep_best=False,
            seed=tiny.seed,
        )
        model = train_language_model(model, tokenizer, documents, settings, staging / "run", log=log)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(staging / "run", ignore_errors=True)
    return publish(staging, target)  # whole or not at all, flushed, with its manifest
