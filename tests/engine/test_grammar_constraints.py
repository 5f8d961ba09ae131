"""Structured outputs in the engine: vLLM's StructuredOutputsParams, grammars compiled once per constraint,
every constrained sample under its own matcher, and unconstrained work untouched."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from asyncserve import AsyncEngine, EngineConfig, SamplingParams, SamplingParamsError, StructuredOutputsParams

SCHEMA = {"type": "object",
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                         "kind": {"enum": ["a", "b"]}, "word": {"type": "string", "pattern": "^[a-z]{1,4}$"}},
          "required": ["id", "kind", "word"], "additionalProperties": False}


def _json(schema=SCHEMA) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


@pytest.mark.parametrize("fields", [{}, {"regex": "a", "choice": ["a"]}, {"json": {}, "grammar": "root ::= \"a\""}])
def test_exactly_one_constraint_or_a_sampling_params_error(fields):
    with pytest.raises(SamplingParamsError, match="exactly one") as caught:
        StructuredOutputsParams(**fields)
    assert caught.value.param == "structured_outputs" and isinstance(caught.value, ValueError)


def test_sampling_params_take_the_fields_as_a_dict_too():
    params = SamplingParams(structured_outputs={"choice": ["x", "y"]})
    assert params.structured_outputs == StructuredOutputsParams(choice=["x", "y"])
    with pytest.raises(SamplingParamsError, match="unknown fields"):
        SamplingParams(structured_outputs={"jsn": {}})


def test_the_cache_key_ignores_key_order_of_the_schema():
    assert (StructuredOutputsParams(json={"a": 1, "b": 2}).key()
            == StructuredOutputsParams(json={"b": 2, "a": 1}).key())


def test_offline_generate_follows_json_schema_choice_and_regex(make_llm):
    llm = make_llm()
    prompts = ["JSON:", "Pick:", "Code:"]
    constraints = [_json(), StructuredOutputsParams(choice=["red", "green", "blue"]),
                   StructuredOutputsParams(regex=r"[A-Z]{2}\d{3}")]
    params = [SamplingParams(temperature=1.0, seed=i, n=2, max_tokens=80, structured_outputs=c)
              for i, c in enumerate(constraints)]
    outputs = [llm.generate([prompt], p, use_tqdm=False)[0] for prompt, p in zip(prompts, params)]
    for choice in outputs[0].outputs:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    assert all(choice.text in ("red", "green", "blue") for choice in outputs[1].outputs)
    assert all(re.fullmatch(r"[A-Z]{2}\d{3}", choice.text) for choice in outputs[2].outputs)
    assert all(choice.finish_reason == "stop" for output in outputs for choice in output.outputs)


def test_a_schema_is_compiled_once_and_unconstrained_work_never_builds_the_grammar_engine(make_llm):
    llm = make_llm()
    llm.generate(["x"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert llm.llm_engine.structured._backend is None
    params = SamplingParams(temperature=1.0, max_tokens=60, structured_outputs=_json())
    llm.generate(["a", "b", "c"], params, use_tqdm=False)
    llm.generate(["d"], SamplingParams(max_tokens=60, structured_outputs=_json(dict(reversed(SCHEMA.items())))),
                 use_tqdm=False)
    assert llm.llm_engine.structured.num_compiles == 1


def test_only_steps_with_a_constrained_row_wait_for_masks(make_llm):
    engine = make_llm().llm_engine
    deferred = []
    sample = engine.executor.sample
    engine.executor.sample = lambda pending, bitmask, rows: (deferred.append(list(rows)),
                                                             sample(pending, bitmask, rows))
    engine.add_request("plain", engine.input_processor.process("Hello", SamplingParams(temperature=0.0, max_tokens=3)))
    engine.step()
    assert deferred == [] and engine._in_flight[1].device_token_ids is not None  # sampled at launch
    engine.add_request("json", engine.input_processor.process("JSON:", SamplingParams(max_tokens=3, structured_outputs=_json())))
    engine.step()
    assert deferred == [[1]]  # sampled once the masks came; only the constrained row has one
    assert engine._in_flight[1].device_token_ids is not None
    while engine.has_unfinished_requests():
        engine.step()


def test_grammar_end_finishes_the_output_even_under_ignore_eos(make_llm):
    llm = make_llm()
    params = SamplingParams(temperature=1.0, seed=0, n=3, max_tokens=30, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(regex="[a-z]{3}"))
    for choice in llm.generate(["x"], params, use_tqdm=False)[0].outputs:
        assert re.fullmatch("[a-z]{3}", choice.text) and choice.finish_reason == "stop"


def test_constrained_sequences_survive_preemption(make_llm):
    # 16 blocks of 16 = 256 token slots; eight sequences of ~70 tokens each need more: some are preempted and
    # recomputed, their matchers keep their place.
    llm = make_llm(num_gpu_blocks_override=16, max_model_len=256)
    prompts = [f"Story {i}: once upon a time, " + "far away " * i for i in range(8)]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=60, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(regex="[a-z]{20,60}"))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert all(re.fullmatch("[a-z]{20,60}", output.outputs[0].text) for output in outputs)


def test_the_guidance_backend_plugs_in_behind_the_same_interface(make_llm):
    llm = make_llm(structured_outputs_backend="guidance")
    params = SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=80, structured_outputs=_json())
    for choice in llm.generate(["JSON:"], params, use_tqdm=False)[0].outputs:
        jsonschema.validate(json.loads(choice.text), SCHEMA)


async def test_async_engine_compiles_grammars_off_the_event_loop(tiny_model_dir, monkeypatch):
    from asyncserve.engine.structured.xgrammar_backend import XGrammarBackend
    engine = AsyncEngine(EngineConfig(model=tiny_model_dir("qwen3"), device="cpu", num_gpu_blocks_override=64,
                                      max_model_len=512))
    threads = []
    compile_grammar = XGrammarBackend.compile

    def recording(self, params):
        threads.append(threading.current_thread())
        return compile_grammar(self, params)

    monkeypatch.setattr(XGrammarBackend, "compile", recording)
    await engine.start()
    try:
        params = SamplingParams(max_tokens=10, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
        final = [output async for output in engine.generate("Q:", params)][-1]
    finally:
        await engine.stop()
    assert final.outputs[0].text in ("yes", "no")
    assert [thread.name.split("_")[0] for thread in threads] == ["asyncserve-grammar"]  # once, in its thread
