"""Beam search over the engine: every live beam is a one-token request; the prefix cache shares
the beams' common blocks, so a step recomputes at most each beam's last partial block.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

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


def _score(beam: BeamSearchSequence, num_prompt_tokens: int, length_penalty: float) -> float:
    generated = max(1, len(beam.tokens) - num_prompt_tokens)
    return beam.cum_logprob / (generated ** length_penalty)


def beam_search(engine, prompts: list, params: BeamSearchParams) -> list[BeamSearchOutput]:
    width = params.beam_width
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * width, ignore_eos=True)
    eos_ids = set() if params.ignore_eos else set(engine.eos_token_ids())
    prompt_ids = [engine.tokenize_prompt(prompt)[1] for prompt in prompts]
    running = [[BeamSearchSequence(list(ids))] for ids in prompt_ids]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    counter = itertools.count()
    for _ in range(params.max_tokens):
        requests = {}
        for index, beams in enumerate(running):
            for beam in beams:
                request_id = f"beam-{next(counter)}"
                engine.add_request(request_id, {"prompt_token_ids": beam.tokens}, step_params)
                requests[request_id] = (index, beam)
        if not requests:
            break
        candidates: list[list[tuple[float, BeamSearchSequence, int, float]]] = [[] for _ in prompts]
        while engine.has_unfinished_requests():
            for output in engine.step():
                if not output.finished or output.request_id not in requests:
                    continue
                index, beam = requests[output.request_id]
                position = output.outputs[0].logprobs[0]
                top = sorted(position.items(), key=lambda item: item[1].logprob, reverse=True)[:2 * width]
                candidates[index].extend((beam.cum_logprob + lp.logprob, beam, token, lp.logprob)
                                         for token, lp in top)
        for index in range(len(prompts)):
            ranked = sorted(candidates[index], key=lambda c: c[0], reverse=True)[:2 * width]
            next_beams = []
            for rank, (score, beam, token, logprob) in enumerate(ranked):
                child = BeamSearchSequence(beam.tokens + [token], score, beam.logprobs + [logprob])
                if token in eos_ids:
                    if rank < width:  # as transformers: an EOS outside the top beams is not a hypothesis
                        child.finished = True
                        completed[index].append(child)
                    continue
                next_beams.append(child)
                if len(next_beams) == width:
                    break
            running[index] = next_beams if len(completed[index]) < width else []
    outputs = []
    for index, ids in enumerate(prompt_ids):
        pool = completed[index] + running[index]
        pool.sort(key=lambda b: _score(b, len(ids), params.length_penalty), reverse=True)
        best = pool[:width]
        if engine.tokenizer is not None:
            for beam in best:
                beam.text = engine.tokenizer.decode(beam.tokens[len(ids):], skip_special_tokens=True)
        outputs.append(BeamSearchOutput(best))
    return outputs
