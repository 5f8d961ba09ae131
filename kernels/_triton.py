"""Optional Triton import: kernel modules import `triton`/`tl` from here so that
`asyncserve.kernels` loads (and the torch references run) where triton is absent."""

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _TritonMissing:
        """Stands in for `triton` and `triton.language` at import time; any launch raises."""

        constexpr = None  # only read as a parameter annotation

        def jit(self, fn=None, **_options):
            return self if fn is not None else (lambda _fn: self)

        def __getitem__(self, _grid):
            raise ModuleNotFoundError("triton is not installed: use the *_ref kernels")

    triton = tl = _TritonMissing()


def use_triton(tensor: torch.Tensor) -> bool:
    """The dispatchers run Triton for CUDA tensors only; CPU tensors take the torch reference."""
    return HAS_TRITON and tensor.is_cuda


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
