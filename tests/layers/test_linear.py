"""Linear layers: one-row kernels compute the same product; fused projections load shards in place."""
import pytest
import torch

from asyncserve.kernels import HAS_TRITON
from asyncserve.layers.linear import MergedLinear, linear


@pytest.mark.parametrize("kernel", ["mv", pytest.param((8, 512, 4, 4), marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed"))])
def test_one_row_kernels_equal_linear(kernel):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(37, 19), torch.randn(37), torch.randn(1, 19)
    expected = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(linear(x, weight, bias, kernel), expected, rtol=1e-5, atol=1e-5)
    rows = torch.randn(3, 19)  # several rows always take the GEMM
    assert torch.equal(linear(rows, weight, None, kernel), torch.nn.functional.linear(rows, weight))


def test_merged_linear_loads_shards_in_place():
    layer = MergedLinear(4, {"q": 2, "k": 3}, bias=True)
    layer.weight.weight_loader(layer.weight, torch.full((3, 4), 2.0), "k")
    layer.bias.weight_loader(layer.bias, torch.tensor([5.0, 6.0]), "q")
    assert torch.equal(layer.weight[2:], torch.full((3, 4), 2.0))
    assert layer.bias[:2].tolist() == [5.0, 6.0]


def test_merged_linear_refuses_a_shard_of_the_wrong_size():
    layer = MergedLinear(4, {"q": 2, "k": 3})
    with pytest.raises(ValueError, match="expected 3"):
        layer.weight.weight_loader(layer.weight, torch.zeros(2, 4), "k")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("act_name", ["silu", "gelu_tanh"])
def test_gated_mlp_takes_the_fused_gemv_for_one_row_only(act_name):
    """A down projection whose method chose the activation-fused GEMV computes down(act(gate_up)) for one
    row in that kernel, and every other batch (or another activation) through the activation and the GEMM."""
    from asyncserve.layers.activation import GeluTanhAndMul, SiluAndMul
    from asyncserve.layers.linear import Linear
    torch.manual_seed(1)
    act = {"silu": SiluAndMul(), "gelu_tanh": GeluTanhAndMul()}[act_name]
    other = {"silu": GeluTanhAndMul(), "gelu_tanh": SiluAndMul()}[act_name]
    down = Linear(24, 11, bias=True)
    with torch.no_grad():
        down.weight.copy_(torch.randn(11, 24) / 5)
        down.bias.copy_(torch.randn(11))
    gate_up = torch.randn(1, 48)
    calls = []
    method = down.quant_method
    method.gated_row, method.gated_activation = (8, 512, 4, 4), act_name
    original = method.apply_gated
    method.apply_gated = lambda *a: calls.append(1) or original(*a)
    out = down.forward_activated(act, gate_up)
    assert calls == [1]
    torch.testing.assert_close(out, down(act(gate_up)), rtol=1e-5, atol=1e-5)
    rows = torch.randn(3, 48)
    assert torch.equal(down.forward_activated(act, rows), down(act(rows)))
    assert torch.equal(down.forward_activated(other, gate_up), down(other(gate_up)))
    assert calls == [1]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_pre_norm_block_runs_its_norms_inside_the_gemvs_for_one_row(monkeypatch):
    """A Llama layer whose qkv and gate|up projections chose norm-fused GEMVs computes the same row as the
    norm kernels and GEMMs apart (first layer without a residual, later ones with), and more rows as before."""
    from types import SimpleNamespace

    from asyncserve.layers.quantization import unquantized
    from asyncserve.models import llama
    torch.manual_seed(2)
    config = SimpleNamespace(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                             rms_norm_eps=1e-6, max_position_embeddings=64, rope_theta=10000.0, mlp_bias=False)
    layer = llama.LlamaDecoderLayer(config, qkv_bias=True, qk_norm=False, quant_config=None, prefix="layers.0")
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn_like(param) / 4)
    layer.self_attn.attend = lambda positions, qkv, meta: qkv[:, :48] * 2  # attention itself is not under test
    monkeypatch.setattr(unquantized, "FUSE_NORM_ROW", True)
    for projection in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):  # tuning on a CPU chooses nothing
        assert projection.quant_method.tune_normed_row(projection, {}) is None
    assert layer.tune_single_row_fusions({}) == [] and not layer.fused_norm_rows
    monkeypatch.setattr(unquantized.UnquantizedLinearMethod, "tune_normed_row",
                        lambda self, layer_, timings: setattr(self, "normed_row", (8, 512, 4, 4)) or "chosen")
    assert layer.tune_single_row_fusions({}) == ["chosen", "chosen"] and layer.fused_norm_rows
    hidden, residual = torch.randn(1, 48), torch.randn(1, 48)
    for res in (None, residual):
        fused_out, fused_residual = layer(None, hidden, res, None)
        layer.fused_norm_rows = False
        plain_out, plain_residual = layer(None, hidden, res, None)
        layer.fused_norm_rows = True
        torch.testing.assert_close(fused_out, plain_out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused_residual, plain_residual, rtol=1e-6, atol=1e-6)
    rows = torch.randn(3, 48)
    out, _ = layer(None, rows, rows, None)
    layer.fused_norm_rows = False
    assert torch.equal(out, layer(None, rows, rows, None)[0])
    from asyncserve.layers.norm import GemmaRMSNorm
    layer.fused_norm_rows = False
    layer.post_attention_layernorm = GemmaRMSNorm(48)  # (1 + weight) scaling: not the GEMV's norm
    assert layer.tune_single_row_fusions({}) == [] and not layer.fused_norm_rows


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("fusion", ["gated", "normed"])
def test_start_up_timing_keeps_a_fused_gemv_only_where_faster(fusion, monkeypatch):
    """The timing behind both fusions: every GEMV config is run (here under the interpreter, timed by a fake
    clock) and one is kept only if it beats the separate kernels."""
    from asyncserve.kernels import GEMV_CONFIGS
    from asyncserve.layers import single_row
    monkeypatch.setattr(single_row, "_COLD_BYTES", 0)  # one copy of the weight
    weight = torch.randn(12, 40)
    for fused_cost, expected in ((0.5, GEMV_CONFIGS[0]), (2.0, None)):
        calls = []

        def fake_time(fn, repeats=30, fused_cost=fused_cost):
            before = len(calls)
            fn()
            return 1.0 if len(calls) == before else fused_cost  # the separate path records nothing
        monkeypatch.setattr(single_row, "time_ms", fake_time)
        for name in ("linear_gated", "linear_normed"):
            original = getattr(single_row, name)
            monkeypatch.setattr(single_row, name, lambda *a, _o=original: calls.append(1) or _o(*a))
        if fusion == "gated":
            chosen = single_row.fastest_gated_row_kernel(weight, "silu", None)
        else:
            chosen = single_row.fastest_normed_row_kernel(weight, None)
        assert chosen == (expected, 1.0, min(1.0, fused_cost))
        assert len(calls) == len(GEMV_CONFIGS)
        monkeypatch.undo()
        monkeypatch.setattr(single_row, "_COLD_BYTES", 0)


def test_start_up_timing_skips_a_candidate_that_fails(caplog):
    """A tile this GPU cannot compile or fit (Triton raises) is left out with one warning; the others are
    still weighed."""
    from asyncserve.layers.single_row import fastest

    def time_candidate(candidate):
        if candidate == "too big":
            raise RuntimeError("out of resources: shared memory\nmore detail")
        return {"slow": 2.0, "fast": 0.5}[candidate]

    with caplog.at_level("WARNING", logger="asyncserve"):
        assert fastest(["slow", "too big", "fast"], time_candidate, 1.0) == ("fast", 0.5)
    assert "skips too big: RuntimeError: out of resources: shared memory" in caplog.text
    assert "more detail" not in caplog.text
