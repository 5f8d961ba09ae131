"""Beam search over the engine: every live beam is a one-token request; the prefix cache shares
the beams' common blocks, so a step recomputes at most each beam's last partial block.

`BeamState` holds one prompt's beams and picks the next ones; the offline (`beam_search`) and the
async (`beam_search_async`) drivers only differ in how they run a step's one-token requests.
"""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from asyncserve.errors import InvalidParameterError
from asyncserve.outputs import RequestOutput
from asyncserve.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    tokens: list[int]                 # prompt + generated
    cum_logprob: float = 0.0
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None
    finished: bool = False


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


class BeamState:
    """One prompt's running beams and finished hypotheses, chosen as transformers' beam search does."""

    def __init__(self, prompt_ids: list[int], params: BeamSearchParams, eos_ids: set[int]):
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.eos_ids = eos_ids
        self.running = [BeamSearchSequence(list(prompt_ids))]
        self.completed: list[BeamSearchSequence] = []

    def step_params(self) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * self.params.beam_width,
                              ignore_eos=True)

    def advance(self, outputs: list[RequestOutput]) -> None:
        """`outputs[i]` is the one-token output for `running[i]`; keeps the best beam_width continuations."""
        width = self.params.beam_width
        candidates = []
        for beam, output in zip(self.running, outputs):
            top = sorted(output.outputs[0].logprobs[0].items(), key=lambda item: item[1].logprob,
                         reverse=True)[:2 * width]
            candidates.extend((beam.cum_logprob + lp.logprob, beam, token, lp.logprob) for token, lp in top)
        candidates.sort(key=lambda c: c[0], reverse=True)
        next_beams = []
        for rank, (score, beam, token, logprob) in enumerate(candidates[:2 * width]):
            child = BeamSearchSequence(beam.tokens + [token], score, beam.logprobs + [logprob])
            if token in self.eos_ids:
                if rank < width:  # as transformers: an EOS outside the top beams is not a hypothesis
                    child.finished = True
                    self.completed.append(child)
                continue
            next_beams.append(child)
            if len(next_beams) == width:
                break
        self.running = next_beams if len(self.completed) < width else []

    def result(self, tokenizer) -> BeamSearchOutput:
        def score(beam):
            generated = max(1, len(beam.tokens) - self.num_prompt_tokens)
            return beam.cum_logprob / (generated ** self.params.length_penalty)
        best = sorted(self.completed + self.running, key=score, reverse=True)[:self.params.beam_width]
        if tokenizer is not None:
            for beam in best:
                beam.text = tokenizer.decode(beam.tokens[self.num_prompt_tokens:], skip_special_tokens=True)
        return BeamSearchOutput(best)


def check_beam_width(width: int, max_logprobs: int, param: str = "beam_width") -> None:
    """Each step ranks 2 x width candidates per beam, read as logprobs: more than max_logprobs is refused
    naming the beam width, not the logprobs the caller never asked for."""
    if 2 * width > max_logprobs:
        raise InvalidParameterError(
            f"Beam search with {param}={width} ranks the {2 * width} most likely next tokens of each beam "
            f"(twice the beam width), but this server reads at most max_logprobs={max_logprobs} per token "
            f"(--max-logprobs): use a beam width of at most {max_logprobs // 2}, or start the server with "
            f"--max-logprobs {2 * width}.", param)


def _eos_ids(engine, params: BeamSearchParams) -> set[int]:
    return set() if params.ignore_eos else set(engine.eos_token_ids())


def beam_search(engine, prompts: list, params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Offline: drives an LLMEngine's steps until every beam of every prompt has its next token."""
    check_beam_width(params.beam_width, engine.model_config.max_logprobs)
    eos_ids = _eos_ids(engine, params)
    states = [BeamState(engine.input_processor.tokenize(prompt)[1], params, eos_ids) for prompt in prompts]
    counter = itertools.count()
    for _ in range(params.max_tokens):
        requests = {}
        for state in states:
            for beam in state.running:
                request_id = f"beam-{next(counter)}"
                processed = engine.input_processor.process({"prompt_token_ids": beam.tokens}, state.step_params())
                engine.add_request(request_id, processed)
                requests[request_id] = state
        if not requests:
            break
        finished: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished and output.request_id in requests:
                    finished[output.request_id] = output
        for state in states:
            ids = [request_id for request_id, owner in requests.items() if owner is state]
            if ids:
                state.advance([finished[request_id] for request_id in ids])
    return [state.result(engine.tokenizer) for state in states]


async def beam_search_async(engine, prompt_ids: list[int], params: BeamSearchParams) -> BeamSearchOutput:
    """On an AsyncEngine: each step's beams run as concurrent one-token requests beside other traffic."""
    check_beam_width(params.beam_width, engine.max_logprobs)
    state = BeamState(prompt_ids, params, _eos_ids(engine, params))

    async def next_token(beam: BeamSearchSequence) -> RequestOutput:
        last = None
        async for output in engine.generate({"prompt_token_ids": beam.tokens}, state.step_params()):
            last = output
        return last

    for _ in range(params.max_tokens):
        if not state.running:
            break
        state.advance(await asyncio.gather(*(next_token(beam) for beam in state.running)))
    return state.result(engine.tokenizer)
