"""The LoRA manager's slot loads as the runner (every tensor-parallel rank's) receives them: an adapter's weights
travel with the first load only, the runner keeps the `max_cpu_loras` adapters the manager says, and an
adapter evicted from that set or unloaded travels whole again next time."""
from __future__ import annotations

from types import SimpleNamespace

from asyncserve.checkpoints.peft_adapter import LoRAAdapter
from asyncserve.config.lora import LoRAConfig
from asyncserve.engine.lora_manager import LoRAManager
from asyncserve.lora_request import LoRARequest
from asyncserve.runner.model_runner import ModelRunner
from asyncserve.runner.step import StepMessage


class _Runner:
    """The runner's side of the message: its real `_load_lora_slots`, over slots that record each load."""

    def __init__(self):
        self.lora_weights: dict[int, dict] = {}
        self.loaded: list[tuple[int, dict]] = []
        self.lora_slots = SimpleNamespace(load=lambda slot, weights, scaling: self.loaded.append((slot, weights)))

    def step(self, manager: LoRAManager) -> list[bool]:
        """Applies the manager's next message; for each slot load, whether it carried the weights."""
        loads, forgets = manager.take_loads()
        ModelRunner._load_lora_slots(self, StepMessage([], lora_loads=loads, lora_forgets=forgets))
        return [weights is not None for _, _, weights, _ in loads]


ADAPTERS = {lora_id: LoRAAdapter(f"a{lora_id}", f"/a{lora_id}", 4, 1.0, ["o_proj"],
                                 {"layers.0.o_proj": [(lora_id,)]})  # weights opaque to the manager and runner
            for lora_id in (1, 2, 3)}


def _manager(max_cpu_loras: int) -> tuple[LoRAManager, dict[int, dict]]:
    manager = LoRAManager(LoRAConfig(max_loras=1, max_lora_rank=8, max_cpu_loras=max_cpu_loras), {})
    for lora_id, adapter in ADAPTERS.items():
        manager.register(LoRARequest(adapter.name, lora_id, adapter.path), adapter)
    return manager, {lora_id: adapter.weights for lora_id, adapter in ADAPTERS.items()}


def _run(manager: LoRAManager, runner: _Runner, lora_id: int) -> list[bool]:
    """One sequence of adapter `lora_id` (holding its request's adapter, as the scheduler's sequences do) runs
    alone in the one slot, then finishes."""
    slot = manager.acquire(lora_id, ADAPTERS[lora_id])
    shipped = runner.step(manager)
    manager.release(slot)
    assert runner.loaded[-1] == (0, runner.lora_weights[lora_id])
    return shipped


def test_an_adapters_weights_reach_the_runner_once_while_it_keeps_them():
    manager, weights = _manager(max_cpu_loras=2)
    runner = _Runner()
    assert [_run(manager, runner, lora_id) for lora_id in (1, 2, 1, 2)] == [[True], [True], [False], [False]]
    assert runner.lora_weights == {1: weights[1], 2: weights[2]}
    assert manager.num_slot_loads == 4


def test_an_adapter_evicted_from_the_runners_keep_or_unloaded_travels_again():
    manager, weights = _manager(max_cpu_loras=2)
    runner = _Runner()
    assert [_run(manager, runner, lora_id) for lora_id in (1, 2, 3)] == [[True], [True], [True]]
    assert set(runner.lora_weights) == {2, 3}  # 1 was the least recently loaded
    assert _run(manager, runner, 1) == [True]
    manager.forget(3)
    runner.step(manager)
    assert set(runner.lora_weights) == {1}
