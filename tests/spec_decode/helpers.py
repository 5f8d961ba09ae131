"""Shared pieces of the speculative decoding tests: the config, test proposers, counters, runs."""
from __future__ import annotations

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


class OracleProposer:
    """Proposes the true continuation, computed beforehand without speculation: every draft is right."""

    def __init__(self, expected: list[list[int]], num_tokens: int = 4, strict: bool = True):
        self.expected = expected  # prompt + output of each request
        self.num_tokens = num_tokens
        self.strict = strict  # a sequence off every expected path fails the test (else: no drafts)

    def continuation(self, token_ids: list[int]) -> list[int]:
        for full in self.expected:
            if full[:len(token_ids)] == token_ids:
                return full[len(token_ids):]
        if self.strict:
            raise AssertionError("a sequence left the expected outputs")
        return []

    def propose(self, history, token_ids: list[int], max_tokens: int) -> list[int]:
        return self.continuation(token_ids)[:min(self.num_tokens, max_tokens)]


class WrongProposer(OracleProposer):
    """Proposes tokens that are never the target's next one: every draft is rejected."""

    def propose(self, history, token_ids: list[int], max_tokens: int) -> list[int]:
        following = self.continuation(token_ids)
        if not following or max_tokens <= 0:
            return []
        return [(following[0] + 1) % 64] * min(self.num_tokens, max_tokens)


def counters(engine) -> dict:
    return engine.speculator.stats.as_dict()


def generate_ids(llm, prompts, params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def full_sequences(llm, prompts, params) -> list[list[int]]:
    """prompt + output token ids of each prompt, from `llm` (without speculation)."""
    return [list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
            for o in llm.generate(prompts, params, use_tqdm=False)]


def record_proposals(drafter) -> list[list[int]]:
    """Each step's proposals from now on, flat, as the drafter hands them to the verify step."""
    steps, run = [], drafter.run

    def recording_run(batch):
        proposals = run(batch)
        if proposals is not None:
            steps.append(proposals.tolist())
        return proposals

    drafter.run = recording_run
    return steps


def draft_model_config(path: str, num_tokens: int = 4, **extra) -> dict:
    """vLLM's draft-model spelling, the draft at `path`."""
    return {"method": "draft_model", "model": path, "num_speculative_tokens": num_tokens, **extra}


def two_sample_chi_square(first: list, second: list) -> tuple[float, int]:
    """(statistic, degrees of freedom) of the test that two equally large samples share one distribution."""
    from collections import Counter
    assert len(first) == len(second)
    a, b = Counter(first), Counter(second)
    keys = set(a) | set(b)
    return sum((a[k] - b[k]) ** 2 / (a[k] + b[k]) for k in keys), len(keys) - 1
