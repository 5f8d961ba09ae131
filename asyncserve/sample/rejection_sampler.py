"""Speculative decoding's verify rule: which proposed tokens the target model keeps, and the token after them.

The drafts are deterministic (n-gram lookup): the draft distribution q is a point mass on the proposed token
x, so the standard rule (Leviathan et al., Chen et al.) becomes: accept x with probability p(x), p being the
target's processed distribution at that position (the one the plain sampler would draw from); on rejection
draw from max(0, p - q) renormalized, which is p without x; after d accepted drafts draw a bonus token from
p at the last position. Each emitted token is then distributed exactly as plain sampling's. Greedy rows
reduce to: keep the drafts that equal the argmax, then the argmax.
All rows of a step at once, with no host sync: the host reads only the final [G, W] grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncserve.sample.sampler import Sampler, SamplerOutput, SamplingTensors, exponential_noise, logprobs_of


@dataclass
class VerifyLayout:
    """Where each group's rows lie. A group is one sample stream: a sequence with d drafts owns d + 1
    consecutive rows (row j scores draft j; the last row gives the bonus token); one without drafts owns
    one row (d = 0: plain sampling)."""

    draft_token_ids: torch.Tensor   # [R] int64: the draft row j checks, -1 on each group's last row
    group_starts: torch.Tensor      # [G] int64: the group's first row
    num_drafts: torch.Tensor        # [G] int64
    max_num_drafts: int             # host int: the grid is max_num_drafts + 1 wide
    rows_with_drafts: frozenset[int] = frozenset()  # host: the rows that check a draft
    first_rows: tuple[int, ...] = ()  # host: group_starts, for reading the results back


@dataclass
class VerifyOutput:
    token_ids: torch.Tensor         # [G, W] int64: each group's emitted tokens, then -1
    num_accepted: torch.Tensor      # [G] int64: drafts kept (the group emits num_accepted + 1 tokens)
    # Per row (as SamplerOutput's, for the token that row emitted; rows past a group's emitted ones are junk).
    logprobs: SamplerOutput | None = None


def _uniform(num_rows: int, generators: list, rows_with_drafts: frozenset[int],
             device: torch.device) -> torch.Tensor:
    """A U[0, 1) draw per row; seeded rows that check a draft from their own generator, in row order
    (reproducible). Rows without a draft draw none: a seeded sample that did not speculate this step
    then takes the same draws, and tokens, as the plain sampler would give it."""
    uniform = torch.empty(num_rows, dtype=torch.float32, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None and i in rows_with_drafts]
    if len(seeded) < len(generators):
        uniform.uniform_()
    for row in seeded:
        uniform[row:row + 1].uniform_(generator=generators[row])
    return uniform


class RejectionSampler(torch.nn.Module):
    def forward(self, logits: torch.Tensor, t: SamplingTensors, layout: VerifyLayout) -> VerifyOutput:
        """logits [R, V] and sampling settings of R rows (a group's rows share its settings and generator)."""
        processed = Sampler.process(logits, t)
        drafts = layout.draft_token_ids
        has_draft = drafts >= 0
        safe_drafts = drafts.clamp(min=0)
        greedy_accepted = has_draft & (processed.greedy == drafts)
        if processed.probs is None:
            accepted, recovered = greedy_accepted, processed.greedy
        else:
            probs = processed.probs
            uniform = _uniform(probs.shape[0], t.generators, layout.rows_with_drafts, probs.device)
            draft_probs = probs.gather(1, safe_drafts[:, None])[:, 0]
            sampled_accepted = has_draft & (uniform < draft_probs)
            # p without the draft (q is one-hot); the bonus row keeps p whole. Unnormalized is fine: the
            # exponential race argmax(w / E) draws proportionally to w.
            kept = torch.where(has_draft, torch.zeros_like(draft_probs), draft_probs)
            residual = probs.scatter(1, safe_drafts[:, None], kept[:, None])
            sampled = (residual / exponential_noise(residual, t.generators)).argmax(dim=-1)
            accepted = torch.where(processed.is_greedy, greedy_accepted, sampled_accepted)
            recovered = torch.where(processed.is_greedy, processed.greedy, sampled)
        width = layout.max_num_drafts + 1
        offsets = torch.arange(width, device=logits.device)[None, :]                 # [1, W]
        in_group = offsets <= layout.num_drafts[:, None]                             # [G, W]
        rows = torch.where(in_group, layout.group_starts[:, None] + offsets, 0)       # [G, W]
        kept_drafts = accepted[rows] & in_group
        num_accepted = kept_drafts.to(torch.int64).cumprod(dim=1).sum(dim=1)          # [G]
        token_ids = torch.where(offsets < num_accepted[:, None], safe_drafts[rows],
                                torch.where(offsets == num_accepted[:, None], recovered[rows], -1))
        out = VerifyOutput(token_ids=token_ids, num_accepted=num_accepted)
        if processed.raw_logprobs is not None:
            # The token each row emitted, scattered back to rows (rows past the emitted ones get 0).
            num_rows = drafts.shape[0]
            emitted = torch.zeros(num_rows + 1, dtype=torch.int64, device=logits.device)
            targets = torch.where(in_group & (token_ids >= 0), rows, num_rows)
            emitted.scatter_(0, targets.flatten(), token_ids.clamp(min=0).flatten())
            emitted = emitted[:num_rows]
            out.logprobs = logprobs_of(processed.raw_logprobs, emitted, t.max_num_logprobs,
                                       SamplerOutput(token_ids=emitted))
        return out
