"""A kernel's hot loop as Hopper runs it, without a GPU: compile for sm_90a, disassemble, count the loop's
instructions by kind (per weight code where the kernel unpacks codes).

    python scripts/kernel_sass.py gemv --tile 32 64 4 4 3     # the installed Triton (its wheel ships cuobjdump)
    pip install --no-deps --target /tmp/t36 triton==3.6.0     # or the GPU machine's version:
    PYTHONPATH=/tmp/t36 python scripts/kernel_sass.py gemv --tile 32 64 4 4 3
    PYTHONPATH=/tmp/t36 python scripts/kernel_sass.py mma --tile 64 64 1 4 3 --permute-x

What it answers is what changes when a kernel changes: instructions per code, barriers, shared-memory stores,
asynchronous copies, registers and spills (cuobjdump -res-usage); what it cannot is time: a kernel with fewer
instructions may still wait on memory. Integer arguments that are multiples of 16 at run time are declared so (as Triton specializes
them at launch), or the loads it compiles are narrower than the real ones. Run it without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


# Arguments that are multiples of 16 at run time (pointers, K, N, the strides), as Triton's launcher declares them.
_DIVISIBLE = ("N", "K", "stride_xm", "stride_qk", "stride_sg", "stride_om")


def _kernel(name: str, tile: list[int], permute_x: bool):
    """(jit function, constexprs, num_warps, num_stages, codes per program per loop iteration)."""
    if name == "gemv":  # tile: BLOCK_N, BLOCK_KP, SPLIT_K, warps, stages (one row, int4, groups of 128)
        block_n, block_kp, split_k, warps, stages = tile
        consts = dict(GROUP_SIZE=128, BITS=4, PER=8, BLOCK_M=1, BLOCK_N=block_n, BLOCK_KP=block_kp,
                      SPLIT_K=split_k, ONE_GROUP=128 % (block_kp * 8) == 0, SPLITS=2 if split_k > 1 else 0)
        module = importlib.import_module("asyncserve.kernels.quant_gemm")  # the package re-exports the op's name
        if "MASK" in module._quant_gemv_kernel.arg_names:  # the kernel before e6e9c37, to compare
            consts["MASK"] = 15
        return module._quant_gemv_kernel, consts, warps, stages, block_n * block_kp * 8
    # tensor-core product; tile: BLOCK_N, BLOCK_M, SPLIT_K, warps, stages (bf16, int4, groups of 128)
    block_n, block_m, split_k, warps, stages = tile
    consts = dict(GROUP_SIZE=128, MAGIC=0x4300, MAGIC_VALUE=128.0, BLOCK_N=block_n, BLOCK_M=block_m,
                  SPLITS=2 if split_k > 1 else 0, PERMUTED_X=permute_x)
    return importlib.import_module("asyncserve.kernels.quant_gemv_mma")._quant_gemm_mma_kernel, consts, warps, stages, block_n * 128


def _signature(fn, consts: dict) -> tuple[dict, dict]:
    names = list(fn.arg_names)
    pointer_types = {"qw_ptr": "*i32", "ws_ptr": "*fp32", "arrivals_ptr": "*i32"}
    signature = {n: ("constexpr" if n in consts else pointer_types.get(n, "*bf16") if n.endswith("_ptr") else "i32")
                 for n in names}
    divisible = [n for n in names if n.endswith("_ptr") or n in _DIVISIBLE]
    return signature, {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}


def _hot_loop(sass: str) -> list[str]:
    """The instructions of the longest backward branch's body."""
    instructions = [(int(m.group(1), 16), m.group(2).strip())
                    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), address) for address, text in instructions
             if (m := re.search(r"BRA (?:\S+ )?(0x[0-9a-f]+)", text)) and int(m.group(1), 16) < address]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return [text for address, text in instructions if start <= address <= end]


def _opcode(text: str) -> str:
    op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
    parts = op.split(".")
    return ".".join(parts[:2]) if parts[0] in ("HGMMA", "BAR", "WARPGROUP") else parts[0]


def analyse(kernel: str, tile: list[int], permute_x: bool = False) -> dict:
    """The compiled kernel's hot loop: {"counts": {opcode: n}, "instructions", "per_code", "registers",
    "stack", "shared", "threads", "codes"}."""
    fn, consts, warps, stages, codes = _kernel(kernel, tile, permute_x)
    signature, attrs = _signature(fn, consts)
    names = list(fn.arg_names)
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        open(cubin, "wb").write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    loop = _hot_loop(sass)
    counts: dict[str, int] = {}
    for text in loop:
        counts[_opcode(text)] = counts.get(_opcode(text), 0) + 1
    threads = warps * 32
    registers, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return dict(counts=counts, instructions=len(loop), per_code=len(loop) * threads / codes, threads=threads,
                codes=codes, registers=int(registers.group(1)) if registers else None,
                stack=int(stack.group(1)) if stack else None, shared=compiled.metadata.shared)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", choices=["gemv", "mma"])
    parser.add_argument("--tile", type=int, nargs=5, required=True, metavar="N")
    parser.add_argument("--permute-x", action="store_true", help="mma: x reordered once per call")
    parser.add_argument("--json", action="store_true", help="print analyse()'s dict as JSON instead")
    args = parser.parse_args()
    result = analyse(args.kernel, args.tile, args.permute_x)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.kernel} {tuple(args.tile)}{' x reordered' if args.permute_x else ''}, sm_90a, Triton "
          f"{triton.__version__}: {result['registers']} registers, {result['stack']} bytes of stack (spills), "
          f"{result['shared']} bytes shared")
    print(f"hot loop: {result['instructions']} instructions per thread per iteration, {result['per_code']:.2f} per "
          f"weight code ({result['codes']} codes per iteration over {result['threads']} threads)")
    print("  " + ", ".join(f"{op} {n}" for op, n in sorted(result["counts"].items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
