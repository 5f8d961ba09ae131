"""Gemma 3 with images end to end on a tiny random checkpoint: greedy tokens exactly transformers' (its own
Gemma3Processor, and the bidirectional mask over each image's tokens) for one and two images, text in the
same batch, chunks that would cut an image held back to its start, a cached second turn; the bidirectional
span itself checked in the attention reference; both checkpoint layouts' names."""
from __future__ import annotations

import pytest
import torch

from asyncserve import LLM, SamplingParams
from asyncserve.errors import ConfigError
from asyncserve.testing.tiny_vision import build_tiny_vision_checkpoint
from tests.models.vision_checkpoints import GEMMA_ONE, GEMMA_TEXT, GEMMA_TWO, GemmaReference, image

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    return build_tiny_vision_checkpoint(tmp_path_factory.mktemp("gemma3v") / "gemma3", "gemma3")


@pytest.fixture(scope="module")
def reference(gemma_path):
    return GemmaReference(gemma_path)


def _llm(path, **overrides):
    return LLM(path, dtype="float32", device="cpu", num_gpu_blocks_override=256, max_model_len=512, **overrides)


@pytest.fixture(scope="module")
def llm(gemma_path):
    return _llm(gemma_path)


def _prompts(cases):
    return [{"prompt": text, "multi_modal_data": {"image": images}} if images else text for text, images in cases]


def test_one_and_two_images_beside_text_match_transformers(llm, reference):
    cases = [(GEMMA_ONE, [image(250, 180, 0)]),
             (GEMMA_TWO, [image(120, 90, 1), image(70, 300, 2)]),
             (GEMMA_TEXT, [])]
    outputs = llm.generate(_prompts(cases), GREEDY, use_tqdm=False)
    for (text, images), output in zip(cases, outputs):
        prompt_ids, expected = reference.greedy(text, images, MAX_TOKENS)
        assert output.prompt_token_ids == prompt_ids  # "\n\n" around each image joined as the tokenizer does
        assert output.outputs[0].token_ids == expected


def _first_logprobs(output) -> dict[int, float]:
    return {token: entry.logprob for token, entry in output.outputs[0].logprobs[0].items()}


def _assert_logprobs_match(ours: dict[int, float], expected: torch.Tensor) -> None:
    for token, logprob in ours.items():
        assert logprob == pytest.approx(float(expected[token]), abs=2e-4)


FIRST_TOP5 = SamplingParams(temperature=0, max_tokens=1, logprobs=5)


def test_image_tokens_attend_both_ways_as_transformers_does(llm, reference):
    picture = image(250, 180, 0)
    ours = _first_logprobs(llm.generate({"prompt": GEMMA_ONE, "multi_modal_data": {"image": picture}},
                                        FIRST_TOP5, use_tqdm=False)[0])
    _assert_logprobs_match(ours, reference.next_logprobs(GEMMA_ONE, [picture]))
    # Causal attention over the image would give other numbers: the comparison above sees the mask.
    causal = reference.next_logprobs(GEMMA_ONE, [picture], bidirectional=False)
    assert max(abs(logprob - float(causal[token])) for token, logprob in ours.items()) > 1e-2


def test_chunks_never_end_inside_an_image_and_stay_exact(gemma_path, reference):
    # A budget of 20 tokens with 16-token images: chunks that would end inside an image stop at its start.
    llm = _llm(gemma_path, max_num_batched_tokens=20, enable_prefix_caching=False)
    cases = [(GEMMA_TWO, [image(250, 180, 3), image(90, 120, 4)]), (GEMMA_ONE, [image(140, 140, 5)]),
             (GEMMA_TEXT, [])]
    outputs = llm.generate(_prompts(cases), GREEDY, use_tqdm=False)
    for (text, images), output in zip(cases, outputs):
        assert output.outputs[0].token_ids == reference.greedy(text, images, MAX_TOKENS)[1]
    firsts = llm.generate(_prompts(cases), FIRST_TOP5, use_tqdm=False)
    for (text, images), output in zip(cases, firsts):
        _assert_logprobs_match(_first_logprobs(output), reference.next_logprobs(text, images))


def test_a_budget_below_one_image_is_refused(gemma_path):
    with pytest.raises(ConfigError, match="16 tokens of one image"):
        _llm(gemma_path, max_num_batched_tokens=12)


def test_a_cached_second_turn_hits_and_stays_exact(gemma_path, reference):
    llm = _llm(gemma_path, block_size=16)
    first = image(250, 180, 6)
    turn = llm.generate({"prompt": GEMMA_ONE, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)[0]
    follow_up = GEMMA_ONE + turn.outputs[0].text + "<end_of_turn>\n<start_of_turn>user\nand the dog<end_of_turn>\n" \
                                                   "<start_of_turn>model\n"
    again = llm.generate({"prompt": follow_up, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 32  # the blocks holding the image's tokens, and the text after
    assert again.outputs[0].token_ids == reference.greedy(follow_up, [first], MAX_TOKENS)[1]
    # Other text right after the image: the hit (one block) ends inside the image, whose rest is computed
    # in one chunk that attends back to the cached part.
    after = GEMMA_ONE.replace("describe the quick", "what is the quick")
    midway = llm.generate({"prompt": after, "multi_modal_data": {"image": first}}, FIRST_TOP5, use_tqdm=False)[0]
    image_offset = midway.prompt_token_ids.index(reference.image_token_id)
    assert image_offset < midway.num_cached_tokens < image_offset + 16
    _assert_logprobs_match(_first_logprobs(midway), reference.next_logprobs(after, [first]))
    other = image(250, 180, 7)
    changed = llm.generate({"prompt": follow_up, "multi_modal_data": {"image": other}}, GREEDY, use_tqdm=False)[0]
    assert changed.num_cached_tokens <= changed.prompt_token_ids.index(reference.image_token_id)
    assert changed.outputs[0].token_ids == reference.greedy(follow_up, [other], MAX_TOKENS)[1]


def test_llm_chat_with_an_image_part_matches_generate(llm):
    picture = image(120, 90, 8)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": picture},
                                             {"type": "text", "text": "describe the quick brown fox"}]}]
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    direct = llm.generate({"prompt": GEMMA_ONE, "multi_modal_data": {"image": picture}}, GREEDY, use_tqdm=False)[0]
    assert chat.prompt_token_ids == direct.prompt_token_ids
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


def test_every_checkpoint_layout_names_the_same_parameters(gemma_path):
    from asyncserve.checkpoints.hf_config import load_hf_config
    from asyncserve.models.gemma3_mm import Gemma3ForConditionalGeneration
    model = Gemma3ForConditionalGeneration(load_hf_config(gemma_path))
    ours = dict(model.named_parameters())
    # The Hub's (transformers 4), transformers 5's in memory, and transformers 5's saved names.
    for names, name in [
            (("language_model.model.layers.0.input_layernorm.weight", "model.language_model.layers.0.input_layernorm.weight"),
             "layers.0.input_layernorm.weight"),
            (("vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias", "model.vision_tower.encoder.layers.1.mlp.fc2.bias",
              "vision_tower.encoder.layers.1.mlp.fc2.bias"), "vision_tower.encoder.layers.1.mlp.fc2.bias"),
            (("multi_modal_projector.mm_input_projection_weight", "model.multi_modal_projector.mm_input_projection_weight"),
             "multi_modal_projector.mm_input_projection_weight"),
            (("language_model.lm_head.weight", "lm_head.weight"), "lm_head.weight")]:
        assert {model.checkpoint_name(theirs) for theirs in names} == {name}
        assert name in ours
