"""A GPU engine's first steps, run before it serves: a greedy and a sampled request through the real path.

The first request a fresh server took paid for what start-up had not run yet (Triton's compiles of the
kernel variants a real step picks, torch's lazily loaded modules): on an H100 the first step of an 8B server
held its launch thread for 1.35 s, so the first burst of 64 clients all waited that long for a token (mean
TTFT 770 ms at c=64 against 462 ms once warm) and the event loop stalled 50 ms on the GIL. vLLM warms up
with dummy runs too. Afterwards the counters the metrics read and the prefix cache are as a fresh engine's.
"""
from __future__ import annotations

import logging
import time

from asyncserve.engine.bucket_counts import ITERATION_TOKEN_BUCKETS, BucketCounts
from asyncserve.sampling_params import SamplingParams

logger = logging.getLogger("asyncserve")

_PROMPT_TOKENS = 512
_OUTPUT_TOKENS = 4


def warm_up(engine) -> None:
    """On the GPU, for generating models (the CPU has nothing to compile)."""
    mc = engine.config.model
    if mc.device.type == "cuda" and not mc.is_pooling:
        run_warm_up(engine)


def run_warm_up(engine) -> None:
    mc = engine.config.model
    started = time.perf_counter()
    length = max(1, min(_PROMPT_TOKENS, mc.max_model_len // 2))  # room for the outputs at any max_model_len
    new_tokens = max(1, min(_OUTPUT_TOKENS, mc.max_model_len - length))
    prompt = [1 + i % (mc.vocab_size - 1) for i in range(length)]
    params = [SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=new_tokens, ignore_eos=True,
                             seed=0)]
    for index, param in enumerate(params):
        engine.add_request(f"asyncserve-warm-up-{index}",
                           engine.input_processor.process({"prompt_token_ids": prompt}, param))
    while engine.has_unfinished_requests():
        engine.step()
    _forget(engine)
    logger.info("warmed up with a greedy and a sampled request of %d prompt tokens in %.1f s", length,
                time.perf_counter() - started)


def _forget(engine) -> None:
    """The counters and the cache as they were before the warm-up's requests."""
    engine.stats.update(prompt_tokens=0, generation_tokens=0)
    engine.finished_timings.clear()
    engine.iteration_tokens = BucketCounts(ITERATION_TOKEN_BUCKETS)
    engine.scheduler.num_preemptions = 0
    engine.block_pool.num_cache_queries = engine.block_pool.num_cache_hits = 0
    engine.block_pool.reset_prefix_cache()
    if engine.speculator is not None:
        engine.speculator.stats = type(engine.speculator.stats)(engine.config.speculative.num_speculative_tokens)
        if engine.speculator.governor is not None:  # its first steps ran while kernels compiled
            engine.speculator.governor = type(engine.speculator.governor)()
