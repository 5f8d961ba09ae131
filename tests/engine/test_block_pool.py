"""The block pool and KV cache manager: unit behaviour and random interleavings (hypothesis)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from asyncserve.engine.block_pool import BlockPool
from asyncserve.engine.kv_cache_manager import KVCacheManager
from asyncserve.engine.sequence import Request, Sequence
from asyncserve.sampling_params import SamplingParams

BLOCK = 4


def _seq(seq_id, tokens):
    request = Request(str(seq_id), None, list(tokens), SamplingParams())
    return Sequence(seq_id, request, list(tokens))


def _compute(kv, seq, num_new):
    assert kv.allocate_slots(seq, num_new)
    seq.num_computed_tokens += num_new
    kv.cache_computed_blocks(seq)


def test_free_queue_is_lru_and_cached_blocks_come_back_in_o1():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_full_block(a, 111)
    pool.free([b, a])
    assert [blk.block_id for blk in pool.free_queue] == [2, 3, 1, 0]
    assert pool.lookup(111) is a
    pool.touch(a)  # a cache hit takes it out of the middle of the queue
    assert a.ref_cnt == 1 and [blk.block_id for blk in pool.free_queue] == [2, 3, 1]
    pool.free([a])
    taken = pool.allocate(4)  # a is evicted last, and loses its hash when reused
    assert taken[-1] is a and a.block_hash is None and pool.lookup(111) is None
    pool.free(taken)
    pool.check_invariants([])


def test_prefix_hit_shares_full_blocks_only():
    pool = BlockPool(16)
    kv = KVCacheManager(pool, BLOCK)
    first = _seq(0, range(10))
    _compute(kv, first, 10)
    second = _seq(1, list(range(10)) + [99])
    hits = kv.find_cached_prefix(second)
    assert [blk.block_id for blk in hits] == first.block_table[:2]
    assert kv.allocate_slots(second, second.num_tokens - 8, hits)
    assert second.num_computed_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    pool.check_invariants([first.block_table, second.block_table])
    kv.free(first)
    kv.free(second)
    pool.check_invariants([])


def test_whole_prompt_cached_still_leaves_a_token_to_compute():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BLOCK)
    first = _seq(0, range(8))
    _compute(kv, first, 8)
    kv.free(first)
    again = _seq(1, range(8))
    assert len(kv.find_cached_prefix(again)) == 1


def test_fork_shares_blocks_and_copies_the_partial_one_on_write():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BLOCK)
    parent = _seq(0, range(6))
    _compute(kv, parent, 6)
    child = _seq(1, range(6))
    kv.fork(parent, child)
    assert [blk.ref_cnt for blk in parent.blocks] == [2, 2]
    for seq, token in ((parent, 50), (child, 60)):
        seq.token_ids.append(token)
    assert kv.allocate_slots(parent, 1)
    assert kv.take_block_moves()[2] == [(child.block_table[1], parent.block_table[1])]
    assert kv.allocate_slots(child, 1)  # the shared block now has one owner: no copy
    assert kv.take_block_moves()[2] == []
    assert parent.block_table[0] == child.block_table[0]
    assert parent.block_table[1] != child.block_table[1]
    pool.check_invariants([parent.block_table, child.block_table])


def test_allocation_failure_changes_nothing():
    pool = BlockPool(3)
    kv = KVCacheManager(pool, BLOCK)
    seq = _seq(0, range(20))
    assert not kv.allocate_slots(seq, 20)
    assert seq.block_table == [] and pool.num_free_blocks == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "step", "fork", "free", "preempt", "swap_out", "swap_in"]),
                          st.integers(0, 7), st.integers(1, 9)), min_size=1, max_size=60))
def test_random_interleavings_keep_ref_counts_equal_to_block_tables(ops):
    pool = BlockPool(24)
    kv = KVCacheManager(pool, BLOCK, num_host_blocks=10)
    live: list[Sequence] = []
    swapped: list[Sequence] = []
    next_id = 0
    shared_prefix = list(range(100, 108))  # so that new sequences hit the prefix cache
    for op, pick, amount in ops:
        if op == "new":
            seq = _seq(next_id, shared_prefix[:amount] + [next_id] * amount)
            next_id += 1
            hits = kv.find_cached_prefix(seq)
            todo = seq.num_tokens - len(hits) * BLOCK
            if kv.allocate_slots(seq, todo, hits):
                seq.num_computed_tokens += todo
                kv.cache_computed_blocks(seq)
                live.append(seq)
        elif op == "swap_in":
            if swapped and kv.swap_in(swapped[0]):
                live.append(swapped.pop(0))
        elif live:
            seq = live[pick % len(live)]
            if op == "step":
                seq.token_ids.extend([pick] * amount)
                if kv.allocate_slots(seq, amount):
                    seq.num_computed_tokens += amount
                    kv.cache_computed_blocks(seq)
                else:
                    del seq.token_ids[-amount:]
            elif op == "fork":
                child = _seq(next_id, seq.token_ids)
                next_id += 1
                kv.fork(seq, child)
                live.append(child)
            elif op in ("free", "preempt"):
                kv.free(seq)
                live.remove(seq)
            elif op == "swap_out" and kv.swap_out(seq):
                live.remove(seq)
                swapped.append(seq)
        kv.take_block_moves()
        pool.check_invariants([seq.block_table for seq in live])
        host_held = sorted(kv.free_host_blocks + [b for seq in swapped for b in seq.host_blocks])
        assert host_held == list(range(10))
        for seq in live:
            assert len(seq.block_table) * BLOCK >= seq.num_computed_tokens
    for seq in live + swapped:
        kv.free(seq)
    pool.check_invariants([])
    assert sorted(kv.free_host_blocks) == list(range(10))
    assert pool.num_free_blocks == pool.num_blocks
