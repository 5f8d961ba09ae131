"""The runner's persistent input batch follows the step messages' diffs."""
from __future__ import annotations

import torch

from asyncserve.runner.input_batch import InputBatch
from asyncserve.runner.step import NewSequence, ScheduledSequence, StepMessage
from asyncserve.sampling_params import SamplingParams


def _entry(seq_id, start, num_new, blocks=(), replace=False, num_samples=1):
    return ScheduledSequence(seq_id, start, num_new, list(blocks), replace, num_samples)


def test_diffs_rebuild_tokens_and_block_tables():
    batch = InputBatch(torch.device("cpu"))
    params = SamplingParams(max_tokens=8)
    step = batch.apply(StepMessage([_entry(5, 0, 3, blocks=[9, 4])],
                                   new_seqs=[NewSequence(5, [11, 12, 13], 3, params)]))
    (state,) = step.seqs
    assert (state.new_token_ids, state.block_table, state.start_position) == ([11, 12, 13], [9, 4], 0)
    state.num_unread = 1  # what the runner does when it launches a step that samples
    step = batch.apply(StepMessage([_entry(5, 3, 1, blocks=[2])]))
    # The token sampled last step is not read back yet: a placeholder the runner fills on the device.
    assert (state.new_token_ids, step.unread_inputs, state.block_table) == ([0], [0], [9, 4, 2])
    assert state.num_output_tokens == 1
    batch.fold([5], [77])
    batch.refresh_inputs(step)
    assert (state.new_token_ids, step.unread_inputs) == ([77], [])
    assert (state.prompt_token_ids, state.output_token_ids) == ([11, 12, 13], [77])
    step = batch.apply(StepMessage([_entry(5, 0, 4, blocks=[1, 3], replace=True)]))
    assert (state.new_token_ids, state.block_table, step.unread_inputs) == ([11, 12, 13, 77], [1, 3], [])
    batch.apply(StepMessage([], finished_seq_ids=[5]))
    assert batch.states == {}


def test_seeded_forks_continue_their_samples_generator():
    batch = InputBatch(torch.device("cpu"))
    params = SamplingParams(temperature=1.0, seed=3, n=3)
    batch.apply(StepMessage([_entry(1, 0, 2, blocks=[0], num_samples=3)],
                            new_seqs=[NewSequence(1, [5, 6], 2, params)]))
    parent = batch.states[1]
    assert len(parent.generators) == 3
    expected = [torch.Generator().manual_seed(3 + i).initial_seed() for i in range(3)]
    assert [g.initial_seed() for g in parent.generators] == expected
    # The parent finishes in the same message that announces its forks: they still find its streams.
    batch.apply(StepMessage([], new_seqs=[NewSequence(2, [5, 6, 8], 2, params, index=1, fork_parent=1),
                                          NewSequence(3, [5, 6, 9], 2, params, index=2, fork_parent=1)],
                            finished_seq_ids=[1]))
    assert batch.states[2].generators == [parent.generators[1]]
    assert batch.states[3].generators == [parent.generators[2]]
    assert 1 not in batch.states
