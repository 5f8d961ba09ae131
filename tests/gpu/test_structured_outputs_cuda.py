"""Structured outputs on CUDA: masks uploaded from pinned memory and applied by the Triton kernel inside
the sampler, on steps whose forward was a CUDA graph replay launched before the masks existed."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from asyncserve import LLM, SamplingParams, StructuredOutputsParams
from tests.conftest import assert_pool_clean

pytestmark = pytest.mark.gpu

SCHEMA = {"type": "object",
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                         "kind": {"enum": ["a", "b"]}, "word": {"type": "string", "pattern": "^[a-z]{1,4}$"}},
          "required": ["id", "kind", "word"], "additionalProperties": False}


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_constrained_and_unconstrained_rows_share_steps_on_cuda(tiny_model_dir, enforce_eager):
    llm = LLM(tiny_model_dir("qwen3"), device="cuda", dtype="bfloat16", num_gpu_blocks_override=512,
              max_num_seqs=16, enforce_eager=enforce_eager)
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["The capital of France is"], plain, use_tqdm=False)[0].outputs[0].token_ids
    constrained = SamplingParams(temperature=1.0, seed=0, n=3, max_tokens=80,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    regex = SamplingParams(temperature=1.0, seed=1, max_tokens=40,
                           structured_outputs=StructuredOutputsParams(regex=r"[a-z]{4}-\d{3}"))
    outputs = llm.generate(["The capital of France is", "JSON:", "Code:"], [plain, constrained, regex],
                           use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == alone
    for choice in outputs[1].outputs:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    assert re.fullmatch(r"[a-z]{4}-\d{3}", outputs[2].outputs[0].text)
    runner = llm.llm_engine.executor.runner
    assert (runner.num_graph_steps > 0) != enforce_eager
    assert_pool_clean(llm.llm_engine)
