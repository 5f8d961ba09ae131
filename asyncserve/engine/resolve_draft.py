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


def resolve_eagle3_head(name: str, target: ModelConfig) -> ModelConfig:
    """The EAGLE-3 head's ModelConfig (the target's dtype, device, max_model_len, seed and load format; the
    head's path and config), after the checks that the pair can work: a head of the public layout, the
    target's vocabulary and hidden size, a target family that exposes its hidden states, three distinct
    aux layers inside the target."""
    from asyncserve.checkpoints.hf_config import load_hf_config
    from asyncserve.models.eagle3 import EAGLE3_ARCHITECTURES, aux_layer_ids, is_eagle3_head
    path = _draft_path(name)
    hf_config = load_hf_config(path)
    if not is_eagle3_head(hf_config):
        raise ConfigError(f"speculative_config: method 'eagle3' needs an EAGLE-3 head; {name!r} has "
                          f"architectures {getattr(hf_config, 'architectures', None)} (expected one of "
                          f"{list(EAGLE3_ARCHITECTURES)}); a whole smaller model is method 'draft_model'.")
    eagle_config = getattr(hf_config, "eagle_config", None)
    if isinstance(eagle_config, dict) and eagle_config.get("use_aux_hidden_state") is False:
        raise ConfigError(f"speculative_config: the EAGLE-3 head {name!r} reads the target's last hidden state "
                          "only (use_aux_hidden_state: false), which asyncserve does not build.")
    if getattr(hf_config, "num_hidden_layers", 1) != 1:
        raise ConfigError(f"speculative_config: the EAGLE-3 head {name!r} has {hf_config.num_hidden_layers} "
                          "layers; asyncserve runs heads of one layer (the public checkpoints' midlayer).")
    target_config = target.hf_config
    try:
        target_class = model_class(target_config)
    except UnsupportedModelError as error:
        raise ConfigError(str(error)) from None
    if not target_class.supports_aux_hidden_states:
        raise ConfigError(f"speculative_config: EAGLE-3 reads the target's hidden states after given layers; "
                          f"{target_class.__name__} does not expose them in asyncserve (the Llama family does: "
                          "Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2/3-MoE).")
    if hf_config.vocab_size != target.vocab_size:
        raise ConfigError(f"speculative_config: the EAGLE-3 head {name!r} has a vocabulary of "
                          f"{hf_config.vocab_size} tokens and the target {target.model or target.path!r} one of "
                          f"{target.vocab_size}: a head is trained for one target (choose the head of this model).")
    target_hidden = getattr(hf_config, "target_hidden_size", None) or hf_config.hidden_size
    if target_hidden != target_config.hidden_size:
        raise ConfigError(f"speculative_config: the EAGLE-3 head {name!r} fuses hidden states of size "
                          f"{target_hidden}; the target's are {target_config.hidden_size} (choose the head of "
                          "this model).")
    num_layers = target_config.num_hidden_layers
    layer_ids = aux_layer_ids(hf_config, num_layers)
    if len(layer_ids) != 3 or len(set(layer_ids)) != 3 or not all(0 <= i <= num_layers for i in layer_ids):
        raise ConfigError(f"speculative_config: the EAGLE-3 head {name!r} reads the target's layers "
                          f"{list(layer_ids)}; it needs three distinct layer ids in 0 .. {num_layers} (set "
                          "eagle_aux_hidden_state_layer_ids in its config.json).")
    return replace(target, path=path, hf_config=hf_config, model=name, vocab_size=hf_config.vocab_size,
                   runner_type="generate", pooler=None, is_matryoshka=False, matryoshka_dimensions=None,
                   served_model_names=[], tokenizer=None)
