"""Qwen2.5-VL end to end on a tiny random checkpoint: greedy tokens exactly transformers' for one and two
images of different sizes, text in the same batch, chunked prefill cutting an image's tokens, prefix-cache
hits keyed by the image; broken images refused by name."""
from __future__ import annotations

import pytest

from asyncserve import LLM, SamplingParams
from asyncserve.errors import InvalidParameterError
from asyncserve.multimodal.images import InvalidImageError, decode_image_bytes
from asyncserve.testing.tiny_vision import build_tiny_vision_checkpoint
from tests.models.vision_checkpoints import PROMPT_ONE, PROMPT_TEXT, PROMPT_TWO, Reference, image, png_bytes

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def vl_path(tmp_path_factory):
    return build_tiny_vision_checkpoint(tmp_path_factory.mktemp("vl") / "qwen2_5_vl")


@pytest.fixture(scope="module")
def reference(vl_path):
    return Reference(vl_path)


def _llm(path, **overrides):
    return LLM(path, dtype="float32", device="cpu", num_gpu_blocks_override=256, max_model_len=1024, **overrides)


@pytest.fixture(scope="module")
def llm(vl_path):
    return _llm(vl_path)


def test_one_and_two_images_of_different_sizes_beside_text_match_transformers(llm, reference):
    cases = [(PROMPT_ONE, [image(250, 180, 0)]),               # 54 tokens, several attention windows
             (PROMPT_TWO, [image(120, 90, 1), image(70, 300, 2)]),
             (PROMPT_TEXT, [])]
    prompts = [{"prompt": text, "multi_modal_data": {"image": images}} if images else text
               for text, images in cases]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for (text, images), output in zip(cases, outputs):
        prompt_ids, expected = reference.greedy(text, images, MAX_TOKENS)
        assert output.prompt_token_ids == prompt_ids
        assert output.outputs[0].token_ids == expected


def test_chunked_prefill_cutting_an_images_tokens_is_exact(vl_path, reference):
    llm = _llm(vl_path, max_num_batched_tokens=20, enable_prefix_caching=False)
    cases = [(PROMPT_TWO, [image(250, 180, 3), image(90, 120, 4)]), (PROMPT_ONE, [image(140, 140, 5)])]
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases],
                           GREEDY, use_tqdm=False)
    for (text, images), output in zip(cases, outputs):
        assert output.outputs[0].token_ids == reference.greedy(text, images, MAX_TOKENS)[1]


def test_the_same_image_hits_the_prefix_cache_and_another_one_does_not(vl_path, reference):
    llm = _llm(vl_path)
    first = image(250, 180, 6)
    llm.generate({"prompt": PROMPT_ONE, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)
    # A follow-up turn with the same image: every full block of the first prompt is a hit, and still exact.
    follow_up = PROMPT_ONE + "a fox<|im_end|>\n<|im_start|>user\nand the dog<|im_end|>\n<|im_start|>assistant\n"
    again = llm.generate({"prompt": follow_up, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 64
    assert again.outputs[0].token_ids == reference.greedy(follow_up, [first], MAX_TOKENS)[1]
    # Another image of the same size: the same placeholder tokens, but no block from its first image on.
    other = image(250, 180, 7)
    changed = llm.generate({"prompt": follow_up, "multi_modal_data": {"image": other}}, GREEDY, use_tqdm=False)[0]
    image_offset = changed.prompt_token_ids.index(reference.image_token_id)
    assert changed.num_cached_tokens <= image_offset
    assert changed.outputs[0].token_ids == reference.greedy(follow_up, [other], MAX_TOKENS)[1]


def test_llm_chat_with_image_parts_matches_generate(llm):
    picture = image(120, 90, 8)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": picture},
                                             {"type": "text", "text": "describe the quick brown fox"}]}]
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    direct = llm.generate({"prompt": PROMPT_ONE, "multi_modal_data": {"image": picture}}, GREEDY, use_tqdm=False)[0]
    assert chat.prompt_token_ids == direct.prompt_token_ids
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


def test_broken_images_are_refused_by_name(llm):
    from PIL import Image
    good = png_bytes(image(64, 64, 9))
    with pytest.raises(InvalidImageError, match=r"part\[0\] cannot be decoded"):
        decode_image_bytes(good[:len(good) // 2], "part[0]")  # truncated
    with pytest.raises(InvalidImageError, match="not an image"):
        decode_image_bytes(b"GIF89a not really", "part[1]")
    bomb = png_bytes(Image.new("1", (20000, 20000)))  # 100 KB of PNG, 400 M pixels
    with pytest.raises(InvalidImageError, match="pixels"):
        decode_image_bytes(bomb, "part[2]")
    with pytest.raises(InvalidImageError, match="empty"):
        llm.generate({"prompt": PROMPT_ONE, "multi_modal_data": {"image": Image.new("RGB", (0, 0))}}, GREEDY)
    with pytest.raises(InvalidImageError, match="PIL.Image"):
        llm.generate({"prompt": PROMPT_ONE, "multi_modal_data": {"image": "cat.png"}}, GREEDY)
    with pytest.raises(InvalidParameterError, match="1 image placeholder tokens for 2 images"):
        llm.generate({"prompt": PROMPT_ONE, "multi_modal_data": {"image": [image(64, 64, 0)] * 2}}, GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()
