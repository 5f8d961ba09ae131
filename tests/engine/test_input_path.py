"""The one input path (issue 21): prompts reach the engine core only as ProcessedRequests."""
from __future__ import annotations

import ast
import json
import pathlib

from asyncserve import SamplingParams
from asyncserve.engine.input_processor import ProcessedRequest
from asyncserve.engine.sequence import FinishReason

ENGINE_DIR = pathlib.Path(__file__).parents[2] / "asyncserve" / "engine"


def test_finish_reason_is_an_enum_that_reads_as_its_openai_string():
    assert FinishReason("length") is FinishReason.LENGTH
    assert FinishReason.STOP == "stop" and f"{FinishReason.ABORT}" == "abort"
    assert json.dumps({"finish_reason": FinishReason.LENGTH}) == '{"finish_reason": "length"}'


def test_pooling_rules_do_not_import_the_engine():
    tree = ast.parse((ENGINE_DIR / "pooling.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "asyncserve.engine.llm_engine" not in imported


def test_processing_resolves_a_private_copy_and_the_engine_admits_it(make_llm):
    engine = make_llm().llm_engine
    params = SamplingParams(max_tokens=None, temperature=0.0)
    processed = engine.input_processor.process({"prompt_token_ids": [5, 6, 7]}, params)
    assert isinstance(processed, ProcessedRequest)
    assert processed.params is not params and params.max_tokens is None
    assert processed.params.max_tokens == engine.model_config.max_model_len - 3
    assert processed.params.extra_eos_token_ids == engine.eos_token_ids()
    request = engine.add_request("r", processed)
    assert request.prompt_token_ids == [5, 6, 7] and request.seqs[0].detokenizer is not None
    while engine.has_unfinished_requests():
        engine.step()
    assert request.seqs[0].finish_reason is FinishReason.LENGTH
