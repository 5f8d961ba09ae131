"""Embedding models on CUDA: the runner's stream, Triton attention and on-device pooling give the vectors
of transformers + manual pooling (float32), with no decode graphs captured."""
from __future__ import annotations

import pytest
import torch

from asyncserve import LLM, PoolingParams
from tests.conftest import PROMPTS, assert_pool_clean
from tests.embedding_checkpoints import reference_embedding

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN", "CLS"])
def test_pooling_on_cuda_matches_transformers(tiny_model_dir, pooling_type):
    path = tiny_model_dir("qwen3")
    llm = LLM(path, device="cuda", dtype="float32", runner="pooling", num_gpu_blocks_override=512,
              max_num_batched_tokens=32, pooler_config={"pooling_type": pooling_type})
    assert llm.llm_engine.executor.runner.decode_graphs is None
    outputs = llm.embed(PROMPTS + ["word " * 60], PoolingParams(normalize=False), use_tqdm=False)
    for output in outputs:
        expected = reference_embedding(path, output.prompt_token_ids, pooling_type, False)
        assert (torch.tensor(output.outputs.embedding) - expected).abs().max().item() < 1e-3
    assert_pool_clean(llm.llm_engine)
