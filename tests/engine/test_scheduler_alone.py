"""The scheduler on its own: pure Python over ints and lists, no model, no torch."""
from __future__ import annotations

import subprocess
import sys

from asyncserve.config.scheduler import SchedulerConfig
from asyncserve.engine.block_pool import BlockPool
from asyncserve.engine.kv_cache_manager import KVCacheManager
from asyncserve.engine.scheduler import Scheduler
from asyncserve.engine.sequence import Request, Sequence
from asyncserve.sampling_params import SamplingParams

BLOCK = 4


def _scheduler(num_blocks=64, budget=16, max_num_seqs=8, chunked=True) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, enable_caching=True), BLOCK)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                     enable_chunked_prefill=chunked), kv)


def _add(scheduler: Scheduler, seq_id: int, num_tokens: int) -> Sequence:
    prompt = list(range(100 * seq_id, 100 * seq_id + num_tokens))
    seq = Sequence(seq_id, Request(f"r{seq_id}", None, prompt, SamplingParams(max_tokens=4)), list(prompt))
    seq.request.seqs.append(seq)
    scheduler.add(seq)
    return seq


def _computed(scheduler: Scheduler, scheduled, sampled: int = 7) -> None:
    """What the engine does with a step's results: append the token each sampling sequence got."""
    for seq, num_new in scheduled:
        if seq.num_in_flight:
            seq.num_in_flight -= 1
            seq.token_ids.append(sampled)


def test_the_scheduler_imports_no_torch():
    code = "import sys, asyncserve.engine.scheduler; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_new_sequences_travel_once_then_only_diffs():
    scheduler = _scheduler()
    seq = _add(scheduler, 1, 6)
    message, scheduled = scheduler.schedule()
    (new,) = message.new_seqs
    assert (new.seq_id, new.token_ids, new.num_prompt_tokens) == (1, list(range(100, 106)), 6)
    (entry,) = message.seqs
    assert (entry.start_position, entry.num_new_tokens) == (0, 6)
    assert entry.new_block_ids == seq.block_table and len(entry.new_block_ids) == 2
    assert entry.num_samples == 1
    assert (seq.num_computed_tokens, seq.num_in_flight) == (6, 1)  # as if the step had run
    _computed(scheduler, scheduled, sampled=42)
    _computed(scheduler, scheduler.schedule()[1], sampled=43)  # position 7: still the second block
    message, scheduled = scheduler.schedule()  # position 8: a third block is needed
    (entry,) = message.seqs
    assert not message.new_seqs
    assert (entry.start_position, entry.num_new_tokens) == (7, 1)
    assert entry.new_block_ids == seq.block_table[2:] and not entry.replace_block_table


def test_the_next_step_is_scheduled_before_the_last_ones_token_is_known():
    scheduler = _scheduler()
    seq = _add(scheduler, 1, 6)
    scheduler.schedule()  # the prompt: its sampled token is in flight
    message, scheduled = scheduler.schedule()  # scheduled before the engine saw that token
    (entry,) = message.seqs
    assert (entry.start_position, entry.num_new_tokens, entry.num_samples) == (6, 1, 1)
    assert (seq.num_tokens, seq.num_computed_tokens, seq.num_in_flight) == (6, 7, 2)


def test_a_sequence_whose_last_token_is_in_flight_is_not_scheduled_again():
    scheduler = _scheduler()
    prompt = [1, 2, 3]
    seq = Sequence(1, Request("r1", None, prompt, SamplingParams(max_tokens=1)), list(prompt))
    seq.request.seqs.append(seq)
    scheduler.add(seq)
    scheduler.schedule()
    message, scheduled = scheduler.schedule()
    assert scheduled == [] and seq.num_in_flight == 1


def test_decodes_first_then_prefill_chunks_within_the_budget():
    scheduler = _scheduler(budget=10)
    first = _add(scheduler, 1, 3)
    _computed(scheduler, scheduler.schedule()[1])
    second = _add(scheduler, 2, 20)
    message, scheduled = scheduler.schedule()
    assert [(seq.seq_id, n) for seq, n in scheduled] == [(1, 1), (2, 9)]
    assert [entry.num_samples for entry in message.seqs] == [1, 0]  # mid-prompt: nothing sampled
    assert first.num_computed_tokens == 4 and second.num_computed_tokens == 9  # advanced when scheduled


def test_finished_sequences_are_reported_once():
    scheduler = _scheduler()
    seq = _add(scheduler, 1, 3)
    _computed(scheduler, scheduler.schedule()[1])
    scheduler.finish(seq)
    message, scheduled = scheduler.schedule()
    assert message.finished_seq_ids == [1] and scheduled == []
    assert scheduler.schedule()[0].finished_seq_ids == []
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks


def test_preemption_resends_the_whole_block_table():
    scheduler = _scheduler(num_blocks=4, budget=64)
    a, b = _add(scheduler, 1, 8), _add(scheduler, 2, 8)  # two blocks each: the pool is full
    _computed(scheduler, scheduler.schedule()[1])
    message, scheduled = scheduler.schedule()  # a needs a third block: b is preempted (recompute)
    assert scheduler.num_preemptions == 1
    assert [seq.seq_id for seq, _ in scheduled] == [1]
    _computed(scheduler, scheduled)
    scheduler.finish(a)
    message, scheduled = scheduler.schedule()
    (entry,) = message.seqs
    assert entry.seq_id == 2 and entry.start_position == 0 and entry.num_new_tokens == b.num_tokens
    assert entry.replace_block_table and entry.new_block_ids == b.block_table
