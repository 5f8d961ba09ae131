"""Tiny Hugging Face checkpoints of real architectures, with random weights and a
real BPE tokenizer, built offline for tests (`--model asyncserve/tiny-random` serves the qwen3 one).

Weights are drawn with a larger std than Hugging Face's 0.02 so that greedy
decoding has well-separated logits: a token-exact comparison with transformers
must not hinge on float32 rounding.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
from collections import Counter

from asyncserve.testing.tiny_corpus import CORPUS
from asyncserve.checkpoints.scratch import scratch_dir

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma2",
            "gemma3", "gpt_oss")
# Hybrid linear-attention families (Qwen3-Next, Qwen3.5 dense and MoE): their real configs' shapes scaled
# down, four layers (three Gated DeltaNet, then gated attention). Not in FAMILIES: they need a state pool
# and run mixed steps eagerly, which the tests over FAMILIES do not expect (tests/models/test_hybrid_models.py).
HYBRID_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
INIT_STD = 0.25  # std of every linear / embedding weight
NORM_STD = 0.1  # norm weights are 1 + N(0, NORM_STD): wrong norm loading shows up
DEFAULT_MODEL_VERSION = 1  # bump when the corpus, tokenizers or init change
MARKER_FILE = "asyncserve_tiny.json"  # written last: the checkpoint is complete

# Qwen2's pre-tokenizer split (also what transformers' Qwen2Tokenizer rebuilds).
_BYTE_LEVEL_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_METASPACE_MIN_CHAR_COUNT = 3  # rarer characters are left to byte fallback
# GPT-OSS's o200k_harmony special tokens that frame its messages (in the real tokenizer's order).
HARMONY_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
                          "<|start|>", "<|end|>", "<|message|>", "<|call|>")

_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama-2 chat: a system message is folded into the first [INST] block.
_LLAMA2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_prefix = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system_prefix = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' + (system_prefix if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# GPT-OSS's harmony format, as its checkpoints' template renders it (a shorter template of our own: the
# system message with the reasoning effort, the developer message with instructions and the functions,
# tool calls to `functions.NAME` on the commentary channel, their results, and `<|start|>assistant`).
_HARMONY_TEMPLATE = (
    "{%- macro arguments(call) -%}{%- if call.arguments is string -%}{{- call.arguments -}}"
    "{%- else -%}{{- call.arguments | tojson -}}{%- endif -%}{%- endmacro -%}"
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: ' + (reasoning_effort | default('medium')) + '\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.' }}"
    "{%- if tools %}{{- \"\nCalls to these tools must go to the commentary channel: 'functions'.\" }}{%- endif %}"
    "{{- '<|end|>' }}"
    "{%- set instructions = messages[0]['content'] if messages and messages[0]['role'] in "
    "('system', 'developer') else '' %}"
    "{%- if instructions or tools %}{{- '<|start|>developer<|message|>' }}"
    "{%- if instructions %}{{- '# Instructions\n\n' + instructions + '\n\n' }}{%- endif %}"
    "{%- if tools %}{{- '# Tools\n\n## functions\n\nnamespace functions {\n\n' }}"
    "{%- for tool in tools %}{%- set function = tool.function if tool.function is defined else tool %}"
    "{{- '// ' + (function.description | default('')) + '\ntype ' + function.name + ' = (_: '"
    " + (function.parameters | default({}) | tojson) + ') => any;\n\n' }}{%- endfor %}"
    "{{- '} // namespace functions' }}{%- endif %}{{- '<|end|>' }}{%- endif %}"
    "{%- set last_call = namespace(name='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '<|start|>user<|message|>' + message['content'] + '<|end|>' }}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{%- for call in message['tool_calls'] %}{%- set function = call.function if call.function is defined else call %}"
    "{{- '<|start|>assistant to=functions.' + function.name + '<|channel|>commentary <|constrain|>json<|message|>'"
    " + arguments(function) + '<|call|>' }}{%- set last_call.name = function.name %}{%- endfor %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|start|>functions.' + last_call.name + ' to=assistant<|channel|>commentary<|message|>'"
    " + message['content'] + '<|end|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

# family -> (model_type, architecture, tokenizer style, config beyond the shared shape)
_FAMILY_SPECS = {
    "llama": ("llama", "LlamaForCausalLM", "metaspace", {"rope_theta": 10000.0}),
    "llama3": ("llama", "LlamaForCausalLM", "byte_level", {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    }),
    "mistral": ("mistral", "MistralForCausalLM", "metaspace",
                {"rope_theta": 1000000.0, "sliding_window": None}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", "byte_level", {
        "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "use_sliding_window": False, "sliding_window": None,
    }),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "byte_level", {
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None,
    }),
    # MoE: experts of an awkward count; a dense layer 0 then a sparse layer 1, by mlp_only_layers in
    # Qwen2-MoE (with a shared expert) and by decoder_sparse_step in Qwen3-MoE.
    "mixtral": ("mixtral", "MixtralForCausalLM", "metaspace", {
        "rope_theta": 1000000.0, "sliding_window": None, "num_local_experts": 6, "num_experts_per_tok": 2,
    }),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM", "byte_level", {
        "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": None,
        "num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
    }),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", "byte_level", {
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None, "num_experts": 8,
        "num_experts_per_tok": 3, "moe_intermediate_size": 32, "norm_topk_prob": True,
        "decoder_sparse_step": 2, "mlp_only_layers": [],
    }),
    # Gemma: a window of 8 tokens (prompts and outputs cross it), local layers first. The LM head
    # is untied, unlike the real ones: tied to embeddings scaled by sqrt(E), a random model would
    # predict each input token again whatever attention did, and tests could not see attention.
    "gemma2": ("gemma2", "Gemma2ForCausalLM", "metaspace", {
        "rope_theta": 10000.0, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24, "sliding_window": 8,
        "attn_logit_softcapping": 5.0, "final_logit_softcapping": 4.0,
    }),
    # Gemma 3 (text, as the 1B checkpoint): q/k norm, a local rope base, linear rope scaling on
    # the global layers (as the 4B+ checkpoints), one global layer in every `sliding_window_pattern`.
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", "metaspace", {
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 24, "sliding_window": 8, "sliding_window_pattern": 2,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }),
    # Qwen3-Next-80B-A3B's form: GVA 2 value heads per key head, partial rotary, MoE with a shared expert in
    # every layer, config.json with rope_theta / partial_rotary_factor / full_attention_interval at its top.
    "qwen3_next": ("qwen3_next", "Qwen3NextForCausalLM", "byte_level", {
        "num_hidden_layers": 4, "full_attention_interval": 4, "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 6,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    }),
    # Qwen3.5-27B's and Qwen3.5-35B-A3B's form: a multimodal checkpoint (a tiny vision tower beside the text
    # model), 3 value heads per key head, rotary with interleaved position sections.
    "qwen3_5": ("qwen3_5", "Qwen3_5ForConditionalGeneration", "byte_level", {"text_config": {
        "num_hidden_layers": 4, "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 6,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    }}),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "byte_level", {"text_config": {
        "num_hidden_layers": 4, "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 8,
        "num_experts_per_tok": 3, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "intermediate_size": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    }}),
    # GPT-OSS (20B: 24 layers, 32 experts, top-4, 64 heads over 8 KV heads, window 128, YaRN x32 over 4096):
    # a sliding then a full layer, an awkward expert count, YaRN over a 64-token original context (so its
    # ramp crosses these head dims), a window of 8 and a SwiGLU limit the random activations reach.
    "gpt_oss": ("gpt_oss", "GptOssForCausalLM", "harmony", {
        "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "truncate": False,
                                                 "original_max_position_embeddings": 64},
        "num_local_experts": 6, "num_experts_per_tok": 4, "sliding_window": 8, "attention_bias": True,
        "layer_types": ["sliding_attention", "full_attention"], "swiglu_limit": 3.0,
    }),
}
_TINY_VISION = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
                "num_position_embeddings": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}
# Families whose RMSNorm scales by (1 + weight): their norm weights are drawn around 0.
_ZERO_CENTRED_NORMS = ("gemma2", "gemma3", *HYBRID_FAMILIES)
# Norms that scale by weight even in those families: Gated DeltaNet's gated output norm.
_ONE_CENTRED_NORMS = ("linear_attn.norm.weight",)
# Hub config keys that transformers 5 folds into other fields when it saves a config.
_HUB_ONLY_KEYS = ("rope_local_base_freq", "sliding_window_pattern", "partial_rotary_factor",
                  "full_attention_interval")
_SHARED_SHAPE = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "tie_word_embeddings": False, "rope_scaling": None, "initializer_range": INIT_STD,
}


@functools.lru_cache(maxsize=None)
def _train_backend(style: str) -> str:
    """Train the `tokenizers` pipeline of `style`; its JSON serialisation."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

    lines = CORPUS.strip().splitlines(keepends=True)
    if style in ("byte_level", "harmony"):
        special_tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if style == "byte_level"
                          else list(HARMONY_SPECIAL_TOKENS))
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_BYTE_LEVEL_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=768, show_progress=False,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(lines, trainer)
        return tokenizer.to_str()
    if style != "metaspace":
        raise ValueError(f"unknown tokenizer style {style!r}; use 'byte_level', 'harmony' or 'metaspace'")

    # The trainer's own `limit_alphabet` breaks count ties in hash order, so
    # rare characters are dropped here instead: the vocabulary stays the same
    # from run to run, and those characters (and newlines) go to byte fallback.
    char_counts = Counter(CORPUS)
    lines = ["".join(c if char_counts[c] >= _METASPACE_MIN_CHAR_COUNT else " " for c in line)
             for line in CORPUS.strip().splitlines()]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=640, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(lines, trainer)

    # Llama-2 layout: <unk> <s> </s>, then <0x00>..<0xFF>, then the learned pieces.
    spec = json.loads(tokenizer.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    vocab = {piece: index for piece, index in learned[:3]}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for piece, _ in learned[3:]:
        vocab[piece] = len(vocab)
    spec["model"].update(vocab=vocab, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tokenizer.to_str()


def build_tokenizer(style: str):
    """A fast tokenizer of `style` ("byte_level", "harmony": byte-level with GPT-OSS's special tokens and
    chat format, or "metaspace"), the same every call."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_train_backend(style))
    if style == "byte_level":  # Qwen-like: no BOS, ChatML turns end with <|im_end|>
        special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "unk_token": None, "bos_token": None}
        template = _CHATML_TEMPLATE
    elif style == "harmony":  # GPT-OSS: turns end with <|return|> (the answer) or <|call|> (a tool call)
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
                   "unk_token": None}
        template = _HARMONY_TEMPLATE
    else:
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        template = _LLAMA2_TEMPLATE
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=template,
        clean_up_tokenization_spaces=False, model_max_length=2048, **special)


def _special_token_ids(tokenizer, style: str) -> dict:
    """bos/eos/pad ids in the form of the real family's generation_config."""
    if style == "byte_level":
        end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        return {"bos_token_id": end_of_text, "pad_token_id": end_of_text,
                "eos_token_id": [tokenizer.convert_tokens_to_ids("<|im_end|>"), end_of_text]}
    if style == "harmony":
        start, end_of_text, answer_end, call_end = tokenizer.convert_tokens_to_ids(
            ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>"])
        return {"bos_token_id": start, "pad_token_id": end_of_text, "eos_token_id": [answer_end, end_of_text, call_end]}
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def _init_weights(model, seed: int, norm_centre: float = 1.0) -> None:
    """Deterministic weights: N(0, INIT_STD) for matrices and biases, ~norm_centre for norms."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith(_ONE_CENTRED_NORMS):
                param.copy_(1.0 + NORM_STD * noise)
            elif name.endswith("norm.weight"):
                param.copy_(norm_centre + NORM_STD * noise)
            else:
                param.copy_(INIT_STD * noise)


def _mxfp4_representable_experts(model, seed: int) -> None:
    """GPT-OSS's expert weights drawn as MXFP4 (random e2m1 codes, scales of 2^-5 .. 2^-3), dequantized:
    the same checkpoint packs exactly into the public MXFP4 layout (asyncserve.testing.mxfp4_checkpoint)."""
    import torch

    from asyncserve.kernels.mxfp4 import MXFP4_GROUP, dequantize_mxfp4
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            for param in (experts.gate_up_proj, experts.down_proj):  # [E, in, out]
                num_experts, fan_in, fan_out = param.shape
                groups = (num_experts, fan_out, fan_in // MXFP4_GROUP)
                blocks = torch.randint(0, 256, (*groups, MXFP4_GROUP // 2), generator=generator, dtype=torch.uint8)
                scales = torch.randint(122, 125, groups, generator=generator, dtype=torch.uint8)
                param.copy_(dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2))


def _write_checkpoint(out_dir: str, family: str, seed: int, shard: bool, overrides: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    model_type, architecture, style, family_config = _family_spec(family)
    tokenizer = build_tokenizer(style)
    ids = _special_token_ids(tokenizer, style)
    eos_ids = ids["eos_token_id"]
    # config.json in the form of the real checkpoints on the Hub (rope_theta/rope_scaling).
    multimodal = "text_config" in family_config  # the text model nested, as Qwen3.5's checkpoints have it
    text_config = family_config["text_config"] if multimodal else family_config
    hub_config = {**_SHARED_SHAPE, **copy.deepcopy(text_config), "vocab_size": len(tokenizer),
                  "bos_token_id": ids["bos_token_id"],
                  "eos_token_id": eos_ids[0] if isinstance(eos_ids, list) else eos_ids,
                  **overrides}
    if multimodal:  # a shared-shape field the family's config lacks is given as None (Qwen3.5-MoE's MLP width)
        text = {key: value for key, value in hub_config.items() if text_config.get(key, 0) is not None}
        config = AutoConfig.for_model(model_type, text_config=text, vision_config=dict(_TINY_VISION),
                                      tie_word_embeddings=False)
    else:
        config = AutoConfig.for_model(model_type, **copy.deepcopy(hub_config))
    config.architectures = [architecture]
    with torch.random.fork_rng(devices=[]):  # from_config's own init must not move the global RNG
        if multimodal:
            import transformers
            model = getattr(transformers, architecture)(config).to(torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    _init_weights(model, seed, 0.0 if family in _ZERO_CENTRED_NORMS else 1.0)
    if model_type == "gpt_oss":
        _mxfp4_representable_experts(model, seed)
    model.generation_config = GenerationConfig(**ids)
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny write needs no "Writing model shards" bar
    try:
        model.save_pretrained(out_dir, max_shard_size="256KB" if shard else "2GB")
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)

    # Hub checkpoints spell rope as rope_theta/rope_scaling; transformers 5 reads both. (Qwen3.5's nested
    # text config keeps rope_parameters, as its hub checkpoints do.)
    if not multimodal:
        _update_json(os.path.join(out_dir, "config.json"), drop="rope_parameters",
                     rope_theta=hub_config["rope_theta"], rope_scaling=hub_config["rope_scaling"],
                     torch_dtype="float32", **{key: hub_config[key] for key in _HUB_ONLY_KEYS if key in hub_config})
    # A class name that transformers 4 and 5 both map to the plain tokenizers-backed class.
    _update_json(os.path.join(out_dir, "tokenizer_config.json"),
                 tokenizer_class="PreTrainedTokenizerFast", chat_template=tokenizer.chat_template)
    _write_json(os.path.join(out_dir, MARKER_FILE),
                {"family": family, "seed": seed, "shard": shard, "overrides": overrides,
                 "version": DEFAULT_MODEL_VERSION})


def _update_json(path: str, drop: str | None = None, **updates) -> None:
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    obj.pop(drop, None)
    _write_json(path, {**obj, **updates})


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        f.write("\n")


def _family_spec(family: str) -> tuple[str, str, str, dict]:
    """A family of FAMILIES, or the architecture name of any family asyncserve serves (a new model file,
    found by the registry) that transformers can build: its model type with the shared tiny shape."""
    if family in _FAMILY_SPECS:
        return _FAMILY_SPECS[family]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from asyncserve.models.registry import supported_architectures
    model_types = [model_type for model_type, architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
                   if architecture == family]
    # Several model types may share a class (exaone and llama): the one its name starts with first.
    model_types.sort(key=lambda model_type: not family.lower().startswith(model_type.replace("_", "")))
    if family not in supported_architectures() or not model_types:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}, or the architecture name of "
                         "a family asyncserve serves and transformers can build")
    return model_types[0], family, "byte_level", {"rope_theta": 10000.0, "pad_token_id": None}


def build_tiny_checkpoint(path, family: str, *, seed: int = 0, shard: bool = False,
                          **config_overrides) -> str:
    """Write a complete Hugging Face checkpoint of `family` at `path`; return the path.

    The directory appears atomically (built beside it, then renamed). `path`
    must not be a non-empty directory; if a concurrent builder gets there
    first, its checkpoint is kept.
    """
    _family_spec(family)  # an unknown family fails before anything is written
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{path} exists and is not empty; remove it or choose another path")
    parent, name = os.path.split(path)
    with scratch_dir(parent, name) as staging:
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 would follow the checkpoint after the rename
        _write_checkpoint(staging, family, seed, shard, dict(config_overrides))
        try:
            os.rename(staging, path)  # replaces an empty directory, fails on a full one
        except OSError:
            if not os.path.exists(os.path.join(path, MARKER_FILE)):
                raise
    return path


def default_model_path() -> str:
    """The tiny random qwen3 served as `asyncserve/tiny-random`, built once into the cache dir."""
    from asyncserve.checkpoints.cache import cache_dir
    path = os.path.join(cache_dir(), f"tiny-qwen3-v{DEFAULT_MODEL_VERSION}")
    if os.path.exists(os.path.join(path, MARKER_FILE)):
        return path
    if os.path.isdir(path):  # left incomplete by something else: rebuild
        shutil.rmtree(path, ignore_errors=True)
    try:
        return build_tiny_checkpoint(path, "qwen3")
    except FileExistsError:  # another process finished between our check and build
        if os.path.exists(os.path.join(path, MARKER_FILE)):
            return path
        raise
