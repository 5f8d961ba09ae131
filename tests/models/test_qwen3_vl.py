"""Qwen3-VL end to end on a tiny random checkpoint (DeepStack into the first two of three layers, interleaved
M-RoPE, a learned position grid resampled to each image): greedy tokens exactly transformers' for one and two
images of different sizes with text in the same batch, chunked prefill cutting an image's tokens, and a cached
second turn; the layers' pieces against transformers' own."""
from __future__ import annotations

import pytest
import torch

from asyncserve import LLM, SamplingParams
from asyncserve.testing.tiny_vision import build_tiny_vision_checkpoint
from tests.models.vision_checkpoints import PROMPT_ONE, PROMPT_TEXT, PROMPT_TWO, Reference, image

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def vl3_path(tmp_path_factory):
    return build_tiny_vision_checkpoint(tmp_path_factory.mktemp("vl3") / "qwen3_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def reference(vl3_path):
    return Reference(vl3_path)


def _llm(path, **overrides):
    return LLM(path, dtype="float32", device="cpu", num_gpu_blocks_override=256, max_model_len=1024, **overrides)


def test_interleaved_mrope_rotates_as_transformers():
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding, apply_rotary_pos_emb

    from asyncserve.layers.mrope import MRotaryEmbedding
    section = [24, 20, 20]
    config = Qwen3VLTextConfig(head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                              "mrope_section": section, "mrope_interleaved": True})
    positions = torch.tensor([[0, 5, 5, 5, 9], [0, 5, 6, 7, 9], [0, 5, 8, 6, 9]])       # [3, T]
    query, key = torch.randn(5, 2 * 128), torch.randn(5, 128)
    ours = MRotaryEmbedding(128, 64, 5e6, {"rope_type": "default"}, section, interleaved=True)
    rotated_q, rotated_k = ours(positions, query.clone(), key.clone())
    cos, sin = Qwen3VLTextRotaryEmbedding(config)(query, positions[:, None, :])
    expected_q, expected_k = apply_rotary_pos_emb(query.view(1, 5, 2, 128).transpose(1, 2),
                                                  key.view(1, 5, 1, 128).transpose(1, 2), cos, sin)
    torch.testing.assert_close(rotated_q, expected_q.transpose(1, 2).reshape(5, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotated_k, expected_k.transpose(1, 2).reshape(5, -1), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llm(vl3_path):
    return _llm(vl3_path)


def test_the_vision_tower_and_deepstack_features_match_transformers(llm, reference):
    model = llm.llm_engine.executor.runner.model
    pictures = [image(250, 180, 0), image(70, 300, 2)]
    processed = reference.image_processor(images=pictures, return_tensors="pt")
    grids = [tuple(grid.tolist()) for grid in processed["image_grid_thw"]]
    with torch.no_grad():
        encoded = model.embed_images(processed["pixel_values"], grids)
        expected = reference.model.model.get_image_features(processed["pixel_values"], processed["image_grid_thw"])
    width = reference.model.config.text_config.hidden_size
    for index, output in enumerate(encoded):
        # the patch embedding is a matmul here, a convolution there: fp32 sums in another order
        torch.testing.assert_close(output[:, :width], expected.pooler_output[index], rtol=1e-4, atol=5e-5)
        for layer, features in enumerate(expected.deepstack_features):
            torch.testing.assert_close(output[:, width * (1 + layer):width * (2 + layer)], features[index],
                                       rtol=1e-4, atol=5e-5)


def test_one_and_two_images_of_different_sizes_beside_text_match_transformers(llm, reference):
    cases = [(PROMPT_ONE, [image(250, 180, 0)]),
             (PROMPT_TWO, [image(120, 90, 1), image(70, 300, 2)]),
             (PROMPT_TEXT, [])]
    prompts = [{"prompt": text, "multi_modal_data": {"image": images}} if images else text
               for text, images in cases]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for (text, images), output in zip(cases, outputs):
        prompt_ids, expected = reference.greedy(text, images, MAX_TOKENS)
        assert output.prompt_token_ids == prompt_ids
        assert output.outputs[0].token_ids == expected


def test_chunked_prefill_cutting_an_images_tokens_is_exact(vl3_path, reference):
    llm = _llm(vl3_path, max_num_batched_tokens=20, enable_prefix_caching=False)
    cases = [(PROMPT_TWO, [image(250, 180, 3), image(90, 120, 4)]), (PROMPT_ONE, [image(140, 140, 5)])]
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases],
                           GREEDY, use_tqdm=False)
    for (text, images), output in zip(cases, outputs):
        assert output.outputs[0].token_ids == reference.greedy(text, images, MAX_TOKENS)[1]


def test_a_second_turn_with_the_same_image_hits_the_cache_and_another_image_does_not(llm, reference):
    first = image(250, 180, 6)
    llm.generate({"prompt": PROMPT_ONE, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)
    follow_up = PROMPT_ONE + "a fox<|im_end|>\n<|im_start|>user\nand the dog<|im_end|>\n<|im_start|>assistant\n"
    again = llm.generate({"prompt": follow_up, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 64
    assert again.outputs[0].token_ids == reference.greedy(follow_up, [first], MAX_TOKENS)[1]
    other = image(250, 180, 7)
    changed = llm.generate({"prompt": follow_up, "multi_modal_data": {"image": other}}, GREEDY, use_tqdm=False)[0]
    assert changed.num_cached_tokens <= changed.prompt_token_ids.index(reference.image_token_id)
    assert changed.outputs[0].token_ids == reference.greedy(follow_up, [other], MAX_TOKENS)[1]


def test_the_moe_variant_is_refused_by_name():
    from types import SimpleNamespace

    from asyncserve.errors import UnsupportedModelError
    from asyncserve.models.registry import model_class
    with pytest.raises(UnsupportedModelError, match="Qwen3-VL-MoE is not served"):
        model_class(SimpleNamespace(architectures=["Qwen3VLMoeForConditionalGeneration"]))


def test_the_flat_checkpoint_layout_loads_the_same_weights(vl3_path, llm, tmp_path):
    """The Hub's older layout (`model.layers.`, `visual.`) as well as transformers 5's nested one."""
    import shutil

    from safetensors.torch import load_file, save_file
    flat = tmp_path / "flat"
    shutil.copytree(vl3_path, flat)
    tensors = load_file(str(flat / "model.safetensors"))
    renamed = {name.replace("model.language_model.", "model.").replace("model.visual.", "visual."): tensor
               for name, tensor in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(flat / "model.safetensors"), metadata={"format": "pt"})
    prompt = {"prompt": PROMPT_ONE, "multi_modal_data": {"image": image(120, 90, 8)}}
    expected = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert _llm(str(flat)).generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected
