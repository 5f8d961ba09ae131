"""Hybrid models' state slots in the scheduler, without a model: a slot per running sequence, taken at
admission, kept for forks, copied to them after the prompt's step, freed at finish and on recompute,
moved to host slots with a swap. Pure Python, like the block pool it sits beside."""
from __future__ import annotations

from asyncserve.config.scheduler import SchedulerConfig
from asyncserve.engine.block_pool import BlockPool
from asyncserve.engine.kv_cache_manager import KVCacheManager
from asyncserve.engine.scheduler import Scheduler
from asyncserve.engine.sequence import Request, Sequence, SequenceStatus
from asyncserve.engine.state_slots import StateSlotPool
from asyncserve.sampling_params import SamplingParams

BLOCK = 4


def _scheduler(num_slots=4, num_host_slots=0, num_blocks=64, budget=16, max_num_seqs=8, num_host_blocks=0,
               preemption_mode="recompute") -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, enable_caching=False), BLOCK, num_host_blocks,
                        StateSlotPool(num_slots, num_host_slots))
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                     enable_chunked_prefill=True, preemption_mode=preemption_mode), kv)


def _add(scheduler: Scheduler, seq_id: int, num_tokens: int, **params) -> Sequence:
    prompt = list(range(100 * seq_id, 100 * seq_id + num_tokens))
    request = Request(f"r{seq_id}", None, prompt, SamplingParams(max_tokens=8, **params))
    request.num_forks_pending = request.params.best_of - 1
    seq = Sequence(seq_id, request, list(prompt))
    request.seqs.append(seq)
    scheduler.add(seq)
    return seq


def _read(scheduled) -> None:
    """What the engine does with a step's results, for sequences without forks."""
    for seq, _ in scheduled:
        if seq.num_in_flight:
            seq.num_in_flight -= 1
            seq.token_ids.append(7)


def _live(scheduler: Scheduler) -> list[Sequence]:
    return [*scheduler.running, *scheduler.waiting, *scheduler.swapped]


def test_each_admitted_sequence_holds_its_own_slot_and_the_message_carries_it():
    scheduler = _scheduler()
    seqs = [_add(scheduler, i, 3) for i in range(3)]
    message, _ = scheduler.schedule()
    assert sorted(seq.state_slot for seq in seqs) == [0, 1, 2]
    assert [entry.state_slot for entry in message.seqs] == [seq.state_slot for seq in seqs]
    scheduler.kv.states.check_invariants(seqs)


def test_admission_waits_for_a_free_slot_and_finishing_frees_it():
    scheduler = _scheduler(num_slots=2)
    first, second, third = (_add(scheduler, i, 3) for i in range(3))
    _, scheduled = scheduler.schedule()
    assert [seq for seq, _ in scheduled] == [first, second]  # blocks and sequence cap allow three
    assert third.status is SequenceStatus.WAITING and third.state_slot is None
    _read(scheduled)
    scheduler.finish(first)
    assert first.state_slot is None
    _, scheduled = scheduler.schedule()
    assert third in [seq for seq, _ in scheduled] and third.state_slot is not None
    scheduler.kv.states.check_invariants([second, third])


def test_a_preempted_sequence_gives_its_slot_back_and_restarts_from_position_zero():
    scheduler = _scheduler(num_slots=4, num_blocks=4, budget=64)
    old, new = _add(scheduler, 1, 8), _add(scheduler, 2, 7)  # two blocks each: the pool is full
    _, scheduled = scheduler.schedule()
    _read(scheduled)
    _, scheduled = scheduler.schedule()  # old grows into a third block: new is preempted
    assert new.status is SequenceStatus.WAITING and new.state_slot is None
    assert scheduler.num_preemptions == 1
    _read(scheduled)
    scheduler.finish(old)
    message, _ = scheduler.schedule()
    (entry,) = message.seqs
    assert entry.seq_id == new.seq_id and entry.start_position == 0 and entry.state_slot is not None


def test_forks_have_slots_reserved_at_admission_and_get_the_prompts_state_after_its_step():
    scheduler = _scheduler(num_slots=4)
    parent = _add(scheduler, 1, 6, n=3, temperature=1.0)
    other = _add(scheduler, 2, 3)
    message, _ = scheduler.schedule()
    # the parent's slot and two reserved for its forks leave one: the second request still fits
    assert len(parent.request.fork_state_slots) == 2 and other.state_slot is not None
    (parent_entry, _) = message.seqs
    assert parent_entry.num_samples == 3
    assert sorted(message.state_fork_copies) == sorted(
        (parent.state_slot, slot) for slot in parent.request.fork_state_slots)
    children = [Sequence(10 + i, parent.request, list(parent.token_ids), i) for i in (1, 2)]
    for child in children:
        scheduler.kv.fork(parent, child, parent.num_tokens)
    assert {child.state_slot for child in children} == {slot for _, slot in message.state_fork_copies}
    assert parent.request.fork_state_slots == []
    scheduler.kv.states.check_invariants([parent, other, *children])


def test_a_request_whose_forks_do_not_fit_waits():
    scheduler = _scheduler(num_slots=3)
    first = _add(scheduler, 1, 3)
    parent = _add(scheduler, 2, 3, n=3, temperature=1.0)
    scheduler.schedule()
    assert first.state_slot is not None and parent.state_slot is None  # needs 3 slots, 2 are free
    assert parent.request.fork_state_slots == []


def test_an_aborted_request_releases_its_forks_reservations():
    scheduler = _scheduler(num_slots=4)
    parent = _add(scheduler, 1, 40, n=3, temperature=1.0)  # longer than the budget: still prefilling
    scheduler.schedule()
    assert len(parent.request.fork_state_slots) == 2
    scheduler.finish(parent)
    assert parent.request.fork_state_slots == [] and scheduler.kv.states.num_free == 4


def test_swapping_moves_the_state_to_a_host_slot_and_back():
    scheduler = _scheduler(num_slots=4, num_host_slots=2, num_blocks=4, budget=64, num_host_blocks=8,
                           preemption_mode="swap")
    old, new = _add(scheduler, 1, 8), _add(scheduler, 2, 7)
    _, scheduled = scheduler.schedule()
    slot = new.state_slot
    _read(scheduled)
    message, scheduled = scheduler.schedule()
    assert new.status is SequenceStatus.SWAPPED and new.state_slot is None
    assert message.state_swap_out == [(slot, new.host_state_slot)]
    _read(scheduled)
    scheduler.finish(old)
    host = new.host_state_slot
    message, _ = scheduler.schedule()
    assert new.status is SequenceStatus.RUNNING and new.host_state_slot is None
    assert message.state_swap_in == [(host, new.state_slot)]
    (entry,) = message.seqs
    assert entry.start_position > 0  # continues from the swapped state: no reset
    scheduler.kv.states.check_invariants([new])


def test_without_a_free_host_slot_a_swap_falls_back_to_recompute():
    scheduler = _scheduler(num_slots=4, num_host_slots=0, num_blocks=4, budget=64, num_host_blocks=8,
                           preemption_mode="swap")
    _add(scheduler, 1, 8)
    new = _add(scheduler, 2, 7)
    _, scheduled = scheduler.schedule()
    _read(scheduled)
    scheduler.schedule()
    assert new.status is SequenceStatus.WAITING and new.state_slot is None and new.host_blocks == []


def test_models_without_state_layers_have_no_slots():
    kv = KVCacheManager(BlockPool(16, enable_caching=False), BLOCK)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, enable_chunked_prefill=True),
                          kv)
    seq = _add(scheduler, 1, 3)
    message, _ = scheduler.schedule()
    assert seq.state_slot is None and message.seqs[0].state_slot is None
    assert (message.state_swap_out, message.state_swap_in, message.state_fork_copies) == ([], [], [])
