"""Which LoRA adapter sits in which GPU slot, and which adapters stay loaded in host memory.

Pure Python beside the scheduler: a sequence of an adapter takes that adapter's slot when it is admitted
(loading it into a free slot if needed, the least recently used idle slot first) and gives it back when it
is preempted or finishes; a sequence whose adapter has no slot and finds none idle waits, so at most
`max_loras` adapters run in one step. A slot load travels to the runner with the next step message. Adapters
read from disk (PEFT's files) stay in host memory, the `max_cpu_loras` most recently used of them.

The runner (every tensor-parallel rank's) keeps the weights of the last `max_cpu_loras` adapters it was sent,
so a slot load carries an adapter's weights only the first time: afterwards, its id. This manager decides
what the runners keep (they only follow the message), so the two never disagree.
"""
from __future__ import annotations

from collections import OrderedDict

from asyncserve.checkpoints.peft_adapter import LoRAAdapter, load_peft_adapter
from asyncserve.config.lora import LoRAConfig
from asyncserve.errors import LoRAAdapterError
from asyncserve.lora_request import LoRARequest

NO_LORA = -1  # the runner's slot of a row without an adapter


class LoRAManager:
    def __init__(self, config: LoRAConfig, packed_modules_mapping: dict[str, tuple[str, ...]],
                 shapes: dict[str, tuple[int, list[int]]] | None = None):
        self.config = config
        self.packed_modules_mapping = packed_modules_mapping
        self.shapes = shapes  # the model's adaptable layers (checkpoint names): (input size, output slices)
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # lora_int_id -> adapter, LRU order
        self.requests: dict[int, LoRARequest] = {}
        self.slot_of: dict[int, int] = {}          # lora_int_id -> GPU slot
        self.users = [0] * config.max_loras        # running sequences per slot
        self.occupant: list[int | None] = [None] * config.max_loras
        self.idle_order: OrderedDict[int, None] = OrderedDict((slot, None) for slot in range(config.max_loras))
        # (slot, lora id, weights or None where the runner keeps them, scaling) for the runner
        self.pending_loads: list[tuple[int, int, dict | None, float]] = []
        self.runner_keeps: OrderedDict[int, None] = OrderedDict()  # adapters whose weights runners hold, LRU
        self.pending_forgets: set[int] = set()  # adapters the runners drop (after the step's loads)
        self.num_slot_loads = 0

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter's files read and checked, touching nothing shared: the server calls it off the loop."""
        adapter = load_peft_adapter(request.lora_name, request.lora_path, self.packed_modules_mapping)
        if adapter.rank > self.config.max_lora_rank:
            raise LoRAAdapterError(f"Adapter {request.lora_name!r} has rank {adapter.rank}, over max_lora_rank="
                                   f"{self.config.max_lora_rank}: raise max_lora_rank (--max-lora-rank).")
        if self.shapes is not None:
            self._check_shapes(request, adapter)
        return adapter

    def _check_shapes(self, request: LoRARequest, adapter: LoRAAdapter) -> None:
        """An adapter of another base model is refused here, before any of it reaches a GPU slot."""
        for module, pairs in adapter.weights.items():
            shape = self.shapes.get(module)
            if shape is None:
                raise LoRAAdapterError(f"Adapter {request.lora_name!r} adapts {module}, which this model does not "
                                       "have (or does not adapt): was it trained on another base model?")
            in_features, widths = shape
            for pair, width in zip(pairs, widths):
                if pair is not None and (pair[0].shape[1] != in_features or pair[1].shape[0] != width):
                    raise LoRAAdapterError(
                        f"Adapter {request.lora_name!r}'s {module} maps {pair[0].shape[1]} -> {pair[1].shape[0]}, "
                        f"this model's {in_features} -> {width}: it was trained on another base model.")

    def is_loaded(self, request: LoRARequest) -> bool:
        return request.lora_int_id in self.host

    def forget(self, lora_id: int) -> None:
        """An unloaded adapter: dropped from host memory; a GPU slot holding it is reused when idle."""
        self.requests.pop(lora_id, None)
        if lora_id not in self.slot_of:
            self.host.pop(lora_id, None)
        self._runner_forgets(lora_id)  # its id may come back with other weights

    def register(self, request: LoRARequest, adapter: LoRAAdapter | None = None) -> LoRAAdapter:
        """Checks and loads a request's adapter once (from disk, into host memory; or `adapter`, read
        already); later calls reuse it."""
        known = self.requests.get(request.lora_int_id)
        if known is not None and (known.lora_path, known.lora_name) != (request.lora_path, request.lora_name):
            raise LoRAAdapterError(f"lora_int_id {request.lora_int_id} is already adapter {known.lora_name!r} "
                                   f"({known.lora_path}); give {request.lora_name!r} another id.")
        if adapter is None:
            adapter = self.host.get(request.lora_int_id)
        if adapter is None:
            adapter = self.read(request)
        if request.lora_int_id not in self.host:
            self.host[request.lora_int_id] = adapter
            self._trim_host(keep=request.lora_int_id)
        self.host.move_to_end(request.lora_int_id)
        self.requests[request.lora_int_id] = request
        return adapter

    def _trim_host(self, keep: int) -> None:
        while len(self.host) > self.config.num_cpu_loras:
            for lora_id in self.host:  # the least recently used one that no slot needs reloaded from
                if lora_id not in self.slot_of and lora_id != keep:
                    del self.host[lora_id]
                    break
            else:
                return

    def can_acquire(self, lora_id: int) -> bool:
        return not lora_id or lora_id in self.slot_of or bool(self.idle_order)

    def acquire(self, lora_id: int, adapter: LoRAAdapter | None = None) -> int:
        """The adapter's slot for one more running sequence (loading it into an idle slot if it has none);
        `adapter`: the weights its request holds, so a slot load never reads files on the scheduler's path."""
        if not lora_id:
            return NO_LORA
        slot = self.slot_of.get(lora_id)
        if slot is None:
            slot, _ = self.idle_order.popitem(last=False)
            previous = self.occupant[slot]
            if previous is not None:
                del self.slot_of[previous]
            self.occupant[slot], self.slot_of[lora_id] = lora_id, slot
            adapter = adapter or self.host.get(lora_id)
            if adapter is None:  # neither held nor kept in host memory: read it again
                adapter = self.register(self.requests[lora_id])
            self.pending_loads.append((slot, lora_id, self._ship(lora_id, adapter.weights), adapter.scaling))
            self.num_slot_loads += 1
        elif self.users[slot] == 0:
            del self.idle_order[slot]
        self.users[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot == NO_LORA:
            return
        self.users[slot] -= 1
        if self.users[slot] == 0:
            self.idle_order[slot] = None  # stays loaded: the next sequence of this adapter needs no copy

    def _ship(self, lora_id: int, weights: dict) -> dict | None:
        """The weights a slot load carries: None where the runners keep them already."""
        if lora_id in self.runner_keeps:
            self.runner_keeps.move_to_end(lora_id)
            return None
        self.runner_keeps[lora_id] = None
        self.pending_forgets.discard(lora_id)
        while len(self.runner_keeps) > self.config.num_cpu_loras:
            self._runner_forgets(next(iter(self.runner_keeps)))
        return weights

    def _runner_forgets(self, lora_id: int) -> None:
        if lora_id in self.runner_keeps:
            del self.runner_keeps[lora_id]
            self.pending_forgets.add(lora_id)

    def take_loads(self) -> tuple[list[tuple[int, int, dict | None, float]], list[int]]:
        """The next step message's slot loads, and the adapters the runners drop after them."""
        loads, forgets = self.pending_loads, sorted(self.pending_forgets)
        self.pending_loads, self.pending_forgets = [], set()
        return loads, forgets
