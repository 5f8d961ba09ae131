"""Speculative decoding's draft model resolved against the target: its checkpoint found as the target's is
(a folder, a hub id, the tiny model), then checked once at start-up so that a pair that cannot work fails
with a line naming both models, not with wrong proposals or an index error mid-request."""
from __future__ import annotations

import os
from dataclasses import replace

from asyncserve.config.model import ModelConfig
from asyncserve.errors import ConfigError, UnsupportedModelError
from asyncserve.models.loader import quantization_config
from asyncserve.models.registry import model_class


def _draft_path(name: str) -> str:
    from asyncserve.checkpoints.default_model import TINY_MODEL
    from asyncserve.checkpoints.resolve import check_local_path, resolve_checkpoint
    if name == TINY_MODEL and not os.path.isdir(name):
        from asyncserve.testing.tiny_model import default_model_path
        return default_model_path()
    check_local_path(name)
    return resolve_checkpoint(name)


def resolve_draft_model(name: str, target: ModelConfig) -> tuple[ModelConfig, object]:
    """(the draft's ModelConfig, its QuantizationConfig): the target's dtype, device, max_model_len, seed and
    load format, the draft's own architecture, vocabulary and checkpoint quantization."""
    from asyncserve.checkpoints.hf_config import load_hf_config
    path = _draft_path(name)
    hf_config = load_hf_config(path)
    try:
        cls = model_class(hf_config)
    except UnsupportedModelError as error:
        raise ConfigError(f"speculative_config: the draft model {name!r}: {error}") from None
    if cls.has_recurrent_state(hf_config):
        raise ConfigError(f"speculative_config: the draft model {name!r} keeps a linear-attention state that "
                          "cannot step back over rejected drafts; choose a draft of an attention-only family.")
    draft_vocab, target_vocab = getattr(hf_config, "vocab_size", None), target.vocab_size
    if draft_vocab != target_vocab:
        raise ConfigError(f"speculative_config: the draft model {name!r} has a vocabulary of {draft_vocab} "
                          f"tokens and the target {target.model or target.path!r} one of {target_vocab}: a "
                          "draft must share the target's tokenizer and vocabulary size (choose a smaller "
                          "model of the same family and tokenizer).")
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and limit < target.max_model_len:
        raise ConfigError(f"speculative_config: the draft model {name!r} supports {limit} positions, fewer "
                          f"than max_model_len={target.max_model_len}: lower max_model_len to {limit}.")
    draft = replace(target, path=path, hf_config=hf_config, model=name, vocab_size=draft_vocab,
                    runner_type="generate", pooler=None, is_matryoshka=False, matryoshka_dimensions=None,
                    served_model_names=[], tokenizer=None)
    return draft, quantization_config(hf_config, None, path)
