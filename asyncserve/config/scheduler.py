"""The scheduler's part of the config tree: sequence cap, token budget, chunking, preemption, queue bound."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int     # resolved: the per-step token budget
    enable_chunked_prefill: bool
    preemption_mode: str = "recompute"  # or "swap": keep the KV in host memory
    scheduling_policy: str = "fcfs"  # or "priority": lower `priority` first, as vLLM (may preempt running work)
    max_num_waiting: int | None = None  # beyond this the server answers 503
    # A sequence whose KV was computed while it held at most this many tokens recomputes it all when it
    # grows past (Phi-3 LongRoPE's switch of factor sets, as transformers does); None: never.
    recompute_kv_at: int | None = None
