"""LoRA on the linear layers: a model whose projections carry adapters in slots gives, for rows of each
adapter, what the same model gives with that adapter merged into its weights (W + scale * B @ A), and for
base rows what the plain model gives; adapters the model cannot take are refused by name; over tensor-parallel
ranks each rank's part of an adapter gives its part of the whole layer's output (column-parallel) or a partial
sum that adds up to it (row-parallel)."""
from __future__ import annotations

import pytest
import torch

from asyncserve.errors import LoRAAdapterError
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.layers.linear import Linear, MergedLinear, qkv_linear
from asyncserve.layers.lora import LoRALinearMethod, LoRASlots, enable_lora

TARGETS = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def _random_pairs(layer, rank, seed, skip=()):
    gen = torch.Generator().manual_seed(seed)
    return [None if index in skip else (torch.randn(rank, layer.in_features, generator=gen, dtype=torch.float64),
                                        torch.randn(width, rank, generator=gen, dtype=torch.float64))
            for index, width in enumerate(layer.output_sizes)]


def test_a_fused_projection_adds_each_rows_adapter_slice_by_slice():
    torch.manual_seed(0)
    layer = qkv_linear(32, num_heads=4, num_kv_heads=2, head_dim=8)
    layer.weight.data = torch.randn_like(layer.weight, dtype=torch.float64).to(layer.weight.dtype)
    layer.double()
    base = layer.weight.detach().clone()
    slots = LoRASlots(max_loras=3, max_lora_rank=8, max_tokens=16, device=torch.device("cpu"))
    layer.quant_method = LoRALinearMethod(layer.quant_method, layer, slots)
    slots.layers["qkv_proj"] = layer.quant_method
    adapters = {0: (_random_pairs(layer, 4, 1, skip=(1,)), 0.5), 2: (_random_pairs(layer, 8, 2), 2.0)}
    for slot, (pairs, scaling) in adapters.items():
        slots.load(slot, {"qkv_proj": pairs}, scaling)
    x = torch.randn(5, 32, dtype=torch.float64)
    row_slots = [2, -1, 0, 0, 2]
    slots.set_token_slots(torch.tensor(row_slots, dtype=torch.int32))
    out = layer(x)
    for row, slot in enumerate(row_slots):
        weight = base.clone()
        if slot >= 0:
            pairs, scaling = adapters[slot]
            start = 0
            for pair, width in zip(pairs, layer.output_sizes):
                if pair is not None:
                    weight[start:start + width] += scaling * pair[1] @ pair[0]
                start += width
        torch.testing.assert_close(out[row], weight @ x[row])


def test_a_model_with_an_adapter_in_a_slot_equals_the_model_with_it_merged(make_llm):
    llm = make_llm("llama", dtype="float32")
    model = llm.llm_engine.executor.runner.model
    merged_llm = make_llm("llama", dtype="float32")
    merged = merged_llm.llm_engine.executor.runner.model
    slots = LoRASlots(max_loras=2, max_lora_rank=4, max_tokens=64, device=torch.device("cpu"))
    wrapped = enable_lora(model, slots, TARGETS)
    assert wrapped and all(name.rpartition(".")[2] in TARGETS for name in wrapped)
    gen = torch.Generator().manual_seed(3)
    weights, scaling = {}, 0.75
    for name in wrapped:
        layer = model.get_submodule(name)
        pairs = [(torch.randn(4, layer.in_features, generator=gen) * 0.05, torch.randn(width, 4, generator=gen) * 0.05)
                 for width in layer.output_sizes]
        weights["model." + name] = pairs  # the checkpoint's names, as PEFT saves them
        target = merged.get_submodule(name)
        with torch.no_grad():
            delta = torch.cat([b @ a for a, b in pairs]) * scaling
            target.weight += delta.to(target.weight.dtype)
    slots.load(1, weights, scaling)
    ids = torch.tensor([5, 17, 3, 99, 42, 7])
    positions = torch.arange(len(ids))
    meta = _prefill_metadata(llm, len(ids))
    with torch.inference_mode():
        slots.set_token_slots(torch.ones(len(ids), dtype=torch.int32))
        adapted = model.compute_logits(model(ids, positions, meta))
        merged_logits = merged.compute_logits(merged(ids, positions, _prefill_metadata(merged_llm, len(ids))))
        slots.set_token_slots(torch.full((len(ids),), -1, dtype=torch.int32))
        base_rows = model.compute_logits(model(ids, positions, _prefill_metadata(llm, len(ids))))
    torch.testing.assert_close(adapted, merged_logits, atol=1e-4, rtol=1e-4)
    assert (adapted - base_rows).abs().max() > 1e-3  # the adapter changed something


def _prefill_metadata(llm, num_tokens):
    """One sequence's prompt in blocks 0.. of the engine's pool (nothing else runs)."""
    block_size = llm.llm_engine.config.cache.block_size
    num_blocks = -(-num_tokens // block_size)
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens), block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32), max_query_len=num_tokens,
        max_seq_len=num_tokens, context_lens=torch.tensor([num_tokens], dtype=torch.int32))


def test_adapters_the_layers_cannot_take_are_refused(make_llm):
    model = make_llm("llama", dtype="float32").llm_engine.executor.runner.model
    slots = LoRASlots(max_loras=1, max_lora_rank=2, max_tokens=8, device=torch.device("cpu"))
    name = enable_lora(model, slots, TARGETS)[0]
    layer = model.get_submodule(name)
    with pytest.raises(LoRAAdapterError, match="over max_lora_rank=2"):
        slots.load(0, {"model." + name: _random_pairs(layer, 4, 0)}, 1.0)
    with pytest.raises(LoRAAdapterError, match="does not have or does not adapt: model.layers.0.mlp.lm"):
        slots.load(0, {"model.layers.0.mlp.lm": [None]}, 1.0)



def test_the_lm_head_is_never_wrapped(make_llm):
    """The LM head is a linear layer (tied or not), but its input holds the sampled rows only: wrapped, the
    step's slot table and prompt chunks indexed past its rows (an illegal memory access on the GPU at the 8B
    shape, where every prompt step takes the chunk kernels)."""
    from asyncserve.layers.linear import LinearBase
    model = make_llm("llama", dtype="float32").llm_engine.executor.runner.model
    assert isinstance(model.lm_head, LinearBase)
    slots = LoRASlots(max_loras=1, max_lora_rank=2, max_tokens=8, device=torch.device("cpu"))
    wrapped = enable_lora(model, slots)  # no target list: every linear layer the adapters may name
    assert wrapped and not any(name.endswith("lm_head") for name in wrapped)
    assert not isinstance(model.lm_head.quant_method, LoRALinearMethod)


SPLIT_LAYERS = {  # layer kind -> a whole layer of 32 inputs, built at the current tensor-parallel rank
    "qkv, one KV head replicated over two ranks": lambda: qkv_linear(32, num_heads=4, num_kv_heads=1, head_dim=8),
    "gate|up": lambda: MergedLinear(32, {"gate_proj": 48, "up_proj": 48}),
    "row-parallel": lambda: Linear(32, 24, parallel="row"),
    "column-parallel, gathered and padded": lambda: Linear(32, 31, parallel="column", gather_output=True),
}


def _adapted_layer(kind, rank, size, weight, pairs, scaling):
    """The layer as tensor-parallel rank `rank` of `size` builds and loads it, with the whole adapter in slot 0."""
    from asyncserve.layers.parallel_state import set_tensor_parallel
    set_tensor_parallel(rank, size)
    try:
        layer = SPLIT_LAYERS[kind]().double()
    finally:
        set_tensor_parallel(0, 1)
    layer.weight.weight_loader(layer.weight, weight)
    slots = LoRASlots(max_loras=1, max_lora_rank=8, max_tokens=8, device=torch.device("cpu"))
    layer.quant_method = LoRALinearMethod(layer.quant_method, layer, slots)
    slots.layers["proj"] = layer.quant_method
    slots.load(0, {"proj": pairs}, scaling)
    slots.set_token_slots(torch.tensor([0, -1, 0], dtype=torch.int32))
    return layer


@pytest.mark.parametrize("kind", list(SPLIT_LAYERS))
def test_each_ranks_part_of_an_adapter_gives_its_part_of_the_whole_layers_output(kind):
    whole = SPLIT_LAYERS[kind]().double()
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(whole.weight.shape, generator=gen, dtype=torch.float64)
    pairs = [(torch.randn(6, 32, generator=gen, dtype=torch.float64), torch.randn(width, 6, generator=gen,
                                                                                 dtype=torch.float64))
             for width in whole.output_sizes]
    x = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    one = _adapted_layer(kind, 0, 1, weight, pairs, 0.5)
    expected = one.quant_method.apply(one, x, None)
    assert (expected[0] != one.quant_method.base.apply(one, x, None)[0]).all()
    ranks = [_adapted_layer(kind, rank, 2, weight, pairs, 0.5) for rank in range(2)]
    if ranks[0].input_parallel:  # partial products over each rank's inputs, summed by the layer's all-reduce
        parts = [layer.quant_method.apply(layer, x[:, layer.input_start:layer.input_start + layer.in_features], None)
                 for layer in ranks]
        torch.testing.assert_close(sum(parts), expected)
        return
    for layer in ranks:  # each slice's rows of this rank (a KV head kept by both ranks, a padded tail zero)
        out = layer.quant_method.apply(layer, x, None)
        local = whole_start = 0
        for (start, size), whole_size in zip(layer.output_parts, layer.whole_output_sizes):
            present = max(0, min(size, whole_size - start))
            torch.testing.assert_close(out[:, local:local + present],
                                       expected[:, whole_start + start:whole_start + start + present])
            local, whole_start = local + size, whole_start + whole_size


def test_rows_grouped_by_adapter_give_what_the_per_row_path_gives():
    """The grouped kernels (ASYNCSERVE_LORA_GROUPED=1 on CUDA) through the layer's own wiring, on the CPU in
    Triton's interpreter: the slot table's groups, then shrink and expand over them, equal the reference
    per-row path for rows of two adapters, an empty slot and base rows."""
    torch.manual_seed(0)
    layer = qkv_linear(32, num_heads=4, num_kv_heads=2, head_dim=8).requires_grad_(False)
    layer.weight.data.normal_()
    slots = LoRASlots(max_loras=3, max_lora_rank=8, max_tokens=16, device=torch.device("cpu"))
    slots.groups = (torch.zeros(16, dtype=torch.int32), torch.zeros(3, dtype=torch.int32),
                    torch.zeros(3, dtype=torch.int32))
    method = layer.quant_method = LoRALinearMethod(layer.quant_method, layer, slots)
    slots.layers["qkv_proj"] = method
    slots.load(0, {"qkv_proj": [tuple(t.float() for t in pair) if pair else None
                                for pair in _random_pairs(layer, 4, 1, skip=(1,))]}, 0.5)
    slots.load(2, {"qkv_proj": [tuple(t.float() for t in pair) for pair in _random_pairs(layer, 8, 2)]}, 2.0)
    x = torch.randn(7, 32)
    slots.set_token_slots(torch.tensor([2, -1, 0, 0, 2, -1, 2], dtype=torch.int32))
    base_out = method.base.apply(layer, x, None)
    grouped = method._apply_grouped(x, base_out.clone(), slots.groups)
    per_row = method.apply(layer, x, None)  # a CPU tensor: the reference kernels
    torch.testing.assert_close(grouped, per_row, atol=1e-4, rtol=1e-4)
    assert not torch.equal(per_row, base_out)
