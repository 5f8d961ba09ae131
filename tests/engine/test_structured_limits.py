"""Structured outputs' limits in the engine: a grammar that matches nothing is refused on both backends,
a grammar constraint and allowed_token_ids are never combined, JSON too deep is refused before anything
copies it, the compiled-grammar cache is bounded by bytes, and beam search names its width."""
from __future__ import annotations

import pytest

from asyncserve import BeamSearchParams, SamplingParams, SamplingParamsError, StructuredOutputsParams
from asyncserve.engine.structured import StructuredOutputManager
from asyncserve.errors import InvalidParameterError
from asyncserve.sampling_params import MAX_JSON_DEPTH, json_too_deep


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
@pytest.mark.parametrize("grammar", ["root ::= root", 'root ::= root "a"', 'root ::= x\nx ::= x "b"'])
def test_a_grammar_that_matches_nothing_is_refused(make_llm, backend, grammar):
    engine = make_llm(structured_outputs_backend=backend).llm_engine
    params = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(grammar=grammar))
    with pytest.raises(InvalidParameterError, match="no output can satisfy it") as caught:
        engine.add_request("r", engine.input_processor.process("x", params))
    assert caught.value.param == "structured_outputs.grammar" and not engine.requests


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_grammars_that_can_end_at_once_or_go_on_are_served(make_llm, backend):
    llm = make_llm(structured_outputs_backend=backend)
    for grammar, expected in (('root ::= ""', ""), ('root ::= "a" | root', "a")):
        params = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(grammar=grammar))
        choice = llm.generate(["x"], params, use_tqdm=False)[0].outputs[0]
        assert (choice.text, choice.finish_reason) == (expected, "stop")


def test_allowed_token_ids_and_a_grammar_are_never_combined():
    with pytest.raises(SamplingParamsError, match="cannot be combined with structured outputs") as caught:
        SamplingParams(allowed_token_ids=[5], structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    assert caught.value.param == "allowed_token_ids"


def _nested(depth: int):
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_json_depth_is_measured_without_recursion():
    assert not json_too_deep(_nested(MAX_JSON_DEPTH)) and json_too_deep(_nested(MAX_JSON_DEPTH + 1))
    assert json_too_deep(_nested(100_000))  # far past Python's recursion limit
    assert not json_too_deep([[1, 2], {"a": [3]}, "x"], limit=3) and json_too_deep([[[[]]]], limit=3)


def _deep_list(depth: int) -> list:
    value: list = ["x"]
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("fields", [{"json": _nested(600)}, {"choice": _deep_list(600)},
                                    {"choice": _deep_list(MAX_JSON_DEPTH + 1)}])
def test_structured_outputs_nested_too_deep_are_a_sampling_params_error(fields):
    with pytest.raises(SamplingParamsError, match=f"nests deeper than {MAX_JSON_DEPTH} levels"):
        SamplingParams(structured_outputs=StructuredOutputsParams(**fields)).clone()


def test_the_json_schema_as_text_nested_too_deep_is_refused_when_compiled(make_llm):
    engine = make_llm().llm_engine
    text = '{"a":' * 600 + "{}" + "}" * 600
    with pytest.raises(InvalidParameterError, match=f"nests deeper than {MAX_JSON_DEPTH} levels"):
        engine.add_request("r", engine.input_processor.process("x", SamplingParams(structured_outputs=StructuredOutputsParams(json=text))))


def test_the_grammar_cache_is_bounded_by_bytes_and_xgrammar_keeps_no_copies(tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen3"))
    manager = StructuredOutputManager(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_mb=1.0)
    schemas = [StructuredOutputsParams(json={"enum": [f"word {i} {j}" for j in range(300)]}) for i in range(20)]
    sizes = [manager.backend.grammar_bytes(manager.compile(params)) for params in schemas]
    kept = [manager._cached(params.key()) is not None for params in schemas]
    newest = kept.count(True)
    assert kept == [False] * (20 - newest) + [True] * newest  # least recently used out first
    assert manager.cache_bytes == sum(sizes[-newest:]) <= 1 << 20 < sum(sizes[-newest - 1:])
    assert manager.backend.compiler.get_cache_size_bytes() == 0  # xgrammar's own cache is off


def test_a_grammar_bigger_than_the_whole_cache_is_served_but_not_kept(tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen3"))
    manager = StructuredOutputManager(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_mb=0.01)
    params = StructuredOutputsParams(json={"enum": [f"word {j}" for j in range(300)]})
    assert manager.compile(params) is not None and manager.cache_bytes == 0


def test_a_constraint_longer_than_max_bytes_is_refused_before_compiling(tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen3"))
    manager = StructuredOutputManager(tokenizer, len(tokenizer), [tokenizer.eos_token_id], max_bytes=100)
    with pytest.raises(InvalidParameterError, match="at most 100 .--structured-outputs-max-bytes.") as caught:
        manager.compile(StructuredOutputsParams(choice=["x" * 60, "y" * 60]))
    assert caught.value.param == "structured_outputs.choice" and manager.num_compiles == 0


def test_offline_beam_search_wider_than_max_logprobs_names_the_beam_width(make_llm):
    llm = make_llm(max_logprobs=20)
    with pytest.raises(InvalidParameterError, match="beam_width=11 ranks the 22 most likely") as caught:
        llm.beam_search(["x"], BeamSearchParams(beam_width=11, max_tokens=2))
    assert caught.value.param == "beam_width"
    assert len(llm.beam_search(["x"], BeamSearchParams(beam_width=10, max_tokens=2))[0].sequences) == 10


def test_the_structured_output_limits_are_cli_flags():
    from asyncserve.cli import build_parser, engine_config
    args = build_parser().parse_args(["--structured-outputs-cache-mb", "64", "--structured-outputs-max-bytes",
                                      "1000", "--structured-outputs-compile-timeout", "2.5"])
    config = engine_config(args)
    assert (config.structured_outputs_cache_mb, config.structured_outputs_max_bytes,
            config.structured_outputs_compile_timeout) == (64.0, 1000, 2.5)


@pytest.mark.parametrize("flag", ["--structured-outputs-cache-mb", "--structured-outputs-max-bytes",
                                  "--structured-outputs-compile-timeout"])
def test_a_structured_output_limit_of_zero_exits_2_naming_it(flag, capsys):
    from asyncserve.cli import main
    with pytest.raises(SystemExit) as caught:
        main([flag, "0"])
    assert caught.value.code == 2 and f"{flag[2:].replace('-', '_')} must be > 0" in capsys.readouterr().err
