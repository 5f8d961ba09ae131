"""The pipelined step (launch N+1, then process N) gives exactly what the serial step gives."""
from __future__ import annotations

from asyncserve import SamplingParams

from tests.conftest import PROMPTS, assert_pool_clean


def _serial(engine) -> dict[str, list]:
    """Schedule, run to the end, process: the next step is scheduled only after this one's tokens."""
    results = {}
    while engine.has_unfinished_requests():
        message, scheduled = engine.schedule()
        if not scheduled:
            continue
        for output in engine.process(scheduled, engine.executor.execute(message)):
            if output.finished:
                results[output.request_id] = [(c.token_ids, c.finish_reason, c.text) for c in output.outputs]
    return results


def _pipelined(engine, abort_at: dict[int, str] | None = None, aborted: list | None = None) -> dict[str, list]:
    results = {}
    num_steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = [(c.token_ids, c.finish_reason, c.text) for c in output.outputs]
        num_steps += 1
        request_id = (abort_at or {}).get(num_steps)
        if request_id in engine.requests:  # a step that computes for it is in flight right now
            engine.abort_request(request_id)
            aborted.append(request_id)
    return results


def _workload():
    greedy = SamplingParams(temperature=0.0, max_tokens=14)
    stops = SamplingParams(temperature=0.0, max_tokens=30, stop=["e", "a"], include_stop_str_in_output=True)
    stop_ids = SamplingParams(temperature=0.8, seed=4, max_tokens=30, stop_token_ids=list(range(20, 400)))
    seeded_n = SamplingParams(temperature=1.0, seed=7, n=2, best_of=3, max_tokens=9)
    penalised = SamplingParams(temperature=0.7, seed=1, repetition_penalty=1.4, frequency_penalty=0.3,
                               max_tokens=10, logprobs=3)
    short = SamplingParams(temperature=0.0, max_tokens=1)
    params = [greedy, stops, stop_ids, seeded_n, penalised, short]
    return [(f"r{i}", prompt, params[i % len(params)]) for i, prompt in enumerate(PROMPTS * 2)]


def _add_all(engine, workload) -> None:
    for request_id, prompt, params in workload:
        engine.add_request(request_id, engine.input_processor.process(prompt, params))


def test_pipelined_steps_equal_serial_steps(make_llm):
    # A small pool and budget: preemption and chunked prefill happen while steps are in flight.
    settings = dict(num_gpu_blocks_override=34, max_model_len=272, max_num_batched_tokens=40, block_size=8)
    serial, pipelined = make_llm("llama", **settings).llm_engine, make_llm("llama", **settings).llm_engine
    workload = _workload()
    _add_all(serial, workload)
    _add_all(pipelined, workload)
    expected = _serial(serial)
    assert _pipelined(pipelined) == expected
    assert len(expected) == len(workload)
    assert pipelined.executor.runner.num_device_fed_steps > 0  # steps really ran ahead of the host
    assert pipelined.scheduler.num_preemptions > 0
    assert any(finish == "stop" for outs in expected.values() for _, finish, _ in outs)
    assert_pool_clean(pipelined)


def test_an_abort_while_a_step_is_in_flight_loses_nothing_else(make_llm):
    serial, pipelined = make_llm("qwen3").llm_engine, make_llm("qwen3").llm_engine
    workload = _workload()
    _add_all(serial, workload)
    _add_all(pipelined, workload)
    expected = _serial(serial)
    aborted = []
    results = _pipelined(pipelined, abort_at={2: "r0", 4: "r6", 5: "r10"}, aborted=aborted)
    assert len(aborted) == 3
    for request_id in expected:
        if request_id not in aborted:
            assert results[request_id] == expected[request_id], request_id
    assert not set(aborted) & set(results)  # their in-flight tokens were dropped, not delivered
    assert_pool_clean(pipelined)
