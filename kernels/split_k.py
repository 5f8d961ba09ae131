"""K-split products that meet in one kernel: the epilogue every split runs, and the fp32 workspace it meets in.

Few rows leave too few output tiles to fill the SMs, so K is split among several programs per tile. Their
partial sums meet either in the output (fp32 atomics; a memset before and a cast after: two more kernels) or
in a workspace reserved at load, where the last split to arrive at a tile stores it in the output's dtype
and zeroes what it used: one kernel in all, and graph capture allocates nothing.
"""

import torch

from ._triton import tl, triton

# How a kernel's K-splits meet (SPLITS): one split stores its tile; the splits add into an fp32 output that a
# cast follows; or they add into the zeroed workspace and the last one to arrive stores the tile.
STORE, ADD_INTO_OUTPUT, MEET_IN_WORKSPACE = 0, 1, 2


@triton.jit
def store_split(acc, out_ptrs, ws_ptrs, mask, arrivals_ptr, tile, num_splits, SPLITS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The epilogue of a split-K tile `acc` [BLOCK_M, BLOCK_N] (see STORE, ADD_INTO_OUTPUT, MEET_IN_WORKSPACE)."""
    if SPLITS == 0:  # STORE
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
    elif SPLITS == 1:  # ADD_INTO_OUTPUT
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:  # MEET_IN_WORKSPACE
        # The splits add into the zeroed fp32 workspace; the last to arrive at this tile (one counter per
        # tile, as CUTLASS's split-K semaphore: barrier, then a release by one thread) takes the sums out,
        # zeroing them again for the next call, and stores them in the output's dtype.
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            tl.debug_barrier()
            # Read and zeroed in one atomic (at L2, where the other splits' adds landed), on the bits.
            bits = tl.atomic_xchg(ws_ptrs.to(tl.pointer_type(tl.int32)), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32),
                                  mask=mask, sem="relaxed")
            bits = tl.where(mask, bits, 0)  # masked lanes return nothing defined
            tl.store(out_ptrs, bits.to(tl.float32, bitcast=True).to(out_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(arrivals_ptr + tile, 0, sem="relaxed")



# Per device: (fp32 workspace of SPLIT_K_MAX_ROWS x N values, int32 arrival counters per output tile), all zero
# between calls: each call's last split per tile zeroes what it used. The GPU runs one product at a time.
_split_k_workspace: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
SPLIT_K_MAX_ROWS = 128  # the most rows a K-split product meets in the workspace
MIN_TILE = 16  # the smallest BLOCK_M and BLOCK_N of any config: one counter per tile of that size


def reserve_split_k_workspace(n: int, device: torch.device) -> None:
    """Grows the K-splits' workspace to hold up to SPLIT_K_MAX_ROWS rows of N = `n` outputs. Called at load
    time, so that CUDA-graph capture never allocates it (a product that finds it too small while capturing
    adds into its output instead, with a memset before and a cast after)."""
    device = _indexed(device)
    current = _split_k_workspace.get(device)
    if current is None or current[0].numel() < SPLIT_K_MAX_ROWS * n:
        tiles = triton.cdiv(SPLIT_K_MAX_ROWS, MIN_TILE) * triton.cdiv(n, MIN_TILE)
        _split_k_workspace[device] = (torch.zeros(SPLIT_K_MAX_ROWS * n, dtype=torch.float32, device=device),
                                      torch.zeros(tiles, dtype=torch.int32, device=device))


def _indexed(device) -> torch.device:
    """'cuda' as the tensors' own 'cuda:<current>', so both name one workspace."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def split_output(m: int, n: int, num_splits: int, meet_in_workspace: bool, x: torch.Tensor):
    """(out, workspace, arrivals, SPLITS) for a product of `num_splits` K-splits: see STORE, ADD_INTO_OUTPUT,
    MEET_IN_WORKSPACE. The workspace is made here when missing, except while a CUDA graph is captured."""
    workspace = None
    if num_splits > 1 and meet_in_workspace and m * n and m <= SPLIT_K_MAX_ROWS:
        workspace = _split_k_workspace.get(x.device)
        if workspace is None or workspace[0].numel() < m * n:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                workspace = None
            else:
                reserve_split_k_workspace(n, x.device)
                workspace = _split_k_workspace[x.device]
    if workspace is not None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        return out, workspace[0], workspace[1], MEET_IN_WORKSPACE
    if num_splits > 1:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        return out, out, out, ADD_INTO_OUTPUT
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    return out, out, out, STORE


