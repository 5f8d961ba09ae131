"""Sizing a hybrid model's state pool on the GPU (runner/memory.py, with the device calls stood in): the first
memory profile counts the sampler over max_num_seqs rows; when fewer sequences' states fit, the profile runs
again at about that many and the slots are fitted to the memory that frees, and a count above the one
measured is measured too, so the peak behind the final split is one the engine can reach."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from asyncserve.runner import memory

_GIB, _MIB = 1 << 30, 1 << 20
PER_SLOT, BLOCK_BYTES, SAMPLER_ROW = 76 * _MIB, 1 * _MIB, 20 * _MIB


def _setup(monkeypatch, max_num_seqs=512, max_model_len=909):
    profiled = []

    def fake_profile(runner, num_tokens, rows, max_len, dtype, model=None):
        profiled.append(rows)
        return 50 * _GIB + 2 * _GIB + rows * SAMPLER_ROW  # weights, the forward, the sampler's rows

    monkeypatch.setattr(memory, "profile_peak_memory", fake_profile)
    monkeypatch.setattr(memory, "state_bytes_per_slot", lambda layers: PER_SLOT)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * _GIB))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (28 * _GIB, 80 * _GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 52 * _GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 50 * _GIB)
    runner = SimpleNamespace(kv_bytes_per_block=lambda: BLOCK_BYTES, drafter=None,
                             model=SimpleNamespace(state_layers=lambda: ["a layer"]))
    config = SimpleNamespace(
        model=SimpleNamespace(device=torch.device("cuda"), max_model_len=max_model_len),
        cache=SimpleNamespace(num_gpu_blocks_override=None, num_state_slots=max_num_seqs, gpu_memory_utilization=0.9,
                              block_size=16, mamba_ssm_cache_dtype="auto", cpu_kv_cache_space=4),
        scheduler=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=8192),
        kv_cache_torch_dtype=torch.bfloat16)
    return runner, config, profiled


def test_fewer_states_are_measured_again_and_fitted_to_what_that_frees(monkeypatch):
    runner, config, profiled = _setup(monkeypatch)
    blocks = memory.num_kv_blocks(runner, config)
    slots = config.scheduler.max_num_seqs
    assert profiled[0] == 512 and profiled[1] < 512  # measured again at the count that fits
    available = 0.9 * 80 * _GIB - (52 * _GIB + max(profiled[1:]) * SAMPLER_ROW)
    share = available * max(0.5, PER_SLOT / (PER_SLOT + 57 * BLOCK_BYTES))
    assert slots == int(share // PER_SLOT) - 1 == config.cache.num_state_slots
    first_available = 0.9 * 80 * _GIB - (52 * _GIB + 512 * SAMPLER_ROW)
    assert slots > int(first_available / 2 // PER_SLOT) - 1  # more than the first profile's half split
    assert max(profiled) >= slots  # the sampler rows that will run were measured
    assert blocks == int((available - PER_SLOT * (slots + 1)) // BLOCK_BYTES)


def test_states_that_fit_leave_max_num_seqs_and_profile_once(monkeypatch):
    runner, config, profiled = _setup(monkeypatch, max_num_seqs=16)
    memory.num_kv_blocks(runner, config)
    assert profiled == [16] and config.scheduler.max_num_seqs == 16


def test_a_model_without_states_that_leaves_no_room_gets_the_memory_error(monkeypatch):
    """No state layers and nothing left after the weights (a 61 GB model at gpu_memory_utilization=0.5 on an
    80 GB card): the actionable MemoryError, not a division by the zero bytes of a state slot."""
    import pytest
    runner, config, _ = _setup(monkeypatch)
    runner.model = SimpleNamespace(state_layers=lambda: [])
    monkeypatch.setattr(memory, "state_bytes_per_slot", lambda layers: 0 if not layers else PER_SLOT)
    config.cache.gpu_memory_utilization = 0.5
    with pytest.raises(MemoryError, match="raise gpu_memory_utilization"):
        memory.num_kv_blocks(runner, config)
