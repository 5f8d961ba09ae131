"""ASYNCSERVE_STEP_TRACE: one JSON line per engine step, whose scheduled tokens add up to the work done."""
from __future__ import annotations

import json

from asyncserve import SamplingParams
from asyncserve.config import EngineConfig
from asyncserve.engine.async_engine import AsyncEngine
from asyncserve.engine.step_profile import PHASES, TRACE_ENV


async def test_the_step_trace_accounts_for_every_token(tiny_model_dir, tmp_path, monkeypatch):
    trace = tmp_path / "steps.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    engine = AsyncEngine(EngineConfig(model=tiny_model_dir("qwen3"), device="cpu", num_gpu_blocks_override=64,
                                      max_model_len=512, max_num_batched_tokens=64))
    await engine.start()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        prompt = {"prompt_token_ids": list(range(10, 110))}  # 100 tokens: two 64-token chunks
        finals = [[output async for output in engine.generate(prompt, params)][-1]]
    finally:
        await engine.stop()
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert finals[0].finished and len(finals[0].outputs[0].token_ids) == 6
    assert all(set(PHASES) <= set(line) and line["t"] > 0 for line in lines)
    assert sum(line["prefill_tokens"] for line in lines) == 100
    # The last token of the output is sampled by the step that computes the fifth; no step computes it.
    assert sum(line["tokens"] for line in lines) == 100 + 5
    assert max(line["seqs"] for line in lines) == 1 and engine.step_profile.num_steps >= len(lines)


def test_no_trace_without_the_variable(monkeypatch, tmp_path):
    from asyncserve.engine.step_profile import StepProfile
    monkeypatch.delenv(TRACE_ENV, raising=False)
    profile = StepProfile()
    profile.end_step([(object(), 3)], 0)
    assert profile.num_steps == 1 and profile._trace is None
