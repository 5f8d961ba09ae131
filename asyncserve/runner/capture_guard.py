"""A check around CUDA-graph capture: the captured forward may not build tensors from host data or copy
from the host. Such a copy is recorded with its host address and replays whatever that memory holds later;
a table built lazily inside the capture (an lru_cache that missed) lives in the graph's pool, where later
replays overwrite it. CUDA refuses only some of these (a synchronous copy); this names every one that
passes through torch's dispatcher, with the op, before the capture ends.

It runs where `ASYNCSERVE_CHECK_CAPTURES=1` (the GPU tests set it): a dispatch mode around every capture
costs start-up time, and it was written without a GPU run, so a case it misjudges must not stop a server.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_FROM_HOST_DATA = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)


class HostCopyInCapture(RuntimeError):
    """A captured forward built a tensor from host data or copied one from the host."""


def _copies_host_data(func, args, kwargs) -> bool:
    """A tensor made from Python data (not a 0-dim one: torch passes those to kernels as scalars), or a
    copy from host memory to a device."""
    if func in _FROM_HOST_DATA:
        return args[0].dim() > 0
    if func is torch.ops.aten._to_copy.default:
        source, target = args[0].device, kwargs.get("device")
    elif func is torch.ops.aten.copy_.default and isinstance(args[1], torch.Tensor):
        source, target = args[1].device, args[0].device
    else:
        return False
    return source.type == "cpu" and target is not None and torch.device(target).type != "cpu"


class no_host_copies(TorchDispatchMode):
    """Raises HostCopyInCapture at the first host -> device copy, or tensor made from Python data, inside
    the block."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _copies_host_data(func, args, kwargs):
            raise HostCopyInCapture(f"{self.what}: {func} copies host data into the graph; build such tensors "
                                    "on the device before capture (they would replay stale or overwritten "
                                    "values)")
        return func(*args, **kwargs)


def capture_check(what: str):
    """`no_host_copies(what)` where ASYNCSERVE_CHECK_CAPTURES=1, else nothing."""
    return no_host_copies(what) if os.environ.get("ASYNCSERVE_CHECK_CAPTURES") == "1" else contextlib.nullcontext()
