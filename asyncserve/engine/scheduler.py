"""Continuous batching: each step, running sequences first, then waiting ones, within a token budget.

Pure Python: it decides which tokens of which sequences are computed; it never touches tensors.
"""
from __future__ import annotations

import time
from collections import deque

from asyncserve.config.scheduler import SchedulerConfig
from asyncserve.engine.kv_cache_manager import KVCacheManager
from asyncserve.engine.sequence import Sequence, SequenceStatus
from asyncserve.runner.step import NewSequence, ScheduledSequence, StepMessage


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, lora=None):
        self.config = config
        self.priority_policy = config.scheduling_policy == "priority"
        self.kv = kv
        self.lora = lora  # LoRAManager (engine/lora_manager.py): adapters' GPU slots; None without LoRA
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.num_scheduled_tokens = 0  # the last step's tokens (vLLM's iteration_tokens metric)
        # What the runner has not heard of yet: sequences created, sequences gone.
        self._announced: list[Sequence] = []
        self._finished_seq_ids: list[int] = []

    def add(self, seq: Sequence) -> None:
        self._set_kv_regime(seq)
        self._enqueue(seq, front=False)
        self._announced.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> tuple[StepMessage, list[tuple[Sequence, int]]]:
        """Chooses this step's work: [(sequence, number of new tokens)] and its description for the runner."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        if self.priority_policy:
            self._preempt_for_priority()  # the better-priority waiting head is then admitted below
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.num_in_flight and seq.num_output_tokens + seq.num_in_flight >= seq.params.max_tokens:
                index += 1  # its last token is on its way: nothing more to compute
                continue
            if seq.recompute_kv_at is not None and seq.num_computed_tokens >= seq.recompute_kv_at:
                self._recompute_past_threshold(seq)
                continue
            num_new = min(seq.num_tokens + seq.num_in_flight - seq.num_computed_tokens, budget)
            fitted = _fit_images(seq, seq.num_computed_tokens, num_new)
            if num_new and not fitted:  # the rest of an image it has begun does not fit the budget left
                index += 1
                continue
            num_new = fitted
            if seq.draft_token_ids:  # speculative decoding: its drafts are scored too, if budget and pool allow
                num_drafts = 0 if seq.num_in_flight else min(len(seq.draft_token_ids), budget - num_new)
                if num_drafts and self.kv.allocate_slots(seq, num_new + num_drafts):
                    del seq.draft_token_ids[num_drafts:]
                    scheduled.append((seq, num_new + num_drafts))
                    budget -= num_new + num_drafts
                    index += 1
                    continue
                seq.draft_token_ids = []
            while not self.kv.allocate_slots(seq, num_new):
                victim = self._victim(index)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                index += 1
                continue
            break
        # Swapped-out sequences come back before new work is admitted, oldest first.
        while self.swapped and budget > 0 and not preempted:
            seq = self.swapped[0]
            num_new = min(seq.num_tokens + seq.num_in_flight - seq.num_computed_tokens, budget)
            fitted = _fit_images(seq, seq.num_computed_tokens, num_new)
            if ((num_new and not fitted) or len(self.running) + 1 > self.config.max_num_seqs
                    or not self._lora_slot_free(seq) or not self.kv.swap_in(seq)):
                break
            num_new = fitted
            if not self.kv.allocate_slots(seq, num_new):
                self.kv.free(seq)  # the blocks just swapped in are dropped: recompute it later
                self._requeue_for_recompute(seq)
                self.swapped.popleft()
                break
            self.swapped.popleft()
            self._take_lora_slot(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        # Admitting new work while others were just evicted would only thrash the pool.
        while self.waiting and budget > 0 and not preempted and not self.swapped:
            seq = self.waiting[0]
            if seq.num_in_flight:  # preempted while its token was on its way: wait for it
                break
            num_forks = seq.request.num_forks_pending if seq.index == 0 else 0
            if len(self.running) + 1 + num_forks > self.config.max_num_seqs or not self._lora_slot_free(seq):
                break
            cached = self.kv.find_cached_prefix(seq)
            num_new = seq.num_tokens - seq.num_computed_tokens - len(cached) * self.kv.block_size
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = _fit_images(seq, seq.num_tokens - num_new, budget)
                if num_new == 0:
                    break
            if not self.kv.allocate_slots(seq, num_new, cached):
                break
            self.waiting.popleft()
            self._take_lora_slot(seq)
            if seq.request.scheduled_time is None:
                seq.request.scheduled_time = time.monotonic()
            if seq.num_preemptions == 0 and seq.index == 0 and not seq.num_output_tokens:
                seq.request.num_cached_tokens = len(cached) * self.kv.block_size
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        self.num_scheduled_tokens = self.config.max_num_batched_tokens - budget  # what the budget paid
        described = [self._describe(seq, num_new) for seq, num_new in scheduled]
        swap_out, swap_in, copies = self.kv.take_block_moves()
        state_swap_out, state_swap_in, state_fork_copies = self.kv.take_state_moves()
        lora_loads, lora_forgets = self.lora.take_loads() if self.lora is not None else ([], [])
        message = StepMessage(described, new_seqs=self._take_announced(), finished_seq_ids=self._finished_seq_ids,
                              block_copies=copies, swap_out=swap_out, swap_in=swap_in,
                              state_swap_out=state_swap_out, state_swap_in=state_swap_in,
                              state_fork_copies=state_fork_copies,
                              lora_loads=lora_loads, lora_forgets=lora_forgets)
        self._finished_seq_ids = []
        return message, scheduled

    def _take_announced(self) -> list[NewSequence]:
        new_seqs = []
        for seq in self._announced:
            fork_parent = seq.request.seqs[0].seq_id if seq.index else None
            new_seqs.append(NewSequence(seq.seq_id, list(seq.token_ids), seq.num_prompt_tokens, seq.params,
                                        seq.index, fork_parent, seq.request.multimodal))
        self._announced = []
        return new_seqs

    def _describe(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        """This step's part of one sequence, as a diff against the runner's copy; advances the
        sequence as if the step had run (the next step may be scheduled before this one's results)."""
        start = seq.num_computed_tokens
        request = seq.request
        num_samples = 0
        drafts = seq.draft_token_ids  # counted in num_new; the KV of rejected ones is rolled back later
        if start + num_new - len(drafts) == seq.num_tokens + seq.num_in_flight:  # reaches the end: samples
            num_samples = 1
            if seq.index == 0 and request.num_forks_pending:  # n/best_of: forked on this step's samples
                num_samples += request.num_forks_pending
                request.num_forks_pending = 0
                self.kv.copy_state_to_forks(seq)
            seq.num_in_flight += 1
        wants_prompt_logprobs = (seq.index == 0 and seq.params.prompt_logprobs is not None
                                 and start < seq.num_prompt_tokens - 1
                                 and len(request.prompt_logprobs or ()) < seq.num_prompt_tokens)
        seq.num_computed_tokens = start + num_new
        replace = seq.block_table_rewritten
        new_block_ids = list(seq.block_table) if replace else seq.block_table[seq.num_sent_blocks:]
        seq.block_table_rewritten = False
        seq.num_sent_blocks = len(seq.block_table)
        return ScheduledSequence(
            seq_id=seq.seq_id, start_position=start, num_new_tokens=num_new, new_block_ids=new_block_ids,
            replace_block_table=replace, num_samples=num_samples,
            prompt_logprobs=seq.params.prompt_logprobs if wants_prompt_logprobs else None,
            state_slot=seq.state_slot, lora_slot=seq.lora_slot, draft_token_ids=list(drafts) if drafts else ())

    def reject_drafts(self, seq: Sequence, num_rejected: int) -> None:
        """Speculative decoding: the last `num_rejected` scheduled drafts were not kept, so their KV is not
        the sequence's; its computed count steps back and their blocks go back to the pool."""
        seq.num_computed_tokens -= num_rejected
        seq.draft_token_ids = []
        self.kv.free_blocks_past(seq, seq.num_computed_tokens + 1)

    def _preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's device blocks: its KV goes to host memory (swap) or is dropped."""
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._give_back_lora_slot(seq)
        seq.draft_token_ids = []
        if self.config.preemption_mode == "swap" and self.kv.swap_out(seq):
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
            return
        self.kv.free(seq)
        self._requeue_for_recompute(seq)

    def _requeue_for_recompute(self, seq: Sequence) -> None:
        """Keeps the tokens, forgets the KV, and goes back to the front of the queue."""
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        if seq.recompute_kv_at is not None and seq.num_tokens + seq.num_in_flight > seq.recompute_kv_at:
            # Recomputed whole past the threshold: the other kind of KV from now on, under other hashes.
            seq.recompute_kv_at = None
            seq.cache_salt = 1
            seq.block_hashes = []
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, front=True)

    def _set_kv_regime(self, seq: Sequence) -> None:
        limit = self.config.recompute_kv_at
        if limit is not None:
            short = seq.num_prompt_tokens <= limit
            seq.recompute_kv_at = limit if short else None
            seq.cache_salt = 0 if short else 1

    def _recompute_past_threshold(self, seq: Sequence) -> None:
        """The sequence grows past `recompute_kv_at`: its KV is dropped and recomputed whole (with
        LongRoPE's long factors), as transformers' Phi-3 generate() does."""
        self.running.remove(seq)
        self._give_back_lora_slot(seq)
        self.kv.free(seq)
        self._requeue_for_recompute(seq)

    def admit_forks(self, children: list[Sequence]) -> None:
        for child in children:
            self._set_kv_regime(child)
            self._take_lora_slot(child)  # the parent holds the adapter's slot: no load
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            self._announced.append(child)

    def finish(self, seq: Sequence) -> None:
        """Frees a finished or aborted sequence's blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
        self._give_back_lora_slot(seq)
        self.kv.free(seq, finished=True)
        seq.status = SequenceStatus.FINISHED
        self._finished_seq_ids.append(seq.seq_id)

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """fcfs: new work at the back, preempted work at the front. priority: by (priority, arrival), so a
        preempted sequence goes back to its place (a linear scan from the back: arrivals mostly land there)."""
        if not self.priority_policy:
            (self.waiting.appendleft if front else self.waiting.append)(seq)
            return
        position = len(self.waiting)
        while position and self.waiting[position - 1].priority_key > seq.priority_key:
            position -= 1
        self.waiting.insert(position, seq)

    def _victim(self, index: int) -> Sequence:
        """Whom a running sequence that lacks blocks preempts: the most recently admitted (fcfs), or the
        worst-priority one not scheduled yet this step (running[index:], itself included)."""
        if not self.priority_policy:
            victim = self.running.pop()
        else:
            victim = max(self.running[index:], key=lambda seq: seq.priority_key)
            self.running.remove(victim)
        return victim

    def _preempt_for_priority(self) -> None:
        """A waiting sequence of better priority than running ones, with no seat or no blocks left for its
        prompt, preempts the worst of them (before this step schedules anything), as vLLM's priority policy."""
        while self.waiting and self.running:
            head = self.waiting[0]
            worst = max(self.running, key=lambda seq: seq.priority_key)
            if worst.priority_key[0] <= head.priority_key[0]:
                break
            needs_seat = len(self.running) >= self.config.max_num_seqs
            wanted = min(head.num_tokens - head.num_computed_tokens, self.config.max_num_batched_tokens)
            needs_blocks = self.kv.pool.num_free_blocks * self.kv.block_size < wanted
            if not (needs_seat or needs_blocks):
                break
            self.running.remove(worst)
            self._preempt(worst)

    def _lora_slot_free(self, seq: Sequence) -> bool:
        """A sequence of an adapter with no GPU slot waits until a slot is idle (max_loras per step)."""
        return self.lora is None or self.lora.can_acquire(seq.lora_int_id)

    def _take_lora_slot(self, seq: Sequence) -> None:
        if self.lora is not None and seq.lora_slot < 0:
            seq.lora_slot = self.lora.acquire(seq.lora_int_id, seq.request.lora_adapter)

    def _give_back_lora_slot(self, seq: Sequence) -> None:
        if self.lora is not None and seq.lora_slot >= 0:
            self.lora.release(seq.lora_slot)
            seq.lora_slot = -1

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)


def _fit_images(seq: Sequence, start: int, count: int) -> int:
    """The chunk's length, shortened so that it ends inside no image of a family whose image tokens attend
    both ways (multimodal/inputs.py); 0 when it cannot finish the image it starts in."""
    images = seq.request.multimodal if seq.request is not None else None
    return count if images is None else images.chunk_length(start, count)
