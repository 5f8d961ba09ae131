"""Finished and aborted requests are freed by reference counting: no Request <-> Sequence cycle is left
for the cyclic garbage collector, whose full collections would stall a server's event loop."""
from __future__ import annotations

import contextlib
import gc
import weakref

from asyncserve import SamplingParams
from asyncserve.engine.sequence import Request, Sequence

from tests.conftest import PROMPTS


@contextlib.contextmanager
def collector_off_saving_garbage():
    """Turns automatic collection off and keeps what a collection finds unreachable in `gc.garbage`."""
    gc.collect()
    gc.garbage.clear()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


def engine_objects(garbage: list) -> list:
    return [obj for obj in garbage if isinstance(obj, (Request, Sequence))]


def _workload() -> list[tuple[str, SamplingParams]]:
    """Forks (n, best_of; n=2 with one token forks and finishes in one step), stops, logprobs."""
    params = [SamplingParams(temperature=0.8, seed=1, max_tokens=8, logprobs=2),
              SamplingParams(temperature=1.0, seed=3, n=2, best_of=3, max_tokens=5),
              SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=1),
              SamplingParams(temperature=0.0, max_tokens=20, stop=["e"], prompt_logprobs=1)]
    return [(prompt, params[i % len(params)]) for i, prompt in enumerate(PROMPTS * 2)]


def test_finished_and_aborted_requests_are_freed_without_the_garbage_collector(make_llm):
    engine = make_llm("qwen3", max_num_batched_tokens=64).llm_engine
    with collector_off_saving_garbage() as garbage:
        requests = [engine.add_request(f"r{i}", engine.input_processor.process(prompt, params)) for i, (prompt, params) in enumerate(_workload())]
        num_steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            num_steps += 1
            if num_steps in (2, 4, 6):  # aborted with a step for them in flight, forks included
                for request in requests[num_steps::5]:
                    engine.abort_request(request.request_id)
        engine.step()  # the engine's next step, idle
        assert any(seq.finish_reason == "abort" for request in requests for seq in request.seqs)
        assert any(len(request.seqs) > 1 for request in requests)
        alive = [weakref.ref(obj) for request in requests for obj in (request, *request.seqs)]
        del requests, request
        assert [ref() for ref in alive if ref() is not None] == []  # freed by reference counting
        gc.collect()
        assert engine_objects(garbage) == []
