"""Which blocks each sequence holds: allocation, prefix-cache hits, fork with copy-on-write, free; and, for
hybrid models, its slot of recurrent state (engine/state_slots.py), which follows the same lifecycle."""
from __future__ import annotations

import hashlib
from array import array

from asyncserve.engine.block_pool import BlockPool, KVCacheBlock
from asyncserve.engine.sequence import Sequence
from asyncserve.engine.state_slots import StateSlotPool


def hash_block(parent_hash: int | None, token_ids: list[int], extra_keys: tuple[int, ...] = ()) -> int:
    """Content hash of a full block, chained on its prefix so equal blocks at other offsets differ;
    `extra_keys` (the content hashes of the images whose placeholder tokens the block holds) keep blocks of
    equal placeholder tokens apart when their images differ."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update((parent_hash or 0).to_bytes(16, "little"))
    for key in extra_keys:
        digest.update(key.to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, num_host_blocks: int = 0,
                 states: StateSlotPool | None = None):
        self.pool = pool
        self.states = states  # None: the model keeps no per-sequence state beside its KV
        self.block_size = block_size
        # (src, dst) block copies the runner must do before this step's forward (copy-on-write).
        self.pending_copies: list[tuple[int, int]] = []
        self.free_host_blocks: list[int] = list(range(num_host_blocks))
        self.pending_swap_out: list[tuple[int, int]] = []
        self.pending_swap_in: list[tuple[int, int]] = []
        self.num_swaps = 0

    def _update_hashes(self, seq: Sequence) -> None:
        num_full = seq.num_tokens // self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_full:
            start = len(hashes) * self.block_size
            # The first block chains on the KV regime's salt (0 or 1), the LoRA adapter and the request's
            # cache_salt (Sequence.prefix_key; 0: neither).
            parent = hashes[-1] if hashes else seq.cache_salt + 2 * seq.prefix_key
            end = start + self.block_size
            images = seq.request.multimodal if seq.request is not None else None
            extra = images.block_keys(start, end) if images is not None else ()
            hashes.append(hash_block(parent, seq.token_ids[start:end], extra))

    def find_cached_prefix(self, seq: Sequence) -> list[KVCacheBlock]:
        """Longest run of cached full blocks at the start of a sequence that holds none yet.

        At least one token is left to compute, so the step still produces logits. A request for prompt
        logprobs reads no cached blocks (as in vLLM): every prompt position must be computed to score it.
        """
        if not self.pool.enable_caching or seq.blocks:
            return []
        if seq.params.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens:
            return []
        self._update_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.pool.num_cache_queries += max_blocks
        return hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       cached: list[KVCacheBlock] = ()) -> bool:
        """Makes room for `num_new_tokens` more computed tokens; False (nothing changed) if the pool is short
        (of blocks, or of state slots for a sequence being admitted)."""
        if self.states is not None and not self.states.can_admit(seq):
            return False
        num_computed = seq.num_computed_tokens + len(cached) * self.block_size
        num_held = len(seq.blocks) + len(cached)
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size) - num_held
        write_block = num_computed // self.block_size
        needs_copy = (write_block < len(seq.blocks) and num_computed % self.block_size != 0
                      and seq.blocks[write_block].ref_cnt > 1)
        revived = sum(1 for block in cached if block.ref_cnt == 0)  # leave the free queue
        if max(0, num_needed) + int(needs_copy) + revived > self.pool.num_free_blocks:
            return False
        for block in cached:
            self.pool.touch(block)
            seq.blocks.append(block)
            seq.block_table.append(block.block_id)
        if cached:
            self.pool.num_cache_hits += len(cached)
            seq.num_computed_tokens = num_computed
        if needs_copy:
            self._copy_on_write(seq, write_block)
        if num_needed > 0:
            new_blocks = self.pool.allocate(num_needed)
            seq.blocks.extend(new_blocks)
            seq.block_table.extend(block.block_id for block in new_blocks)
        if self.states is not None:
            self.states.admit(seq)
        return True

    def _copy_on_write(self, seq: Sequence, index: int) -> None:
        shared = seq.blocks[index]
        (private,) = self.pool.allocate(1)
        self.pool.free([shared])
        seq.blocks[index] = private
        seq.block_table[index] = private.block_id
        seq.block_table_rewritten = True
        self.pending_copies.append((shared.block_id, private.block_id))

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Registers the blocks that became full and computed, so later requests can share them."""
        if not self.pool.enable_caching:
            return
        # Computed may run one token ahead of the known tokens (the next step's input, still in flight).
        num_full = min(min(seq.num_computed_tokens, seq.num_tokens) // self.block_size, len(seq.blocks))
        if num_full <= seq.num_cached_blocks:  # most steps: no block filled up
            return
        self._update_hashes(seq)
        for index in range(seq.num_cached_blocks, num_full):
            block = seq.blocks[index]
            if block.block_hash is None:
                self.pool.cache_full_block(block, seq.block_hashes[index])
        seq.num_cached_blocks = num_full

    def free_blocks_past(self, seq: Sequence, num_tokens: int) -> None:
        """Gives back the blocks past those of the first `num_tokens` tokens: the slots of rejected drafts
        (speculative decoding). They were allocated for this step and never full, so never cached."""
        keep = -(-num_tokens // self.block_size)
        if len(seq.blocks) <= keep:
            return
        self.pool.free(reversed(seq.blocks[keep:]))
        del seq.blocks[keep:]
        del seq.block_table[keep:]
        seq.block_table_rewritten = True

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int | None = None) -> None:
        """The child shares the parent's blocks of its first `num_tokens` (default: all computed) tokens;
        a shared partial block is copied on the child's first write. Blocks past them stay the parent's."""
        if num_tokens is None:
            num_tokens = parent.num_computed_tokens
        num_blocks = -(-num_tokens // self.block_size)
        for block in parent.blocks[:num_blocks]:
            self.pool.touch(block)
        child.blocks = list(parent.blocks[:num_blocks])
        child.block_table = list(parent.block_table[:num_blocks])
        child.block_table_rewritten = True
        child.num_computed_tokens = num_tokens
        child.num_cached_blocks = min(parent.num_cached_blocks, num_tokens // self.block_size)
        child.block_hashes = list(parent.block_hashes[:num_tokens // self.block_size])
        if self.states is not None:
            self.states.fork(parent, child)

    def copy_state_to_forks(self, parent: Sequence) -> None:
        """The step being scheduled completes the parent's prompt, which its request's forks will share."""
        if self.states is not None:
            self.states.copy_to_forks(parent)

    def free(self, seq: Sequence, finished: bool = False) -> None:
        """Gives back what the sequence holds; `finished`: its request is over for it (an unfinished one
        may be admitted again, and keeps its request's state slots reserved for forks)."""
        if self.states is not None:
            self.states.free(seq, finished)
        self.pool.free(reversed(seq.blocks))
        seq.blocks = []
        seq.block_table = []
        seq.block_table_rewritten = True
        seq.num_cached_blocks = 0
        self.free_host_blocks.extend(seq.host_blocks)
        seq.host_blocks = []

    def swap_out(self, seq: Sequence) -> bool:
        """Moves a sequence's KV to host memory and frees its device blocks; False if the host is full."""
        if len(seq.blocks) > len(self.free_host_blocks):
            return False
        if self.states is not None:
            if not self.states.can_swap_out(seq):
                return False
            self.states.swap_out(seq)
        host = [self.free_host_blocks.pop() for _ in seq.blocks]
        self.pending_swap_out.extend(zip(seq.block_table, host))
        self.pool.free(reversed(seq.blocks))
        seq.blocks, seq.block_table, seq.host_blocks = [], [], host
        seq.block_table_rewritten = True
        seq.num_cached_blocks = 0
        self.num_swaps += 1
        return True

    def swap_in(self, seq: Sequence) -> bool:
        """Brings a swapped sequence's KV back into fresh device blocks; False if the pool is short."""
        if len(seq.host_blocks) > self.pool.num_free_blocks:
            return False
        if self.states is not None:
            if not self.states.can_swap_in(seq):
                return False
            self.states.swap_in(seq)
        blocks = self.pool.allocate(len(seq.host_blocks))
        self.pending_swap_in.extend(zip(seq.host_blocks, (block.block_id for block in blocks)))
        self.free_host_blocks.extend(seq.host_blocks)
        seq.blocks, seq.block_table, seq.host_blocks = blocks, [b.block_id for b in blocks], []
        seq.block_table_rewritten = True
        return True

    def take_state_moves(self) -> tuple[list, list, list]:
        """(swap_out, swap_in, fork copies) of state slots the runner must do in this step."""
        return self.states.take_moves() if self.states is not None else ([], [], [])

    def take_block_moves(self) -> tuple[list, list, list]:
        """(swap_out, swap_in, copies) the runner must do before this step's forward."""
        moves = (self.pending_swap_out, self.pending_swap_in, self.pending_copies)
        self.pending_swap_out, self.pending_swap_in, self.pending_copies = [], [], []
        return moves
