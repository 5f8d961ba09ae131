"""The scheduler and KV manager with drafts, alone (pure Python, fuzzed): drafts take budget and slots,
rejected ones give their blocks back, preemption and the prefix cache stay right, nothing leaks."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from asyncserve.config.scheduler import SchedulerConfig
from asyncserve.engine.block_pool import BlockPool
from asyncserve.engine.kv_cache_manager import KVCacheManager, hash_block
from asyncserve.engine.scheduler import Scheduler
from asyncserve.engine.sequence import Request, Sequence
from asyncserve.sampling_params import SamplingParams

BLOCK = 4


def _scheduler(num_blocks: int, budget: int) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, enable_caching=True), BLOCK)
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, enable_chunked_prefill=True),
                     kv)


def _add(scheduler: Scheduler, seq_id: int, prompt: list[int], max_tokens: int) -> Sequence:
    seq = Sequence(seq_id, Request(f"r{seq_id}", None, prompt, SamplingParams(max_tokens=max_tokens)), list(prompt))
    seq.request.seqs.append(seq)
    scheduler.add(seq)
    return seq


def test_drafts_take_budget_and_slots():
    scheduler = _scheduler(num_blocks=16, budget=16)
    seq = _add(scheduler, 1, [1, 2, 3, 4, 5, 6], max_tokens=20)
    scheduler.schedule()
    seq.num_in_flight -= 1
    seq.token_ids.append(7)
    seq.draft_token_ids = [8, 9, 10]
    message, scheduled = scheduler.schedule()
    (entry,) = message.seqs
    assert (entry.start_position, entry.num_new_tokens, entry.draft_token_ids) == (6, 4, [8, 9, 10])
    assert scheduled == [(seq, 4)] and seq.num_computed_tokens == 10 and len(seq.blocks) == 3
    # All three rejected: the third block (positions 8..11) held only rejected slots; position 7, where
    # the target's own token goes next, is in the second.
    seq.num_in_flight -= 1
    scheduler.reject_drafts(seq, 3)
    seq.token_ids += [11]
    assert (seq.num_computed_tokens, len(seq.blocks)) == (7, 2)
    scheduler.kv.pool.check_invariants([seq.block_table])


def test_drafts_are_cut_to_the_budget():
    scheduler = _scheduler(num_blocks=16, budget=3)
    seq = _add(scheduler, 1, [1, 2, 3, 4, 5, 6, 7], max_tokens=20)
    for _ in range(3):  # the prompt in chunks of 3, 3, 1
        scheduler.schedule()
    seq.num_in_flight -= 1
    seq.token_ids.append(8)
    seq.draft_token_ids = [9, 10, 11, 12]
    message, _ = scheduler.schedule()
    assert (message.seqs[0].num_new_tokens, message.seqs[0].draft_token_ids) == (3, [9, 10])


def test_drafts_are_dropped_when_the_pool_has_no_slots_for_them():
    scheduler = _scheduler(num_blocks=3, budget=16)
    seq = _add(scheduler, 1, list(range(1, 11)), max_tokens=20)
    scheduler.schedule()
    seq.num_in_flight -= 1
    seq.token_ids.append(11)
    seq.draft_token_ids = [1, 2, 3]  # 10 computed + 4 would need a fourth block
    message, _ = scheduler.schedule()
    assert (message.seqs[0].num_new_tokens, message.seqs[0].draft_token_ids) == (1, ())
    assert seq.draft_token_ids == [] and seq.num_computed_tokens == 11


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_random_drafts_and_acceptance_keep_the_pool_right(data):
    num_blocks = data.draw(st.integers(8, 24))
    scheduler = _scheduler(num_blocks=num_blocks, budget=data.draw(st.integers(4, 16)))
    pool = scheduler.kv.pool
    seqs = []
    for seq_id in range(data.draw(st.integers(1, 5))):
        shared = [1, 2, 3, 4, 5] if data.draw(st.booleans()) else []  # prefix-cache hits
        prompt = shared + data.draw(st.lists(st.integers(10, 20), min_size=1, max_size=10))
        seqs.append(_add(scheduler, seq_id, prompt, max_tokens=data.draw(st.integers(1, 12))))
    for _ in range(200):
        if not scheduler.has_work():
            break
        for seq in scheduler.running:  # what the speculator would propose
            if not seq.num_in_flight and seq.num_computed_tokens == seq.num_tokens - 1:
                room = seq.params.max_tokens - seq.num_output_tokens - 1
                seq.draft_token_ids = data.draw(st.lists(st.integers(0, 30), max_size=max(0, min(4, room))))
        _, scheduled = scheduler.schedule()
        for seq, _ in scheduled:  # what the engine does with the results
            if not seq.num_in_flight:
                continue
            seq.num_in_flight -= 1
            drafts = list(seq.draft_token_ids)
            num_accepted = data.draw(st.integers(0, len(drafts)))
            if drafts:
                scheduler.reject_drafts(seq, len(drafts) - num_accepted)
            scheduler.kv.cache_computed_blocks(seq)
            seq.token_ids += drafts[:num_accepted] + [data.draw(st.integers(0, 30))]
            assert len(seq.blocks) <= -(-seq.num_tokens // BLOCK)
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq)
        live = [seq for seq in seqs if not seq.is_finished]
        pool.check_invariants([seq.block_table for seq in live])
        for seq in live:
            parent = seq.cache_salt
            for index in range(seq.num_cached_blocks):
                parent = hash_block(parent, seq.token_ids[index * BLOCK:(index + 1) * BLOCK])
                assert seq.blocks[index].block_hash == parent
    assert not scheduler.has_work()
    pool.check_invariants([])
    assert pool.num_free_blocks == num_blocks
