"""The EAGLE-3 draft head in its public checkpoint layout (SafeAILab's EAGLE-3, SpecForge; as vLLM and SGLang
load it): `fc` fuses the target's low, middle and high hidden states, one decoder layer (`midlayer`) attends
over [embed(token); fused hidden], and its own norm and LM head score a smaller draft vocabulary that `d2t`
maps onto the target's ids. Not a CausalLM: it reads the target's hidden states, so the registry never
serves it as a model of its own."""
from __future__ import annotations

import copy

import torch
from safetensors import safe_open
from torch import nn

from asyncserve.config.tree import Config
from asyncserve.errors import ConfigError
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.linear import Linear, qkv_linear, tune_single_row_products
from asyncserve.layers.norm import RMSNorm
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.base import CausalLM, kv_scale_name
from asyncserve.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from asyncserve.models.loader import (
    _default_dtype,
    _init_dummy,
    _process_weights_after_loading,
    iterate_weights,
    load_weights,
    safetensors_files,
)

# config.json `architectures` of EAGLE-3 heads (SafeAILab / SpecForge, and vLLM's own class name).
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


def is_eagle3_head(hf_config) -> bool:
    return any(name in EAGLE3_ARCHITECTURES for name in getattr(hf_config, "architectures", None) or [])


def aux_layer_ids(head_config, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose entering hidden states `fc` fuses: the head's config
    `eagle_aux_hidden_state_layer_ids` (top level or in `eagle_config`), else vLLM's default
    (2, L // 2, L - 3)."""
    ids = getattr(head_config, "eagle_aux_hidden_state_layer_ids", None)
    eagle_config = getattr(head_config, "eagle_config", None)
    if ids is None and isinstance(eagle_config, dict):
        ids = eagle_config.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids = (2, num_target_layers // 2, num_target_layers - 3)
    return tuple(int(i) for i in ids)


class Eagle3DecoderLayer(nn.Module):
    """The head's one layer: attention over [input_layernorm(embed); hidden_norm(hidden)] (2E -> qkv), the
    un-normed hidden as the residual (`norm_before_residual`: the normed one), then the MLP."""

    def __init__(self, hf_config, quant_config=None):
        super().__init__()
        hidden_size = hf_config.hidden_size
        self.self_attn = LlamaAttention(hf_config, False, False, quant_config, "layers.0.self_attn")
        attention = self.self_attn
        self.self_attn.qkv_proj = qkv_linear(2 * hidden_size, attention.num_heads, attention.num_kv_heads,
                                             attention.head_dim, bool(getattr(hf_config, "attention_bias", False)),
                                             quant_config, "layers.0.self_attn.qkv_proj")
        self.mlp = LlamaMLP(hf_config, quant_config, "layers.0.mlp")
        self.input_layernorm = RMSNorm(hidden_size, hf_config.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, hf_config.rms_norm_eps)
        self.norm_before_residual = bool(getattr(hf_config, "norm_before_residual", False))

    def forward(self, positions, embeds, hidden, meta):
        normed_hidden = self.hidden_norm(hidden)
        residual = normed_hidden if self.norm_before_residual else hidden
        mixed = torch.cat([self.input_layernorm(embeds), normed_hidden], dim=-1)  # [T, 2E]
        mixed = self.self_attn(positions, mixed, meta)                              # [T, E]
        mixed, residual = self.post_attention_layernorm(mixed, residual)
        return self.mlp(mixed), residual


class Eagle3Head(nn.Module):
    """[T] tokens, [T] positions, [T, E] hidden states -> (normed [T, E], pre-norm [T, E]); the pre-norm
    output is the hidden state the next draft position reads (EAGLE-3's test-time recurrence)."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    expert_modules_mapping: dict = {}

    def __init__(self, hf_config, target_hidden_size: int, own_embedding: bool, quant_config=None):
        super().__init__()
        hidden_size = hf_config.hidden_size
        self.hf_config = hf_config
        self.vocab_size = hf_config.vocab_size
        self.draft_vocab_size = getattr(hf_config, "draft_vocab_size", None) or hf_config.vocab_size
        # Absent from most checkpoints: the target's embedding is shared after loading.
        self.embed_tokens = VocabParallelEmbedding(self.vocab_size, hidden_size) if own_embedding else None
        self.fc = Linear(3 * target_hidden_size, hidden_size, prefix="fc")  # [T, 3E'] -> [T, E]
        self.layers = nn.ModuleList([Eagle3DecoderLayer(hf_config, quant_config)])
        self.norm = RMSNorm(hidden_size, hf_config.rms_norm_eps)
        self.lm_head = Linear(hidden_size, self.draft_vocab_size, prefix="lm_head")  # [T, E] -> [T, V_draft]
        # Draft id -> target id offset; absent when the draft vocabulary is the target's (zeros: identity).
        self.d2t = nn.Parameter(torch.zeros(self.draft_vocab_size, dtype=torch.int64), requires_grad=False)
        self.d2t.checkpoint_optional = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, residual = self.layers[0](positions, self.embed_tokens(input_ids), hidden, meta)
        return self.norm(mixed, residual)

    def combine(self, aux: list[torch.Tensor]) -> torch.Tensor:
        """The target's hidden states at the aux layers, each [T, E'] -> the head's input [T, E]."""
        return self.fc(torch.cat(aux, dim=-1))

    def draft_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """[S, E] -> [S] greedy proposals as target token ids."""
        draft_ids = self.lm_head(normed).argmax(dim=-1)
        return draft_ids + self.d2t[draft_ids]

    def attention_layers(self) -> list[PagedAttention]:
        return [module for module in self.modules() if isinstance(module, PagedAttention)]

    def state_layers(self) -> list:
        return []

    def tune_single_row(self) -> None:
        tune_single_row_products(self)

    def checkpoint_tensors(self, weights):
        return weights

    def checkpoint_name(self, name: str) -> str | None:
        """'midlayer.self_attn.q_proj.weight' (or 'model.layers.0. ...') -> 'layers.0.self_attn.q_proj.weight';
        't2d' (the target -> draft mask) is not needed to propose."""
        name = name.removeprefix("model.")
        if name == "t2d":
            return None
        if name.startswith("midlayer."):
            name = "layers.0." + name.removeprefix("midlayer.")
        return kv_scale_name(name)


def _checkpoint_names(path: str) -> set[str]:
    names = set()
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return names


def load_eagle3_head(config: Config, target: CausalLM) -> Eagle3Head:
    """The head `config.model` describes (engine/resolve_draft.py checked it against the target), its
    weights loaded by their public names; the target's embedding shared when the checkpoint has none."""
    model_config = config.model
    hf_config = copy.copy(model_config.hf_config)
    # The head's rotary table must reach every position the target serves (its checkpoints often say 2048).
    hf_config.max_position_embeddings = max(getattr(hf_config, "max_position_embeddings", 0) or 0,
                                            model_config.max_model_len)
    dummy = model_config.load_format == "dummy"
    names = set() if dummy else _checkpoint_names(model_config.path)
    own_embedding = any(name.removeprefix("model.") == "embed_tokens.weight" for name in names)
    target_hidden_size = getattr(hf_config, "target_hidden_size", None) or target.hf_config.hidden_size
    with _default_dtype(model_config.dtype), torch.device(model_config.device):
        head = Eagle3Head(hf_config, target_hidden_size, own_embedding, config.quantization)
    if dummy:
        _init_dummy(head, model_config.seed)
        head.d2t.data.zero_()
    else:
        try:
            load_weights(head, iterate_weights(model_config.path))
        except ConfigError as error:
            raise ConfigError(f"EAGLE-3 head {model_config.path!r}: {error}") from None
        if head.draft_vocab_size != head.vocab_size and "d2t" not in names:
            raise ConfigError(f"EAGLE-3 head {model_config.path!r}: its draft vocabulary has "
                              f"{head.draft_vocab_size} tokens and the target's {head.vocab_size}, but the "
                              "checkpoint has no 'd2t' (draft id -> target id) tensor to map them.")
        target_ids = torch.arange(head.draft_vocab_size, device=head.d2t.device) + head.d2t
        if bool((target_ids < 0).any()) or bool((target_ids >= head.vocab_size).any()):
            raise ConfigError(f"EAGLE-3 head {model_config.path!r}: 'd2t' maps draft ids outside the target's "
                              f"vocabulary of {head.vocab_size} tokens.")
    if not own_embedding:
        head.embed_tokens = target.embed_tokens
    _process_weights_after_loading(head)
    return head.eval()
