"""A launched step whose results are still on their way to the host.

`launch` queues the step's device work and asynchronous copies of its results into host memory, then
returns at once; `result()` waits for them. Meanwhile the engine processes the previous step and the
next one is launched behind this one, so the device never waits for the host.
"""
from __future__ import annotations

import torch

from asyncserve.runner.step import SequenceResult, StepOutput


def to_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """An asynchronous copy into pinned memory on the GPU; the tensor itself on the CPU."""
    if tensor is None or tensor.device.type == "cpu":
        return tensor
    return tensor.to("cpu", non_blocking=True)


class HostCopy:
    """An asynchronous copy of a small device tensor to the host, readable as a list once it landed:
    waiting for it waits for the work queued before it, not for what was queued after."""

    def __init__(self, tensor: torch.Tensor):
        self._host = to_host(tensor)
        self._event = None
        if tensor.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class PendingStep:
    is_verify = False  # a speculative decoding step (VerifiedStep)

    def __init__(self, seqs: list, token_ids: torch.Tensor | None, sampled_rows: dict[int, int],
                 logprobs=None, prompt_logprobs=None, prompt_row_counts: list[int] | None = None,
                 deferred=None):
        # What result() needs of each scheduled sequence, taken now: its state changes after this.
        self.seq_ids = [seq.seq_id for seq in seqs]
        self.num_samples = [seq.num_samples for seq in seqs]
        self.num_drafts = [len(seq.draft_token_ids) for seq in seqs]  # speculative decoding: verified drafts
        self.num_logprobs = [seq.params.logprobs or 0 for seq in seqs]
        self.num_prompt_logprobs = [seq.prompt_logprobs or 0 for seq in seqs]
        self.sampled_rows = sampled_rows     # seq_id -> its own row in token_ids
        self._host_prompt = tuple(to_host(t) for t in prompt_logprobs) if prompt_logprobs is not None else None
        self._prompt_row_counts = prompt_row_counts or [0] * len(seqs)
        # (logits, SamplingTensors) of a step with grammar-constrained rows: sampled by `sampled()` once
        # the engine has the grammar masks, which need the previous step's tokens.
        self.deferred = deferred
        self.device_token_ids = None         # [S] on the device: the next step's unread inputs
        self._host_token_ids = self._host_logprobs = self._event = None
        self.token_ids: list[int] | None = None  # set by result(): what the runner folds in later
        self._output: StepOutput | None = None
        if deferred is None:
            self.sampled(token_ids, logprobs)

    @property
    def needs_grammar_masks(self) -> bool:
        return self.deferred is not None

    def sampled(self, token_ids: torch.Tensor | None, logprobs=None) -> None:
        """The step's samples are queued: start their copies to the host."""
        self.deferred = None
        self.device_token_ids = token_ids
        self._host_token_ids = to_host(token_ids)
        self._host_logprobs = tuple(to_host(t) for t in logprobs) if logprobs is not None else None
        if token_ids is not None and token_ids.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def result(self) -> StepOutput:
        if self._output is not None:
            return self._output
        if self.deferred is not None:
            raise RuntimeError("This step samples under grammar masks: the engine must hand them to "
                               "executor.sample() before reading its result.")
        if self._event is not None:
            self._event.synchronize()
        token_ids = self._host_token_ids.tolist() if self._host_token_ids is not None else []
        if self._host_logprobs is not None:
            values, ids, ranks = (t.tolist() for t in self._host_logprobs)
        if self._host_prompt is not None:
            chosen, prompt_ranks, top_values, top_ids = (t.tolist() for t in self._host_prompt)
        results = []
        row = prompt_row = 0
        for num_samples, num_top, num_prompt_top, num_prompt_rows in zip(
                self.num_samples, self.num_logprobs, self.num_prompt_logprobs, self._prompt_row_counts):
            result = SequenceResult(token_ids=token_ids[row:row + num_samples])
            if self._host_logprobs is not None and num_samples:
                result.logprobs = [
                    (values[r][0], ranks[r], list(zip(ids[r][1:1 + num_top], values[r][1:1 + num_top])))
                    for r in range(row, row + num_samples)]
            if num_prompt_rows:
                result.prompt_logprobs = [
                    (chosen[r], prompt_ranks[r],
                     list(zip(top_ids[r][:num_prompt_top], top_values[r][:num_prompt_top])))
                    for r in range(prompt_row, prompt_row + num_prompt_rows)]
                prompt_row += num_prompt_rows
            row += num_samples
            results.append(result)
        self.token_ids = token_ids
        self._output = StepOutput(results)
        return self._output

    def own_tokens(self) -> tuple[list[int], list[int]]:
        """(seq_ids, each one's own sampled token) once result() has run: what the input batch folds."""
        seq_ids = list(self.sampled_rows)
        return seq_ids, [self.token_ids[row] for row in self.sampled_rows.values()]


class VerifiedStep(PendingStep):
    """A speculative step on its way to the host: token_ids is the rejection sampler's [G, W] grid (a
    group's emitted tokens, then -1), logprobs one row per verify row. A sequence with drafts gets its run
    of emitted tokens; any other its samples, as in a plain step."""

    is_verify = True

    def __init__(self, seqs: list, grid: torch.Tensor | None, group_starts: list[int],
                 sampled_rows: dict[int, int], logprobs=None, prompt_logprobs=None,
                 prompt_row_counts: list[int] | None = None, deferred=None, proposals: HostCopy | None = None):
        self.group_starts = group_starts  # group -> its first row (of logprobs)
        self._runs: list[list[int]] | None = None
        # A draft model's proposals on their way to the host: the grammar masks of a deferred step need them.
        self._proposals = proposals
        super().__init__(seqs, grid, sampled_rows, logprobs, prompt_logprobs, prompt_row_counts, deferred)
        self.device_token_ids = None  # nothing feeds a later step from the device: the engine reads it first

    def sampled(self, token_ids: torch.Tensor | None, logprobs=None) -> None:
        super().sampled(token_ids, logprobs)
        self.device_token_ids = None

    def proposals(self) -> list[int]:
        """The draft model's proposals, flat in batch order (each verifying sequence's drafts in turn)."""
        return self._proposals.tolist()

    def result(self) -> StepOutput:
        if self._output is not None:
            return self._output
        if self.deferred is not None:
            raise RuntimeError("This step verifies under grammar masks: the engine must hand them to "
                               "executor.sample() before reading its result.")
        if self._event is not None:
            self._event.synchronize()
        grid = self._host_token_ids.tolist()
        runs = [row[:row.index(-1)] if -1 in row else row for row in grid]
        if self._host_logprobs is not None:
            values, ids, ranks = (t.tolist() for t in self._host_logprobs)
        if self._host_prompt is not None:
            chosen, prompt_ranks, top_values, top_ids = (t.tolist() for t in self._host_prompt)
        results = []
        group = prompt_row = 0
        for num_samples, num_drafts, num_top, num_prompt_top, num_prompt_rows in zip(
                self.num_samples, self.num_drafts, self.num_logprobs, self.num_prompt_logprobs,
                self._prompt_row_counts):
            if num_drafts:
                result = SequenceResult(token_ids=runs[group], num_draft_tokens=num_drafts)
                rows = range(self.group_starts[group], self.group_starts[group] + len(runs[group]))
                group += 1
            else:
                result = SequenceResult(token_ids=[runs[g][0] for g in range(group, group + num_samples)])
                rows = [self.group_starts[g] for g in range(group, group + num_samples)]
                group += num_samples
            if self._host_logprobs is not None and rows:
                result.logprobs = [(values[r][0], ranks[r], list(zip(ids[r][1:1 + num_top],
                                                                     values[r][1:1 + num_top]))) for r in rows]
            if num_prompt_rows:
                result.prompt_logprobs = [
                    (chosen[r], prompt_ranks[r],
                     list(zip(top_ids[r][:num_prompt_top], top_values[r][:num_prompt_top])))
                    for r in range(prompt_row, prompt_row + num_prompt_rows)]
                prompt_row += num_prompt_rows
            results.append(result)
        self._runs = runs
        self.token_ids = grid
        self._output = StepOutput(results)
        return self._output

    def own_runs(self) -> tuple[list[int], list[list[int]]]:
        """(seq_ids, each one's own emitted tokens) once result() has run: what the input batch folds."""
        seq_ids = list(self.sampled_rows)
        return seq_ids, [self._runs[group] for group in self.sampled_rows.values()]
