"""`use_beam_search` on the OpenAI endpoints (a vLLM extra): beams rendered as ordinary choices."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from asyncserve.engine.beam_search import check_beam_width
from asyncserve.outputs import CompletionOutput, RequestOutput
from asyncserve.sampling_params import BeamSearchParams
from asyncserve.server.errors import bad_request
from asyncserve.server.generation import Prompt


@dataclass
class BeamGeneration:
    """What the response builders read of a generation: its prompts."""

    prompts: list[Prompt]


def check_beam_request(params, stream: bool, structured_field: str | None = None,
                       max_logprobs: int | None = None) -> None:
    if max_logprobs is not None:  # the beam width, not logprobs the request never asked for
        check_beam_width(max(params.n, params.best_of), max_logprobs,
                         "best_of" if params.best_of > params.n else "n")
    if structured_field is not None:
        raise bad_request(f"'{structured_field}' (structured outputs) is not supported with 'use_beam_search': "
                          "sample with n > 1 instead.", structured_field)
    if stream:
        raise bad_request("'use_beam_search' cannot be streamed: the best beams are only known at the end.",
                          "use_beam_search")
    if params.logprobs is not None or params.prompt_logprobs is not None:
        raise bad_request("Logprobs are not returned with 'use_beam_search'.", "logprobs")
    for name in ("allowed_token_ids", "bad_words"):
        if getattr(params, name):
            raise bad_request(f"'{name}' is not supported with 'use_beam_search'.", name)


async def beam_search_outputs(engine, prompts: list[Prompt], params, length_penalty: float
                              ) -> dict[int, RequestOutput]:
    """Runs one beam search per prompt (beam width = max(n, best_of)); the n best beams become choices."""
    width = max(params.n, params.best_of)

    def beam_params(prompt: Prompt) -> BeamSearchParams:
        max_tokens = params.max_tokens or engine.max_model_len - len(prompt.token_ids)
        return BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=params.ignore_eos,
                                length_penalty=length_penalty)

    results = await asyncio.gather(*(engine.beam_search({"prompt_token_ids": prompt.token_ids},
                                                        beam_params(prompt)) for prompt in prompts))
    latest = {}
    for index, (prompt, result) in enumerate(zip(prompts, results)):
        num_prompt = len(prompt.token_ids)
        choices = [CompletionOutput(index=i, text=beam.text or "", token_ids=beam.tokens[num_prompt:],
                                    cumulative_logprob=beam.cum_logprob,
                                    finish_reason="stop" if beam.finished else "length")
                   for i, beam in enumerate(result.sequences[:params.n])]
        latest[index] = RequestOutput(request_id=f"beam-{index}", prompt=prompt.text,
                                      prompt_token_ids=prompt.token_ids, outputs=choices, finished=True)
    return latest
