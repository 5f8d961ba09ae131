"""Batched sampling: penalties, temperature, top-k/top-p/min-p, per-row seeds, logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncserve.kernels import apply_token_bitmask


@dataclass
class SamplingTensors:
    """Per-row sampling settings of one step, built once per step by the runner."""

    temperature: torch.Tensor | None     # [S] float32, 0 marks greedy rows; None when all are greedy
    top_p: torch.Tensor | None           # [S] float32, or None when no row uses it
    top_k: torch.Tensor | None           # [S] int64 (vocab size = off), or None
    min_p: torch.Tensor | None           # [S] float32, or None
    generators: list[torch.Generator | None]  # per row; None rows share the global RNG
    all_greedy: bool
    # Penalties (None when no row has any).
    presence_penalty: torch.Tensor | None = None    # [S]
    frequency_penalty: torch.Tensor | None = None   # [S]
    repetition_penalty: torch.Tensor | None = None  # [S]
    output_tokens: torch.Tensor | None = None       # [S, L] padded with vocab_size
    prompt_tokens: torch.Tensor | None = None       # [S, L'] padded with vocab_size
    # Additive bias per row (logit_bias, and -inf on eos/stop ids before min_tokens).
    logit_bias: torch.Tensor | None = None          # [S, V]
    max_num_logprobs: int = -1                      # -1: no row wants logprobs
    # Grammar masks (structured outputs): bitmask_rows[i] may sample only the tokens token_bitmask[i] allows.
    token_bitmask: torch.Tensor | None = None       # [R, ceil(V / 32)] int32, packed as xgrammar fills it
    bitmask_rows: torch.Tensor | None = None        # [R] int64
    # Argmax of the raw logits is the answer: no bias, penalty or logprob. The runner may then skip the
    # sampler (CUDA graphs take the argmax inside the graph). Set only by the runner's input builder.
    plain_greedy: bool = False


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                 # [S] int64
    logprobs: torch.Tensor | None = None    # [S, 1 + K]: chosen token, then the top K
    logprob_token_ids: torch.Tensor | None = None  # [S, 1 + K]
    ranks: torch.Tensor | None = None       # [S]: rank of the chosen token (1 = most likely)


def _apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    num_rows, vocab = logits.shape
    if t.repetition_penalty is not None:
        seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, t.output_tokens, True)
        seen.scatter_(1, t.prompt_tokens, True)
        seen = seen[:, :vocab]
        penalty = t.repetition_penalty[:, None].expand_as(logits)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled, logits)
    if t.frequency_penalty is not None:
        counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
        counts.scatter_add_(1, t.output_tokens, torch.ones_like(t.output_tokens, dtype=logits.dtype))
        counts = counts[:, :vocab]
        logits = logits - t.frequency_penalty[:, None] * counts
        logits = logits - t.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def _apply_top_k_top_p_min_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    if t.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * t.min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if t.top_k is None and t.top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if t.top_k is not None:
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop |= ranks >= t.top_k[:, None]
    if t.top_p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= t.top_p[:, None]
        drop[:, 0] = False  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def exponential_noise(like: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Exp(1) noise of `like`'s shape: seeded rows from their own generator, the rest in one call."""
    noise = torch.empty_like(like)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        noise.exponential_()
    for row in seeded:
        noise[row].exponential_(generator=generators[row])
    return noise


def _random_sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Exponential race: argmax(p / E) with E ~ Exp(1) draws exactly from p, one draw per row."""
    return (probs / exponential_noise(probs, generators)).argmax(dim=-1)


@dataclass
class ProcessedLogits:
    """One step's logits after the request's processing, the distribution the sampler draws from."""

    greedy: torch.Tensor                 # [S] argmax after bias and penalties
    probs: torch.Tensor | None           # [S, V] after temperature/top-k/top-p/min-p; None when all greedy
    is_greedy: torch.Tensor | None       # [S] bool; None when all greedy
    raw_logprobs: torch.Tensor | None    # [S, V] before any processing (what logprobs report), if wanted


def logprobs_of(raw_logprobs: torch.Tensor, token_ids: torch.Tensor, max_num_logprobs: int,
                out: SamplerOutput) -> SamplerOutput:
    """Fills `out` with the chosen tokens' logprobs and ranks, and the top `max_num_logprobs`."""
    chosen = raw_logprobs.gather(1, token_ids[:, None])
    out.ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
    if max_num_logprobs > 0:
        top_values, top_ids = raw_logprobs.topk(max_num_logprobs, dim=-1)
        out.logprobs = torch.cat([chosen, top_values], dim=1)
        out.logprob_token_ids = torch.cat([token_ids[:, None], top_ids], dim=1)
    else:
        out.logprobs, out.logprob_token_ids = chosen, token_ids[:, None]
    return out


class Sampler(torch.nn.Module):
    @staticmethod
    def process(logits: torch.Tensor, t: SamplingTensors) -> ProcessedLogits:
        """Grammar masks, bias, penalties, then temperature and truncation: what each row samples from."""
        logits = logits.float()
        if t.token_bitmask is not None:  # one kernel for every constrained row, in place
            apply_token_bitmask(logits, t.token_bitmask, t.bitmask_rows)
        raw_logprobs = logits.log_softmax(dim=-1) if t.max_num_logprobs >= 0 else None
        if t.logit_bias is not None:
            logits = logits + t.logit_bias
        if t.output_tokens is not None:
            logits = _apply_penalties(logits, t)
        greedy = logits.argmax(dim=-1)
        if t.all_greedy:
            return ProcessedLogits(greedy, None, None, raw_logprobs)
        is_greedy = t.temperature < 1e-5
        temperature = torch.where(is_greedy, torch.ones_like(t.temperature), t.temperature)
        scaled = _apply_top_k_top_p_min_p(logits / temperature[:, None], t)
        return ProcessedLogits(greedy, scaled.softmax(dim=-1), is_greedy, raw_logprobs)

    def forward(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        processed = self.process(logits, t)
        if processed.probs is None:
            token_ids = processed.greedy
        else:
            token_ids = torch.where(processed.is_greedy, processed.greedy,
                                    _random_sample(processed.probs, t.generators))
        out = SamplerOutput(token_ids=token_ids)
        if processed.raw_logprobs is not None:
            logprobs_of(processed.raw_logprobs, token_ids, t.max_num_logprobs, out)
        return out
