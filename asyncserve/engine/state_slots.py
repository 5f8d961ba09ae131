"""Which state slot each sequence holds: the per-sequence recurrent state of hybrid models (conv and
DeltaNet states of their linear-attention layers, a fixed size per sequence) lives in a pool of slots
beside the paged KV pool, one per sequence that may run at once.

A sequence takes a slot when it is admitted and gives it back when it finishes or is preempted for
recompute (its state restarts from zeros with its prompt); a swap moves it to a host slot with its KV.
A request of several samples (n, best_of > 1) reserves its forks' slots when its first sequence is
admitted, so the forks always find one; the prompt's final state is copied into them right after the
step that completes the prompt, before a later step advances the parent's state. Pure Python over ints:
the runner holds the tensors (runner/state_pool.py) and zeroes a slot before a sequence's first token.
"""
from __future__ import annotations

from asyncserve.engine.sequence import Sequence


class StateSlotPool:
    def __init__(self, num_slots: int, num_host_slots: int = 0):
        self.num_slots = num_slots
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))  # popped from the end: 0 first
        self.free_host_slots: list[int] = list(range(num_host_slots - 1, -1, -1))
        # What the runner must do: swaps before this step's forward, fork copies after it.
        self.pending_swap_out: list[tuple[int, int]] = []  # (device slot, host slot)
        self.pending_swap_in: list[tuple[int, int]] = []   # (host slot, device slot)
        self.pending_fork_copies: list[tuple[int, int]] = []  # (parent's slot, fork's slot)

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def _forks_to_reserve(self, seq: Sequence) -> int:
        request = seq.request
        if seq.index or request is None:
            return 0
        return max(0, request.num_forks_pending - len(request.fork_state_slots))

    def can_admit(self, seq: Sequence) -> bool:
        """Whether a sequence without a slot can get one, and its request's forks theirs."""
        return seq.state_slot is not None or 1 + self._forks_to_reserve(seq) <= len(self.free_slots)

    def admit(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            return
        reserve = self._forks_to_reserve(seq)
        if 1 + reserve > len(self.free_slots):
            raise RuntimeError(f"{seq} was admitted without a free state slot (check can_admit first)")
        seq.state_slot = self.free_slots.pop()
        if reserve:
            seq.request.fork_state_slots.extend(self.free_slots.pop() for _ in range(reserve))

    def copy_to_forks(self, parent: Sequence) -> None:
        """The step being scheduled completes the parent's prompt: after it, the forks' reserved slots
        receive the parent's state (the forks themselves are made once its samples are read)."""
        for slot in parent.request.fork_state_slots:
            self.pending_fork_copies.append((parent.state_slot, slot))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child takes a slot its request reserved (holding the parent's state after the prompt)."""
        reserved = parent.request.fork_state_slots
        if reserved:
            child.state_slot = reserved.pop()
        elif self.free_slots:  # a request whose reservation was dropped (never admitted as a whole)
            child.state_slot = self.free_slots.pop()
        else:
            raise RuntimeError(f"no state slot left for a fork of {parent}")

    def free(self, seq: Sequence, finished: bool = False) -> None:
        """Gives back the sequence's slots; once its request is over (`finished`), its unused reservations."""
        if seq.state_slot is not None:
            self.free_slots.append(seq.state_slot)
            seq.state_slot = None
        if seq.host_state_slot is not None:
            self.free_host_slots.append(seq.host_state_slot)
            seq.host_state_slot = None
        request = seq.request
        if finished and not seq.index and request is not None and request.fork_state_slots:
            self.free_slots.extend(request.fork_state_slots)
            request.fork_state_slots = []

    def can_swap_out(self, seq: Sequence) -> bool:
        return seq.state_slot is None or bool(self.free_host_slots)

    def swap_out(self, seq: Sequence) -> None:
        if seq.state_slot is None:
            return
        host = self.free_host_slots.pop()
        self.pending_swap_out.append((seq.state_slot, host))
        self.free_slots.append(seq.state_slot)
        seq.state_slot, seq.host_state_slot = None, host

    def can_swap_in(self, seq: Sequence) -> bool:
        return seq.host_state_slot is None or bool(self.free_slots)

    def swap_in(self, seq: Sequence) -> None:
        if seq.host_state_slot is None:
            return
        slot = self.free_slots.pop()
        self.pending_swap_in.append((seq.host_state_slot, slot))
        self.free_host_slots.append(seq.host_state_slot)
        seq.state_slot, seq.host_state_slot = slot, None

    def take_moves(self) -> tuple[list, list, list]:
        """(swap_out, swap_in, fork copies) for this step's message."""
        moves = self.pending_swap_out, self.pending_swap_in, self.pending_fork_copies
        self.pending_swap_out, self.pending_swap_in, self.pending_fork_copies = [], [], []
        return moves

    def check_invariants(self, seqs: list[Sequence], reserved: list[int] = ()) -> None:
        """Every slot is free, held by exactly one live sequence, or reserved for a fork."""
        held = [seq.state_slot for seq in seqs if seq.state_slot is not None] + list(reserved)
        everything = sorted(held + self.free_slots)
        if everything != list(range(self.num_slots)):
            raise AssertionError(f"state slots leaked or shared: held {sorted(held)}, free {sorted(self.free_slots)}")
