"""vLLM's priority policy: lower `priority` runs first; a waiting request of better priority preempts running
worse ones when there is no seat (or no blocks) for it, and everyone's tokens stay what they would be alone;
fcfs refuses a priority other than 0."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from asyncserve.errors import InvalidParameterError
from tests.conftest import PROMPTS

PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _run_until(engine, request_id: str) -> set[str]:
    finished = set()
    while request_id not in finished:
        finished |= {output.request_id for output in engine.step() if output.finished}
    return finished


def test_a_better_priority_request_preempts_and_finishes_first(make_llm):
    llm = make_llm("qwen3", scheduling_policy="priority", max_num_seqs=1)
    engine = llm.llm_engine
    alone = {p: llm.generate(p, PARAMS, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS[:2]}
    engine.add_request("low", engine.input_processor.process(PROMPTS[0], PARAMS), priority=5)
    for _ in range(3):
        engine.step()
    engine.add_request("high", engine.input_processor.process(PROMPTS[1], PARAMS), priority=0)
    finished = _run_until(engine, "high")
    assert "low" not in finished  # it waited, preempted, for the better one
    assert engine.scheduler.num_preemptions >= 1
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.outputs[0].token_ids
    assert outputs["low"] == alone[PROMPTS[0]]


def test_waiting_requests_start_in_priority_order(make_llm):
    llm = make_llm("qwen3", scheduling_policy="priority", max_num_seqs=1)
    engine = llm.llm_engine
    order = []
    for request_id, rank in (("c", 3), ("a", 1), ("b", 2), ("a2", 1)):
        engine.add_request(request_id, engine.input_processor.process(PROMPTS[0], PARAMS), priority=rank)
    while engine.has_unfinished_requests():
        order += [output.request_id for output in engine.step() if output.finished]
    assert order == ["a", "a2", "b", "c"]  # by priority, then arrival


def test_fcfs_refuses_a_priority_and_the_offline_list_reaches_the_engine(make_llm):
    llm = make_llm("qwen3")
    with pytest.raises(InvalidParameterError, match="scheduling_policy='priority'"):
        llm.generate(PROMPTS[0], PARAMS, use_tqdm=False, priority=[3])
    ranked = make_llm("qwen3", scheduling_policy="priority", max_num_seqs=1)
    outputs = ranked.generate(PROMPTS[:2], PARAMS, use_tqdm=False, priority=[2, 1])
    assert [len(o.outputs[0].token_ids) for o in outputs] == [24, 24]


@pytest.mark.asyncio(loop_scope="session")
async def test_the_server_takes_vllms_priority_field(tiny_model_dir):
    import aiohttp

    from tests.server.conftest import MODEL_NAME, live_server
    async with live_server(tiny_model_dir("qwen3"), scheduling_policy="priority") as live, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{live.url}/v1/completions",
                             json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "priority": -3}) as response:
            assert response.status == 200
    async with live_server(tiny_model_dir("qwen3")) as live, aiohttp.ClientSession() as http:
        async with http.post(f"{live.url}/v1/completions",
                             json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "priority": 1}) as response:
            assert response.status == 400 and (await response.json())["error"]["param"] == "priority"
