"""Fused MoE at real layer shapes on a GPU (Mixtral-8x7B, Qwen3-30B-A3B), bf16 against the fp32 torch
reference from the same bf16 inputs; captured in a CUDA graph, with new routing on every replay."""

import pytest
import torch

from asyncserve.kernels import MOE_CONFIGS, fused_moe, fused_moe_ref, fused_moe_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# name -> (hidden, expert intermediate, experts, top_k, renormalize)
SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2, True), "qwen3-30b-a3b": (2048, 768, 128, 8, True)}
TOKEN_COUNTS = (1, 7, 64, 512, 4096)


@pytest.fixture(scope="module", params=list(SHAPES))
def layer(request):
    hidden, inter, experts, top_k, renormalize = SHAPES[request.param]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device="cuda") / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device="cuda") / inter ** 0.5).bfloat16()
    yield w13, w2, top_k, renormalize
    del w13, w2
    torch.cuda.empty_cache()


def _inputs(num_tokens, hidden, experts, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen, device="cuda").bfloat16()
    logits = torch.randn(num_tokens, experts, generator=gen, device="cuda").bfloat16()
    return x, logits


def _assert_close(out, x, w13, w2, logits, top_k, renormalize):
    expected = fused_moe_ref(x.float(), w13.float(), w2.float(), logits, top_k, renormalize)
    assert out.dtype == x.dtype and out.shape == expected.shape
    relative = (out.float() - expected).norm() / expected.norm()
    assert relative < 1e-2, f"relative error {relative:.2e}"
    torch.testing.assert_close(out.float(), expected, atol=3e-2 * expected.abs().max().item(), rtol=3e-2)


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_real_shapes_through_the_dispatcher(layer, num_tokens):
    w13, w2, top_k, renormalize = layer
    x, logits = _inputs(num_tokens, w13.shape[2], w13.shape[0], seed=num_tokens)
    _assert_close(fused_moe(x, w13, w2, logits, top_k, renormalize), x, w13, w2, logits, top_k, renormalize)


@pytest.mark.parametrize("config", MOE_CONFIGS)
def test_every_tile_config_fits_and_is_right(layer, config):
    w13, w2, top_k, renormalize = layer
    x, logits = _inputs(300, w13.shape[2], w13.shape[0], seed=1)
    _assert_close(fused_moe_triton(x, w13, w2, logits, top_k, renormalize, config), x, w13, w2, logits, top_k,
                  renormalize)


def test_decode_reads_only_the_routed_experts(layer):
    w13, w2, top_k, renormalize = layer
    x, logits = _inputs(1, w13.shape[2], w13.shape[0], seed=2)
    expected = fused_moe_triton(x, w13, w2, logits, top_k, renormalize)
    chosen = logits.float().topk(top_k, dim=-1).indices[0]
    poisoned13, poisoned2 = torch.full_like(w13, float("nan")), torch.full_like(w2, float("nan"))
    poisoned13[chosen], poisoned2[chosen] = w13[chosen], w2[chosen]
    out = fused_moe_triton(x, poisoned13, poisoned2, logits, top_k, renormalize)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("num_tokens", [1, 8, 64])
def test_a_cuda_graph_replays_new_routing(layer, num_tokens):
    """No host sync and no routing baked in at capture: each replay follows its own logits."""
    w13, w2, top_k, renormalize = layer
    x, logits = _inputs(num_tokens, w13.shape[2], w13.shape[0], seed=3)
    for _ in range(2):
        fused_moe_triton(x, w13, w2, logits, top_k, renormalize)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_triton(x, w13, w2, logits, top_k, renormalize)
    for seed in (4, 5):
        new_x, new_logits = _inputs(num_tokens, w13.shape[2], w13.shape[0], seed=seed)
        x.copy_(new_x)
        logits.copy_(new_logits)
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(out, x, w13, w2, logits, top_k, renormalize)
