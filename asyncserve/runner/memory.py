"""Sizing the KV pool: measure what the model needs at its peak, give the rest to blocks."""
from __future__ import annotations

import logging

import torch

from asyncserve.config.tree import Config
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.runner.state_pool import state_bytes_per_slot
from asyncserve.sample.sampler import SamplingTensors

logger = logging.getLogger("asyncserve")

_GIB = 1 << 30


def num_kv_blocks(runner, config: Config) -> int:
    """`config` is the whole tree: cache settings, the scheduler's budget, the model's device."""
    model_config, cache = config.model, config.cache
    block_bytes = runner.kv_bytes_per_block()  # a draft model's KV shares the block ids
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    # Hybrid models: the state pool (one slot per max_num_seqs, and the graphs' padding slot) comes first.
    state_bytes = state_bytes_per_slot(runner.model.state_layers()) * (cache.num_state_slots + 1)
    if model_config.device.type != "cuda":
        available = cache.cpu_kv_cache_space * _GIB
        if state_bytes > state_share(runner, config, available):
            state_bytes = _fit_state_slots(runner, config, state_share(runner, config, available), available)
        return max(1, int(available - state_bytes) // block_bytes)
    logger.info("profiling memory: one forward pass over %d tokens to size the KV cache",
                config.scheduler.max_num_batched_tokens)
    peak = profile_peak_memory(runner, config.scheduler.max_num_batched_tokens,
                               config.scheduler.max_num_seqs, model_config.max_model_len,
                               config.kv_cache_torch_dtype)
    if runner.drafter is not None and runner.drafter.profiles_own_forward:
        # the draft's forward runs apart from the target's: the larger peak counts
        peak = max(peak, profile_peak_memory(runner, config.scheduler.max_num_batched_tokens,
                                             config.scheduler.max_num_seqs, model_config.max_model_len,
                                             config.kv_cache_torch_dtype, model=runner.drafter.model))
    total = torch.cuda.get_device_properties(model_config.device).total_memory
    free_now, _ = torch.cuda.mem_get_info(model_config.device)
    used_by_others = total - free_now - torch.cuda.memory_reserved(model_config.device)
    available = total * cache.gpu_memory_utilization - peak - max(0, used_by_others)
    if state_bytes and state_bytes > state_share(runner, config, available):
        # The peak counted the sampler over max_num_seqs rows (with a 248k vocabulary, gigabytes), and fewer
        # will run: measure again at about that many, then fit the slots to what it frees.
        fewer = int(state_share(runner, config, available) // state_bytes_per_slot(runner.model.state_layers()))
        peak = profile_peak_memory(runner, config.scheduler.max_num_batched_tokens,
                                   max(1, min(config.scheduler.max_num_seqs, fewer)), model_config.max_model_len,
                                   config.kv_cache_torch_dtype)
        available = total * cache.gpu_memory_utilization - peak - max(0, used_by_others)
        if state_bytes > state_share(runner, config, available):
            state_bytes = _fit_state_slots(runner, config, state_share(runner, config, available), available)
        if config.scheduler.max_num_seqs > fewer:  # more fit than were measured: their sampler rows counted too
            peak = max(peak, profile_peak_memory(runner, config.scheduler.max_num_batched_tokens,
                                                 config.scheduler.max_num_seqs, model_config.max_model_len,
                                                 config.kv_cache_torch_dtype))
            available = total * cache.gpu_memory_utilization - peak - max(0, used_by_others)
            if state_bytes > state_share(runner, config, available):
                state_bytes = _fit_state_slots(runner, config, state_share(runner, config, available), available)
    budget = available - state_bytes
    num_blocks = int(budget // block_bytes)
    logger.info("memory profile: weights %.2f GiB, peak activations %.2f GiB, other processes %.2f GiB, "
                "state pool %.2f GiB, KV pool %.2f GiB of %s (gpu_memory_utilization=%.2f)",
                torch.cuda.memory_allocated(model_config.device) / _GIB,
                (peak - torch.cuda.memory_allocated(model_config.device)) / _GIB,
                max(0, used_by_others) / _GIB, state_bytes / _GIB, max(0, num_blocks) * block_bytes / _GIB,
                str(config.kv_cache_torch_dtype).removeprefix("torch."), cache.gpu_memory_utilization)
    if num_blocks <= 0:
        raise MemoryError("No memory is left for the KV cache after loading the model: raise "
                          "gpu_memory_utilization, lower max_num_batched_tokens, or use a smaller model"
                          + (" (or lower max_num_seqs: each one holds a recurrent-state slot)." if state_bytes
                             else "."))
    return num_blocks


def state_share(runner, config: Config, available: float) -> float:
    """The bytes the state pool may take of `available`: half, or more where a sequence's state outweighs
    the KV it can hold (max_model_len tokens), in proportion, so that the slots and the KV pool run out
    together: with short contexts (Qwen3.5-27B at 909 tokens: a 76 MiB state beside 57 MiB of KV) the
    half split left KV blocks no sequence could use."""
    per_slot = state_bytes_per_slot(runner.model.state_layers())
    if not per_slot:
        return available
    blocks_per_seq = -(-config.model.max_model_len // config.cache.block_size)
    kv_per_seq = blocks_per_seq * runner.kv_bytes_per_block()
    return available * max(0.5, per_slot / (per_slot + kv_per_seq))


def _fit_state_slots(runner, config: Config, share: float, available: float) -> int:
    """max_num_seqs sequences' recurrent states would take more than their share of the memory left after
    weights and activations (`state_share`): run fewer sequences at once rather than refuse to start (vLLM
    refuses), and say so. Hybrid models run in one process (tensor parallelism is refused for them), so the
    tree changed here is the one the engine reads next. Returns the state pool's new size in bytes."""
    per_slot = state_bytes_per_slot(runner.model.state_layers())
    slots = min(config.scheduler.max_num_seqs, int(share // per_slot) - 1)  # one more: the graphs' padding rows
    if slots < 1:
        raise MemoryError(f"One sequence's recurrent state takes {per_slot / _GIB:.2f} GiB and the memory left "
                          f"after loading the model holds none: raise gpu_memory_utilization, set "
                          f"--mamba-ssm-cache-dtype bfloat16, or use a smaller model.")
    if slots < config.scheduler.max_num_seqs:
        logger.warning("max_num_seqs lowered from %d to %d: each sequence holds a %.0f MiB recurrent state "
                       "(--mamba-ssm-cache-dtype %s), and the state pool may take %.2f of the %.2f GiB left for "
                       "caches (half, or more where states outweigh max_model_len tokens of KV); set "
                       "max_num_seqs to choose, or a smaller state dtype to fit more",
                       config.scheduler.max_num_seqs, slots, per_slot / (1 << 20),
                       config.cache.mamba_ssm_cache_dtype, share / _GIB, available / _GIB)
    config.cache.num_state_slots = config.scheduler.max_num_seqs = slots
    return per_slot * (slots + 1)


@torch.inference_mode()
def profile_peak_memory(runner, num_tokens: int, max_num_seqs: int, max_model_len: int,
                        kv_cache_dtype: torch.dtype, model=None) -> int:
    """Peak bytes of a forward over the largest prefill batch plus the sampler over max_num_seqs rows
    (`model`: a draft model's forward and logits instead of the target's)."""
    device = runner.device
    target = model is None
    model = runner.model if target else model
    attention = model.attention_layers()
    layer = attention[0]
    scratch = torch.zeros(1, runner.block_size, layer.num_kv_heads, layer.head_dim,
                          dtype=kv_cache_dtype, device=device)
    for attn in attention:
        attn.kv_cache = (scratch, scratch)
    num_seqs = max(1, min(max_num_seqs, -(-num_tokens // max_model_len)))
    state_layers = model.state_layers()
    for layer in state_layers:  # a scratch slot per profiled sequence
        layer.state_cache = tuple(torch.zeros((num_seqs, *shape), dtype=dtype, device=device)
                                  for shape, dtype in layer.state_shapes())
    lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
    starts = [0]
    for length in lens:
        starts.append(starts[-1] + length)
    max_blocks = -(-max(lens) // runner.block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        max_query_len=max(lens), max_seq_len=max(lens),
        state_slots=torch.arange(num_seqs, device=device) if state_layers else None)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(length, device=device) for length in lens])
    hidden = model(input_ids, positions, meta)
    logits = None
    if model.lm_head is not None:  # an embedding model samples nothing
        rows = hidden[:1].expand(max_num_seqs, -1)
        logits = model.compute_logits(rows)
        if target:  # a draft model takes its argmax only
            runner.sampler(logits, SamplingTensors(
                temperature=torch.ones(max_num_seqs, device=device),
                top_p=torch.full((max_num_seqs,), 0.9, device=device),
                top_k=torch.full((max_num_seqs,), 50, dtype=torch.int64, device=device), min_p=None,
                generators=[None] * max_num_seqs, all_greedy=False, max_num_logprobs=20))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    for attn in attention:
        attn.kv_cache = None
    for layer in state_layers:
        layer.state_cache = None
    del hidden, logits, scratch
    torch.cuda.empty_cache()
    return peak
