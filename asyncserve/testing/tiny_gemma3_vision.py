"""A tiny Gemma 3 vision-language checkpoint (`Gemma3ForConditionalGeneration`) with random weights: gemma-3-4b-it's
config and preprocessor settings scaled down, and a byte-level tokenizer with Gemma's turn and image tokens
and, as Gemma's own vocabulary has, single tokens for runs of 2 to 4 newlines (so the "\\n\\n" the processor
writes around an image joins the prompt's newlines the way the real tokenizer joins them)."""
from __future__ import annotations

import os

from asyncserve.testing.tiny_model import (
    INIT_STD,
    NORM_STD,
    _init_weights,
    _update_json,
    _write_json,
    build_tokenizer,
)

GEMMA_TOKENS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                "<image_soft_token>")
NEWLINE_RUNS = ("\n\n", "\n\n\n", "\n\n\n\n")

# Gemma 3's chat template, shortened: BOS, turns as <start_of_turn>role\n ... <end_of_turn>\n (the
# assistant's role is "model"), an image part as <start_of_image>, text parts as their text.
GEMMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image_url' in item %}{{- '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# gemma-3-4b-it's SigLIP tower (27 layers, width 1152, 16 heads, 896-pixel images in 14-pixel patches, so
# 64 x 64 patches pooled 4 x 4 into 256 tokens) scaled down: 112-pixel images, 8 x 8 patches pooled 2 x 2
# into 16 tokens.
_TINY_SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": 112, "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-6,
                "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
MM_TOKENS_PER_IMAGE = 16
# Gemma 3's text model as in tiny_model.py's gemma3 (q/k norm, a window of 8 tokens, so an image's 16
# tokens cross it, a local rope base, linear scaling on the global layer), untied as there.
_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24, "sliding_window": 8,
              "layer_types": ["sliding_attention", "full_attention"],
              "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                     "rope_theta": 1000000.0}},
              "final_logit_softcapping": None, "attn_logit_softcapping": None, "tie_word_embeddings": False}
# gemma-3-4b-it's preprocessor_config.json, the size scaled down (pan and scan off, as published).
PREPROCESSOR_CONFIG = {
    "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": MM_TOKENS_PER_IMAGE, "pan_and_scan_max_num_crops": None,
    "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
    "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 0.00392156862745098,
    "size": {"height": 112, "width": 112},
}


def gemma3_tokenizer():
    from tokenizers import AddedToken
    tokenizer = build_tokenizer("byte_level")
    tokenizer.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>",
                                  "additional_special_tokens": list(GEMMA_TOKENS[2:])})
    tokenizer.add_tokens([AddedToken(run, normalized=False, special=False) for run in NEWLINE_RUNS])
    tokenizer.chat_template = GEMMA3_TEMPLATE
    return tokenizer


def write_gemma3_checkpoint(out_dir: str, seed: int, text_overrides: dict) -> None:
    import torch
    from transformers import AutoConfig, Gemma3ForConditionalGeneration, GenerationConfig
    from transformers.utils import logging as hf_logging

    tokenizer = gemma3_tokenizer()
    bos, eos, _, end_of_turn, boi, eoi, soft = tokenizer.convert_tokens_to_ids(list(GEMMA_TOKENS))
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = {**_TINY_TEXT, "vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": eos,
            "pad_token_id": pad, **text_overrides}
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=dict(_TINY_SIGLIP),
                                  mm_tokens_per_image=MM_TOKENS_PER_IMAGE, boi_token_index=boi,
                                  eoi_token_index=eoi, image_token_index=soft, tie_word_embeddings=False)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    with torch.random.fork_rng(devices=[]):
        model = Gemma3ForConditionalGeneration(config).to(torch.float32)
    _init_weights(model, seed, norm_centre=0.0)  # Gemma's RMSNorms scale by 1 + weight
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():  # SigLIP's LayerNorms scale by their weight
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + NORM_STD * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(INIT_STD * torch.randn(module.bias.shape, generator=generator))
    model.generation_config = GenerationConfig(bos_token_id=bos, pad_token_id=pad, eos_token_id=[eos, end_of_turn])
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    # The image tokens by role, as Gemma's tokenizer_config.json names them (Gemma3Processor reads them).
    _update_json(os.path.join(out_dir, "tokenizer_config.json"),
                 tokenizer_class="PreTrainedTokenizerFast", chat_template=GEMMA3_TEMPLATE,
                 extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                       "image_token": "<image_soft_token>"})
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), PREPROCESSOR_CONFIG)
