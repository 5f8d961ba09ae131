"""A streaming request's outputs are deltas (OutputProcessor.delta_output): each step carries only the new
token ids, the new text and the new logprobs, which add up, step by step, to the cumulative outputs that the
same request gives without `delta`; and the step's text decoded in one batch (detokenizer.decode_step) is
exactly what one decode per sequence gives."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from asyncserve.engine.detokenizer import IncrementalDetokenizer, decode_step
from asyncserve.testing.tiny_model import build_tokenizer

from tests.conftest import PROMPTS


def _workload():
    return [
        SamplingParams(temperature=0.0, max_tokens=14),
        SamplingParams(temperature=0.0, max_tokens=30, stop=["e", "a"], include_stop_str_in_output=True),
        SamplingParams(temperature=0.0, max_tokens=30, stop=["ou", "the ", "x"]),  # held back, then cut
        SamplingParams(temperature=0.8, seed=4, max_tokens=30, stop_token_ids=list(range(20, 400))),
        SamplingParams(temperature=1.3, seed=7, n=3, max_tokens=40, logprobs=2),  # multi-byte pieces
        SamplingParams(temperature=1.0, seed=2, max_tokens=20, skip_special_tokens=False, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=1),
    ]


def _run(engine, delta: bool, abort_step: int | None = None) -> list[dict]:
    """Each step's outputs by request id."""
    params = _workload()
    for i, prompt in enumerate(PROMPTS * 2):
        engine.add_request(f"r{i}", engine.input_processor.process(prompt, params[i % len(params)].clone()),
                           delta=delta)
    steps = []
    while engine.has_unfinished_requests():
        outputs = {output.request_id: output for output in engine.step()}
        for output in outputs.values():
            for choice in output.outputs:  # a cumulative output's logprobs are the sequence's growing list
                choice.logprobs = list(choice.logprobs) if choice.logprobs is not None else None
        if abort_step is not None and len(steps) == abort_step and "r4" in engine.requests:
            outputs["r4"] = engine.abort_request("r4")
        steps.append(outputs)
    return steps


@pytest.mark.parametrize("abort", [False, True])
def test_each_step_carries_only_what_is_new_and_adds_up_to_the_cumulative_outputs(make_llm, abort):
    # A small pool and budget: chunked prefill and preemption (recompute) happen while requests stream.
    settings = dict(num_gpu_blocks_override=40, max_model_len=272, max_num_batched_tokens=48, block_size=8)
    cumulative_engine, delta_engine = make_llm(**settings).llm_engine, make_llm(**settings).llm_engine
    cumulative_engine.stream_outputs = delta_engine.stream_outputs = True
    abort_step = 6 if abort else None
    cumulative, deltas = _run(cumulative_engine, False, abort_step), _run(delta_engine, True, abort_step)
    assert len(cumulative) == len(deltas)
    sent: dict[tuple[str, int], dict] = {}
    num_multi_token_choices = 0
    for step_cumulative, step_deltas in zip(cumulative, deltas):
        assert sorted(step_cumulative) == sorted(step_deltas)
        for request_id, delta_output in step_deltas.items():
            whole = step_cumulative[request_id]
            assert delta_output.finished == whole.finished
            listed = {choice.index for choice in delta_output.outputs}
            for choice in whole.outputs:
                seen = sent.setdefault((request_id, choice.index), {"text": "", "token_ids": [], "logprobs": [],
                                                                    "finished": False})
                if choice.index not in listed:  # nothing new, and its finish (if any) already told
                    assert choice.text == seen["text"] and choice.token_ids == seen["token_ids"]
                    assert seen["finished"] or choice.finish_reason is None
                    continue
                new = next(c for c in delta_output.outputs if c.index == choice.index)
                # Only the delta: the new ids (one a step here), their logprobs and the text they completed.
                assert new.token_ids == choice.token_ids[len(seen["token_ids"]):]
                assert len(new.token_ids) <= 1
                assert new.text == choice.text[len(seen["text"]):]
                if choice.logprobs is not None:
                    assert new.logprobs == choice.logprobs[len(seen["logprobs"]):]
                    assert len(new.logprobs) == len(new.token_ids)
                    seen["logprobs"] += new.logprobs
                assert (new.finish_reason, new.stop_reason) == (choice.finish_reason, choice.stop_reason)
                assert new.cumulative_logprob == choice.cumulative_logprob
                seen["text"] += new.text
                seen["token_ids"] += new.token_ids
                seen["finished"] = new.finish_reason is not None
                num_multi_token_choices += len(choice.token_ids) > 1
            if delta_output.finished:  # the last output lists every choice, with its finish reason
                assert sorted(listed) == sorted(choice.index for choice in whole.outputs)
                assert all(choice.finish_reason is not None for choice in delta_output.outputs)
    assert num_multi_token_choices  # the deltas above were really deltas of longer outputs
    assert all(seen["finished"] for seen in sent.values())
    if abort:
        last = [step["r4"] for step in deltas if "r4" in step][-1]
        assert last.finished and {c.finish_reason for c in last.outputs} == {"abort"}


def test_generate_stays_cumulative(make_llm):
    llm = make_llm()
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and out.text and out.finish_reason == "length"


TEXTS = [
    "Hello world, this is plain ASCII text.",
    "naïve façade — 日本語のテキスト, 龘 and 🦀🍣🎉 emoji; Ελληνικά и кириллица.",
    "  leading spaces and\ttabs\nand newlines  ",
]


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_decoding_a_step_in_one_batch_equals_one_decode_per_sequence(kind, batch):
    """Many sequences at different points of multi-byte characters, skip_special_tokens on and off (two
    decode_batch groups, two piece caches), against the per-sequence `step` of detokenizers that cache
    nothing; a final flush shows the same partial character."""
    tokenizer = build_tokenizer(kind)
    special = tokenizer.all_special_ids[:1]
    prompt = tokenizer.encode("Prompt:", add_special_tokens=False)
    outputs = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    # Starts inside a character, has a special token, ends inside a character (flushed as U+FFFD).
    outputs.append(outputs[1][3:] + special + outputs[1][:5] + tokenizer.encode("x龘", add_special_tokens=False)[:-1])
    options = [dict(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
               for skip in (True, False) for spaces in (True, False)]
    one_by_one, batched = [], []
    pieces = {True: {}, False: {}}  # shared, as OutputProcessor shares them
    for ids in outputs:
        for option in options:
            one_by_one.append((IncrementalDetokenizer(tokenizer, prompt, **option), ids))
            batched.append((IncrementalDetokenizer(tokenizer, prompt, **option,
                                                   piece_cache=pieces[option["skip_special_tokens"]]), ids))
    assert all(detokenizer.batch_key is not None for detokenizer, _ in batched)
    for position in range(max(len(ids) for ids in outputs)):
        live = [(a, b, ids[position]) for (a, ids), (b, _) in zip(one_by_one, batched) if position < len(ids)]
        expected = [a.step(token_id) for a, _, token_id in live]
        for _, b, token_id in live:
            b.push(token_id)
        assert decode_step([b for _, b, _ in live], batch=batch) == expected
    for (a, _), (b, _) in zip(one_by_one, batched):
        assert b.flush() == a.flush() and b.output_text == a.output_text
    assert any("\ufffd" in a.output_text for a, _ in one_by_one)  # the partial character at the end
