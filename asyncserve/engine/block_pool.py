"""The pool of KV blocks: reference counts, an LRU free queue, and the prefix-cache hash map.

Pure Python over ints, no torch: the scheduler consults it every step and tests fuzz it.
"""
from __future__ import annotations

from typing import Iterable

BlockHash = int


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None  # set once the block is full and computed
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently freed first.

    A cached block that a new request hits is unlinked from the middle in O(1).
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]):
        self.head = KVCacheBlock(-1)  # sentinels keep the links free of None checks
        self.tail = KVCacheBlock(-1)
        self.head.next_free, self.tail.prev_free = self.tail, self.head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVCacheBlock) -> None:
        last = self.tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self.tail.prev_free = self.tail, block
        self.num_free += 1

    def remove(self, block: KVCacheBlock) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def popleft(self) -> KVCacheBlock:
        block = self.head.next_free
        if block is self.tail:
            raise RuntimeError("no free KV block")
        self.remove(block)
        return block

    def __iter__(self):
        block = self.head.next_free
        while block is not self.tail:
            yield block
            block = block.next_free


class BlockPool:
    """Owns every block; hands them out, takes them back, and remembers full ones by content hash."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.enable_caching = enable_caching
        self.cached: dict[BlockHash, KVCacheBlock] = {}
        self.num_cache_queries = 0
        self.num_cache_hits = 0  # in blocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_blocks)

    def allocate(self, count: int) -> list[KVCacheBlock]:
        """Takes `count` blocks off the free queue, evicting the least recently used cached ones."""
        if count > self.num_free_blocks:
            raise RuntimeError(f"asked for {count} KV blocks, only {self.num_free_blocks} are free")
        taken = []
        for _ in range(count):
            block = self.free_queue.popleft()
            if block.block_hash is not None:  # evict its cached content
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def lookup(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, block: KVCacheBlock) -> None:
        """Takes another reference; a cached block that was free leaves the free queue."""
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
        block.ref_cnt += 1

    def free(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference each; blocks reaching zero go to the back of the free queue.

        Callers pass a sequence's blocks in reverse so that its tail is evicted before its prefix.
        """
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"{block} freed more often than it was taken")
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_cnt == 0:
                block.block_hash = None
        self.cached = {h: b for h, b in self.cached.items() if b.ref_cnt > 0}

    def check_invariants(self, block_tables: Iterable[list[int]] = ()) -> None:
        """Ref counts equal the number of tables holding each block; free ones are exactly those at 0."""
        expected = [0] * self.num_blocks
        for table in block_tables:
            for block_id in table:
                expected[block_id] += 1
        actual = [block.ref_cnt for block in self.blocks]
        if actual != expected:
            bad = [i for i in range(self.num_blocks) if actual[i] != expected[i]][:8]
            raise AssertionError(f"ref counts differ from block tables at blocks {bad}")
        free_ids = [block.block_id for block in self.free_queue]
        if len(free_ids) != len(set(free_ids)) or len(free_ids) != self.free_queue.num_free:
            raise AssertionError("free queue is corrupt")
        if sorted(free_ids) != [i for i, count in enumerate(expected) if count == 0]:
            raise AssertionError("free queue does not hold exactly the unreferenced blocks")
        for block_hash, block in self.cached.items():
            if block.block_hash != block_hash:
                raise AssertionError(f"hash map points at {block} under another hash")
