"""Grammar compiles off the loop in two lanes, under a deadline, shared by equal constraints and dropped
when nobody waits for them (compile_lanes.py). A compile here is a function that blocks until the test
releases it: what a slow xgrammar compile looks like from Python."""
from __future__ import annotations

import asyncio
import threading

import pytest

from asyncserve.engine.structured.compile_lanes import (MAX_ABANDONED, SMALL_BYTES, CompileLanes,
                                                       CompileTimeoutError)
from asyncserve.errors import InvalidParameterError, QueueFullError
from asyncserve.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Compiler:
    """compile(params): blocks while params.regex is held; records what started and what was kept."""

    def __init__(self):
        self.held: dict[str, threading.Event] = {}
        self.started: list[str] = []
        self.kept: list[str] = []
        self.lanes = CompileLanes(self.compile, lambda params, grammar: self.kept.append(grammar))

    def hold(self, regex: str) -> threading.Event:
        self.held[regex] = threading.Event()
        return self.held[regex]

    def compile(self, params):
        self.started.append(params.regex)
        if params.regex in self.held:
            self.held[params.regex].wait(10)
        if params.regex == "bad":
            raise InvalidParameterError("bad regex", "structured_outputs.regex")
        return f"grammar of {params.regex}"


def _small(regex: str) -> StructuredOutputsParams:
    return StructuredOutputsParams(regex=regex)


def _big(regex: str) -> StructuredOutputsParams:
    params = StructuredOutputsParams(regex=regex)
    params.__dict__["_key"] = ("regex", regex + " " * SMALL_BYTES, False, False)  # its size: the big lane
    return params


async def _until(condition) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


async def test_a_small_grammar_never_waits_behind_a_big_one():
    compiler = Compiler()
    release = compiler.hold("big")
    big = asyncio.ensure_future(compiler.lanes.compile(_big("big"), timeout=10))
    await _until(lambda: compiler.started == ["big"])
    assert await compiler.lanes.compile(_small("yes|no"), timeout=10) == "grammar of yes|no"
    assert not big.done()
    release.set()
    assert await big == "grammar of big" and compiler.kept == ["grammar of yes|no", "grammar of big"]


async def test_equal_constraints_share_one_compile_and_errors_reach_every_caller():
    compiler = Compiler()
    release = compiler.hold("a")
    results = asyncio.gather(*(compiler.lanes.compile(_small("a"), timeout=10) for _ in range(3)))
    await _until(lambda: compiler.started == ["a"])
    release.set()
    assert await results == ["grammar of a"] * 3 and compiler.started == ["a"]
    errors = await asyncio.gather(*(compiler.lanes.compile(_small("bad"), timeout=10) for _ in range(2)),
                                  return_exceptions=True)
    assert [str(error) for error in errors] == ["bad regex"] * 2 and "bad" not in compiler.kept


async def test_past_its_deadline_a_compile_is_a_400_its_lane_moves_on_and_its_result_is_dropped():
    compiler = Compiler()
    release = compiler.hold("slow")
    with pytest.raises(CompileTimeoutError, match="did not compile within 0.2 s") as caught:
        await compiler.lanes.compile(_small("slow"), timeout=0.2)
    assert caught.value.param == "structured_outputs"
    assert compiler.lanes.num_abandoned_running == 1
    assert await compiler.lanes.compile(_small("next"), timeout=10) == "grammar of next"  # not behind "slow"
    release.set()
    await _until(lambda: compiler.lanes.num_abandoned_running == 0)
    assert compiler.kept == ["grammar of next"]  # the abandoned compile's result is not cached


async def test_a_caller_that_leaves_abandons_its_compile_and_a_queued_one_never_runs():
    compiler = Compiler()
    release = compiler.hold("first")
    first = asyncio.ensure_future(compiler.lanes.compile(_small("first"), timeout=10))
    queued = asyncio.ensure_future(compiler.lanes.compile(_small("queued"), timeout=10))
    await _until(lambda: compiler.started == ["first"])
    queued.cancel()  # its client left before its compile started
    first.cancel()   # this one left while compiling
    await asyncio.gather(first, queued, return_exceptions=True)
    assert await compiler.lanes.compile(_small("after"), timeout=10) == "grammar of after"
    release.set()
    await _until(lambda: compiler.lanes.num_abandoned_running == 0)
    assert compiler.started == ["first", "after"] and compiler.kept == ["grammar of after"]


async def test_abandoned_compiles_are_bounded_then_new_ones_are_refused_until_one_ends():
    compiler = Compiler()
    releases = [compiler.hold(f"slow{i}") for i in range(MAX_ABANDONED)]
    for i in range(MAX_ABANDONED):
        with pytest.raises(CompileTimeoutError):
            await compiler.lanes.compile(_small(f"slow{i}"), timeout=0.05)
    with pytest.raises(QueueFullError, match="busy"):
        await compiler.lanes.compile(_small("x"), timeout=10)
    releases[0].set()
    await _until(lambda: compiler.lanes.num_abandoned_running == MAX_ABANDONED - 1)
    assert await compiler.lanes.compile(_small("x"), timeout=10) == "grammar of x"
    for release in releases:
        release.set()


async def test_a_compile_that_could_not_start_before_the_deadline_is_a_503_not_a_400():
    compiler = Compiler()
    release = compiler.hold("long")
    running = asyncio.ensure_future(compiler.lanes.compile(_small("long"), timeout=10))
    await _until(lambda: compiler.started == ["long"])
    with pytest.raises(QueueFullError, match="busy for 0.1 s"):
        await compiler.lanes.compile(_small("waiting"), timeout=0.1)
    release.set()
    assert await running == "grammar of long" and compiler.started == ["long"]
