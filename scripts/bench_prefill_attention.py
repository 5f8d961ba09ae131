"""Prefill attention at Llama-3.1-8B's shape (32 query heads, 8 KV heads, D=128, bf16, the default
block size): our per-head kernel (v1), the GQA-packed kernel (v2) with its table's tile and a sweep of
tiles, our torch path (gather + torch's flash/cuDNN), and torch's own fused attention on the same data
laid out contiguously, the floor we measure against.

    python scripts/bench_prefill_attention.py --out prefill.json          # ~2 minutes on an H100
    python scripts/bench_prefill_attention.py --sweep none                # no tile sweep
    python scripts/bench_prefill_attention.py --smoke                     # tiny shapes, any device (CI)

Cases: one sequence of 16k and of 32k tokens in 8192-token chunks, each chunk attending to its paged
context as chunked prefill runs (the case's time is the sum of its chunks); 16 prompts of 512 tokens;
a mixed step of 64 decodes (~600 tokens of context) and one 512-token chunk (1536 cached), all through
the prefill kernel. TFLOP/s counts causal FLOPs (4 * heads * D * visible keys per query). Every
variant's output is checked against v1's (relative error; "WRONG" past 2e-2); a variant that fails to
build or run is reported and skipped.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

from asyncserve.config.engine_args import EngineConfig
from asyncserve.kernels import attention_prefill_gqa as gqa
from asyncserve.kernels.attention_prefill import paged_prefill_attention_v1
from asyncserve.kernels.attention_prefill_sdpa import paged_prefill_attention_sdpa

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
BLOCK_SIZE = EngineConfig.__dataclass_fields__["block_size"].default
CHUNK = 8192  # max_num_batched_tokens of chunked prefill
SWEEPS = {
    "none": [],
    "small": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3),
              (128, 64, 8, 2), (128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 8, 2), (64, 64, 4, 4)],
    "full": [(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)],
}


@dataclass
class Step:
    """One kernel call: the prefill kernel's arguments, and the same data laid out contiguously."""

    args: tuple
    query_lens: list[int]
    seq_lens: list[int]
    flops: float
    dense: dict = field(default_factory=dict)  # filled lazily by _dense


@dataclass
class Case:
    name: str
    steps: list[Step]

    @property
    def flops(self) -> float:
        return sum(step.flops for step in self.steps)


def _causal_flops(query_lens, seq_lens) -> float:
    visible = sum(q * (s - q) + q * (q + 1) / 2 for q, s in zip(query_lens, seq_lens))
    return 4.0 * NUM_HEADS * HEAD_DIM * visible


class Pool:
    """A KV pool whose blocks are handed out in shuffled order, as a long-running engine's are."""

    def __init__(self, num_tokens, dtype, device, seed=0):
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.num_blocks = num_tokens // BLOCK_SIZE + 256
        shape = (self.num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, generator=self.gen, device=device).to(dtype)
        self.v_cache = torch.randn(shape, generator=self.gen, device=device).to(dtype)
        self.order = torch.randperm(self.num_blocks, generator=self.gen, device=device).to(torch.int32)
        self.used = 0
        self.dtype, self.device = dtype, device

    def table(self, length) -> torch.Tensor:
        count = -(-length // BLOCK_SIZE)
        blocks = self.order[self.used:self.used + count]
        self.used += count
        return blocks

    def step(self, tables, query_lens, seq_lens) -> Step:
        width = max(t.numel() for t in tables)
        block_tables = torch.zeros(len(tables), width, dtype=torch.int32, device=self.device)
        for row, table in enumerate(tables):
            block_tables[row, :table.numel()] = table
        query = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=self.gen,
                            device=self.device).to(self.dtype)
        starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32,
                              device=self.device)
        lengths = torch.tensor(seq_lens, dtype=torch.int32, device=self.device)
        args = (query, self.k_cache, self.v_cache, block_tables, lengths, starts, max(query_lens),
                max(seq_lens), HEAD_DIM ** -0.5)
        return Step(args, list(query_lens), list(seq_lens), _causal_flops(query_lens, seq_lens))


def build_cases(pool: Pool, long_lengths, chunk, batch, batch_len, decodes, mixed_chunk, mixed_context):
    cases = []
    for total in long_lengths:
        table = pool.table(total)
        steps = [pool.step([table], [min(chunk, total - start)], [min(start + chunk, total)])
                 for start in range(0, total, chunk)]
        cases.append(Case(f"{total} tokens in {chunk}-token chunks", steps))
    tables = [pool.table(batch_len) for _ in range(batch)]
    cases.append(Case(f"{batch}x{batch_len} prompts", [pool.step(tables, [batch_len] * batch, [batch_len] * batch)]))
    gen = torch.Generator().manual_seed(1)
    contexts = (torch.randint(-50, 51, (decodes,), generator=gen) + 600).tolist()
    tables = [pool.table(length) for length in contexts] + [pool.table(mixed_context + mixed_chunk)]
    cases.append(Case(f"mixed: {decodes} decodes + {mixed_chunk}-token chunk",
                      [pool.step(tables, [1] * decodes + [mixed_chunk], contexts + [mixed_context + mixed_chunk])]))
    return cases


def _dense(step: Step):
    """Contiguous K/V of each sequence: varlen [sum L, Hkv, D]; padded-free batch [B, H, L, D] when all
    sequences have the same shape (K/V repeated over the query heads of each KV head)."""
    if step.dense:
        return step.dense
    query, k_cache, v_cache, block_tables = step.args[:4]
    keys, values = [], []
    for row, length in enumerate(step.seq_lens):
        blocks = block_tables[row, :-(-length // BLOCK_SIZE)].long()
        keys.append(k_cache[blocks].flatten(0, 1)[:length])
        values.append(v_cache[blocks].flatten(0, 1)[:length])
    step.dense["k"], step.dense["v"] = torch.cat(keys), torch.cat(values)
    step.dense["cu_k"] = torch.tensor([0] + torch.tensor(step.seq_lens).cumsum(0).tolist(),
                                      dtype=torch.int32, device=query.device)
    if len(set(step.seq_lens)) == 1 and len(set(step.query_lens)) == 1:
        batch, q_len, length = len(step.seq_lens), step.query_lens[0], step.seq_lens[0]
        group = NUM_HEADS // NUM_KV_HEADS

        def heads_first(x, length, heads):
            return x.reshape(batch, length, heads, HEAD_DIM).transpose(1, 2)

        step.dense["q4"] = heads_first(query, q_len, NUM_HEADS)
        step.dense["k4"] = heads_first(step.dense["k"], length, NUM_KV_HEADS)
        step.dense["v4"] = heads_first(step.dense["v"], length, NUM_KV_HEADS)
        step.dense["k4x"] = step.dense["k4"].repeat_interleave(group, dim=1)
        step.dense["v4x"] = step.dense["v4"].repeat_interleave(group, dim=1)
    return step.dense


def _from_heads_first(out4):
    return out4.transpose(1, 2).flatten(0, 1)  # [B, H, q, D] -> [B * q, H, D]


# ---- variants: each maps a Step to a zero-argument callable returning out [T, H, D], or raises ----

def ours_v1(step):
    return lambda: paged_prefill_attention_v1(*step.args)


def ours_v2(tile=None):
    if tile is not None:
        tile = gqa.PrefillTile(*tile)
    return lambda step: (lambda: gqa.paged_prefill_attention_gqa(*step.args, tile=tile))


def ours_sdpa(backend):
    def make(step):
        if len(step.seq_lens) != 1:
            raise NotImplementedError("one sequence only")
        return lambda: paged_prefill_attention_sdpa(*step.args, backend=backend)
    return make


def torch_sdpa(backend_name, gqa_native):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    backend = getattr(SDPBackend, backend_name)

    def make(step):
        dense = _dense(step)
        if "q4" not in dense:
            raise NotImplementedError("sequences of different lengths")
        q, k, v = dense["q4"], dense["k4" if gqa_native else "k4x"], dense["v4" if gqa_native else "v4x"]
        q_len, length = step.query_lens[0], step.seq_lens[0]
        kwargs = dict(scale=step.args[-1], enable_gqa=gqa_native)
        if q_len == length:
            kwargs["is_causal"] = True
        else:
            kwargs["attn_mask"] = causal_lower_right(q_len, length)

        def run():
            with sdpa_kernel([backend]):
                return _from_heads_first(F.scaled_dot_product_attention(q, k, v, **kwargs))
        return run
    return make


def torch_flash_varlen(step):
    """torch's FlashAttention-2 over varlen contiguous K/V (GQA native, causal aligned bottom-right)."""
    dense = _dense(step)
    query, _, _, _, _, starts, max_q, max_k, scale = step.args
    return lambda: torch.ops.aten._flash_attention_forward(
        query, dense["k"], dense["v"], starts, dense["cu_k"], max_q, max_k, 0.0, True, False, scale=scale)[0]


def torch_cudnn_varlen(step):
    """torch's cuDNN attention over varlen contiguous K/V repeated over the query heads; whether its
    causal mask is aligned bottom-right for chunks after context shows in the error column."""
    dense = _dense(step)
    query, _, _, _, _, starts, max_q, max_k, scale = step.args
    group = NUM_HEADS // NUM_KV_HEADS
    keys, values = dense["k"].repeat_interleave(group, dim=1), dense["v"].repeat_interleave(group, dim=1)
    return lambda: torch.ops.aten._cudnn_attention_forward(
        query, keys, values, None, starts, dense["cu_k"], max_q, max_k, False, 0.0, True, False, scale=scale)[0]


def torch_varlen_attn(paged):
    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters

    def make(step):
        query, k_cache, v_cache, block_tables, seq_lens, starts, max_q, max_k, scale = step.args
        kwargs = {"scale": scale}
        if "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            kwargs["window_size"] = (-1, 0)
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        if paged:
            if "block_table" not in params:
                raise NotImplementedError("varlen_attn has no block_table here")
            kwargs.update(block_table=block_tables, seqused_k=seq_lens)
            return lambda: varlen_attn(query, k_cache, v_cache, starts, None, max_q, max_k, **kwargs)
        dense = _dense(step)
        return lambda: varlen_attn(query, dense["k"], dense["v"], starts, dense["cu_k"], max_q, max_k, **kwargs)
    return make


def torch_sdpa_fa3(step):
    """SDPA's flash backend after activating torch's FA3 hook (needs the flash_attn_interface package);
    runs last in each case, and the case ends with FA2 restored (restore_fa2)."""
    import torch.nn.attention as attention
    if attention.current_flash_attention_impl() != "FA3":
        attention.activate_flash_attention_impl("FA3")
    return torch_sdpa("FLASH_ATTENTION", True)(step)


def restore_fa2():
    import torch.nn.attention as attention
    current = getattr(attention, "current_flash_attention_impl", lambda: None)
    if current() is not None:
        attention.restore_flash_attention_impl()


# ---- timing ----

def time_ms(fn, warmup, repeats) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeats
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(end) for begin, end in events)


def relative_error(out, expected) -> float:
    out, expected = out.float(), expected.float()
    return float((out - expected).norm() / expected.norm())


def run_variant(case, make, references, warmup, repeats):
    """(ms summed over the case's steps, worst relative error against v1) or an error string."""
    try:
        total, error = 0.0, 0.0
        for index, step in enumerate(case.steps):
            fn = make(step)
            total += time_ms(fn, warmup, repeats)
            if references is not None:
                error = max(error, relative_error(fn(), references[index]))
        return {"ms": total, "rel_err": error}
    except Exception as exc:  # one variant's failure must not stop the others
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
        return {"error": message}
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def describe_torch():
    info = {"torch": torch.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        import torch.nn.attention as attention
        if hasattr(attention, "list_flash_attention_impls"):
            info["flash_impls"] = attention.list_flash_attention_impls()
    except Exception as exc:
        info["flash_impls"] = repr(exc)
    try:
        from torch.nn.attention.varlen import varlen_attn
        info["varlen_attn"] = str(inspect.signature(varlen_attn))
    except Exception as exc:
        info["varlen_attn"] = f"absent ({type(exc).__name__})"
    return info


def variants(sweep):
    torch_variants = [
        ("torch sdpa FLASH (K/V repeated)", torch_sdpa("FLASH_ATTENTION", False)),
        ("torch sdpa FLASH (enable_gqa)", torch_sdpa("FLASH_ATTENTION", True)),
        ("torch sdpa CUDNN (K/V repeated)", torch_sdpa("CUDNN_ATTENTION", False)),
        ("torch sdpa CUDNN (enable_gqa)", torch_sdpa("CUDNN_ATTENTION", True)),
        ("torch flash varlen (aten op)", torch_flash_varlen),
        ("torch cudnn varlen (aten op)", torch_cudnn_varlen),
        ("torch varlen_attn (contiguous)", torch_varlen_attn(False)),
        ("torch varlen_attn (paged)", torch_varlen_attn(True)),
    ]
    ours = [("ours v1 (per head)", ours_v1), ("ours v2 (table tile)", ours_v2()),
            ("ours sdpa path: gather + flash", ours_sdpa("flash")),
            ("ours sdpa path: gather + cudnn", ours_sdpa("cudnn"))]
    ours += [(f"ours v2 tile m{m} n{n} w{w} s{s}", ours_v2((m, n, w, s))) for m, n, w, s in SWEEPS[sweep]]
    ours.append(("torch sdpa FA3 (enable_gqa; if installed)", torch_sdpa_fa3))
    return torch_variants, ours


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default="small")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in fp32 on any device: checks the script")
    opts = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = describe_torch()
    print(json.dumps(info, indent=1), flush=True)
    if opts.smoke:
        dtype, shape = torch.float32, dict(long_lengths=[40, 72], chunk=32, batch=2, batch_len=20,
                                           decodes=3, mixed_chunk=12, mixed_context=20)
        opts.warmup, opts.repeats = 1, 1
    else:
        dtype, shape = torch.bfloat16, dict(long_lengths=[16384, 32768], chunk=CHUNK, batch=16, batch_len=512,
                                            decodes=64, mixed_chunk=512, mixed_context=1536)
    tokens = sum(shape["long_lengths"]) + shape["batch"] * shape["batch_len"] + shape["decodes"] * 700 \
        + shape["mixed_context"] + shape["mixed_chunk"]
    pool = Pool(tokens + 64 * BLOCK_SIZE, dtype, device)
    cases = build_cases(pool, **shape)
    torch_variants, ours = variants("none" if opts.smoke else opts.sweep)
    if opts.smoke:
        ours.insert(-1, ("ours v2 tile m16 n16 w4 s2", ours_v2((16, 16, 4, 2))))

    results = {"info": info, "block_size": BLOCK_SIZE, "dtype": str(dtype), "cases": {}}
    started = time.perf_counter()
    for case in cases:
        print(f"\n== {case.name}: {len(case.steps)} kernel call(s), {case.flops / 1e12:.2f} TFLOP (causal)", flush=True)
        references = [paged_prefill_attention_v1(*step.args) for step in case.steps]
        rows, best_torch = {}, None
        for name, make in torch_variants + ours:  # torch's first: ours print their ratio to the best
            row = rows[name] = run_variant(case, make, references, opts.warmup, opts.repeats)
            if "error" in row:
                print(f"  {name:<44} failed: {row['error']}", flush=True)
                continue
            row["tflops"] = case.flops / row["ms"] / 1e9
            wrong = row["rel_err"] > 2e-2
            if name.startswith("torch") and not wrong:
                best_torch = min(best_torch or row["ms"], row["ms"])
            ratio = ""
            if best_torch:
                row["vs_best_torch"] = best_torch / row["ms"]
                ratio = f"{row['vs_best_torch']:5.2f}x best torch"
            print(f"  {name:<44} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s  {ratio}  "
                  f"err {row['rel_err']:.1e}{'  WRONG' if wrong else ''}", flush=True)
        good = {n: r for n, r in rows.items() if "ms" in r and r["rel_err"] <= 2e-2}
        summary = {}
        for label, prefix in [("v1", "ours v1"), ("v2 table", "ours v2 (table"), ("best v2", "ours v2"),
                              ("ours sdpa", "ours sdpa"), ("best torch", "torch")]:
            named = [n for n in good if n.startswith(prefix)]
            if named:
                best = min(named, key=lambda n: good[n]["ms"])
                summary[label] = (best, good[best]["ms"])
        line = ", ".join(f"{label} {ms:.3f} ms ({name})" if label.startswith(("best", "ours")) else
                         f"{label} {ms:.3f} ms" for label, (name, ms) in summary.items())
        print(f"  summary: {line}")
        if len(case.steps) > 1:
            print("  x 32 layers (8B) = attention's share of TTFT: " + ", ".join(
                f"{label} {32 * ms:.0f} ms" for label, (_, ms) in summary.items()))
        results["cases"][case.name] = {"tflop": case.flops / 1e12, "best_torch_ms": best_torch,
                                       "summary": summary, "variants": rows}
        restore_fa2()
        for step in case.steps:
            step.dense.clear()
    results["seconds"] = time.perf_counter() - started
    print(f"\n{results['seconds']:.0f} s")
    if opts.out:
        with open(opts.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
