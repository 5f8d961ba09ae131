"""Tensor parallelism on the CPU: two worker processes over gloo give exactly the greedy tokens of one
process in float32, for every family and quantized format; the workers end with the engine; a dead
worker fails the engine, not a hang; the ranks also meet the multi-host way (env:// with a rank started
on its own)."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from asyncserve import SamplingParams
from asyncserve.errors import ConfigError, EngineDeadError, WorkerDiedError
from asyncserve.testing.tiny_model import build_tiny_checkpoint
from tests.quantized_checkpoints import build_quantized

PROMPTS = ["hello world", "the cat sat on the mat and", "a"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "asyncserve.executor.worker" in " ".join(p.cmdline())]


def _greedy(llm) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory) -> str:
    """Llama 3 with one KV head for four query heads: fewer KV heads than ranks (replicated)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "llama3-kv1", "llama3", num_key_value_heads=1)


SEEDED = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
# A grammar-constrained row beside a free one: the masks travel to the ranks with `sample`.
CONSTRAINED = [SamplingParams(structured_outputs={"choice": ["yes", "no", "maybe"]}, temperature=0.0), GREEDY]


def _all_kinds(llm) -> tuple:
    return (_greedy(llm), llm.generate(PROMPTS[:1], SEEDED, use_tqdm=False)[0].outputs[0].token_ids,
            [out.outputs[0].text for out in llm.generate(PROMPTS[:2], CONSTRAINED, use_tqdm=False)])


@pytest.mark.parametrize("family", ["llama3-kv1", "mistral", "qwen2", "qwen3"])
def test_two_ranks_match_one_exactly(family, tiny_model_dir, gqa_dir):
    from asyncserve import LLM
    path = gqa_dir if family == "llama3-kv1" else tiny_model_dir(family)
    kwargs = dict(device="cpu", dtype="float32", num_gpu_blocks_override=64, max_model_len=256)
    one = LLM(path, **kwargs)
    expected = _all_kinds(one)
    assert expected[2][0] in ("yes", "no", "maybe")
    two = LLM(path, tensor_parallel_size=2, **kwargs)
    assert len(_workers()) == 2
    # Every rank samples from the same gathered logits: seeded and constrained sampling agree too.
    assert _all_kinds(two) == expected
    two.shutdown()
    assert _workers() == []


def test_token_lists_reach_every_rank_and_give_one_ranks_tokens(tiny_model_dir):
    """logit_bias, allowed ids, bad words and min_tokens bans travel once with the request's params; each
    rank builds its device rows and bad-word states from them and samples what one process samples."""
    from asyncserve import LLM
    path = tiny_model_dir("qwen3")
    kwargs = dict(device="cpu", dtype="float32", num_gpu_blocks_override=64, max_model_len=256)
    allowed = [7, 100, 300, 500]
    one = LLM(path, **kwargs)
    tokenizer = one.get_tokenizer()
    words = [tokenizer.decode([a, b]) for a in allowed for b in allowed][:6] + [tokenizer.decode([allowed[1]])]
    params = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=10, min_tokens=3, ignore_eos=True,
                            logit_bias={7: 1.5}, allowed_token_ids=allowed, bad_words=words, stop_token_ids=[300])

    def run(llm):
        return [c.token_ids for c in llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs]

    expected = run(one)
    two = LLM(path, tensor_parallel_size=2, **kwargs)
    assert run(two) == expected


PHI3_LINEAR_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# What must split token-exactly beyond the Llama family above: every other family (MoE experts with and
# without a shared expert, biases and learned positions, soft-capping, fused checkpoint tensors) and every
# quantized format (GPTQ's packed rows and groups, act-order gathering its inputs, AWQ's packed columns,
# FP8 checkpoints and FP8 quantized at load over a row's slices).
SPLIT_CASES = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "gemma2", "gemma3", "opt-postln", "gpt2", "phi3", "qwen1",
               "gptq", "gptq-act-order-phi3", "awq", "fp8", "fp8-at-load",
               "gptq-mixtral-experts", "awq-mixtral-experts", "fp8-mixtral-experts", "fp8-at-load-qwen3_moe"]


@pytest.fixture(scope="module")
def split_case(tmp_path_factory, tiny_model_dir, qwen1_checkpoint):
    """case -> (checkpoint, LLM keyword arguments)."""
    from tests.models.tiny_families import VARIANTS, build_variant
    from tests.quantized_checkpoints import MIXTRAL_MODULES, build_fp8
    root = tmp_path_factory.mktemp("tp-cases")

    def get(case: str) -> tuple[str, dict]:
        if case in VARIANTS:
            return build_variant(root / case, case), {}
        if case == "qwen1":
            return qwen1_checkpoint[0], {}
        if case == "gptq-act-order-phi3":
            phi3 = build_variant(root / "phi3-source", "phi3")
            return build_quantized(phi3, root / case, fmt="gptq", act_order=True,
                                   linear_modules=PHI3_LINEAR_MODULES)[0], {}
        if case in ("gptq", "awq"):
            return build_quantized(tiny_model_dir("llama"), root / case, fmt=case)[0], {}
        if case == "fp8":
            return build_fp8(tiny_model_dir("llama"), root / case)[0], {}
        if case == "fp8-at-load":
            return tiny_model_dir("llama"), {"quantization": "fp8"}
        if case in ("gptq-mixtral-experts", "awq-mixtral-experts"):  # each rank: 64 of 128 expert channels
            return build_quantized(tiny_model_dir("mixtral"), root / case, fmt=case[:4],
                                   linear_modules=MIXTRAL_MODULES)[0], {}
        if case == "fp8-mixtral-experts":  # per-channel gate (w1), per-tensor up and down
            return build_fp8(tiny_model_dir("mixtral"), root / case, per_channel_modules=("w1",),
                             linear_modules=MIXTRAL_MODULES)[0], {}
        if case == "fp8-at-load-qwen3_moe":
            return tiny_model_dir("qwen3_moe"), {"quantization": "fp8"}
        return tiny_model_dir(case), {}

    return get


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_every_family_and_quantized_format_splits_exactly(case, split_case):
    from asyncserve import LLM
    path, options = split_case(case)
    kwargs = dict(device="cpu", dtype="float32", num_gpu_blocks_override=64, max_model_len=256, **options)
    expected = _greedy(LLM(path, **kwargs))
    two = LLM(path, tensor_parallel_size=2, **kwargs)
    assert _greedy(two) == expected
    two.shutdown()


def test_one_rank_stays_in_one_process_without_torch_distributed(make_llm):
    import torch.distributed as dist
    from asyncserve.layers.linear import Linear, MergedLinear
    from asyncserve.executor.uniproc import UniprocExecutor
    llm = make_llm("llama3", num_gpu_blocks_override=64, max_model_len=256)
    assert isinstance(llm.llm_engine.executor, UniprocExecutor)
    model = llm.llm_engine.executor.model
    layer = model.layers[0]
    assert type(layer.self_attn.qkv_proj) is MergedLinear and type(layer.mlp.down_proj) is Linear
    assert type(model.lm_head) is Linear
    assert not (dist.is_available() and dist.is_initialized())
    assert _workers() == []


def test_workers_end_when_the_engine_process_is_killed(tiny_model_dir):
    """SIGTERM (no clean-up runs) and SIGKILL alike: the workers notice their parent is gone."""
    script = ("import sys, psutil; from asyncserve import LLM; "
              f"llm = LLM({tiny_model_dir('qwen3')!r}, device='cpu', num_gpu_blocks_override=64, "
              "max_model_len=256, tensor_parallel_size=2); "
              "print(*[p.pid for p in psutil.Process().children()], flush=True); sys.stdin.read()")
    engine = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        pids = [int(pid) for pid in engine.stdout.readline().split()]
        assert len(pids) == 2
        engine.send_signal(signal.SIGTERM)
        engine.wait(timeout=30)
        gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=20)
        assert alive == []
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()


def test_what_cannot_be_split_is_refused_before_any_worker_starts(tiny_model_dir, tmp_path):
    """The layers say it, built as rank 0 on the meta device: heads, and packed groups of a rank's inputs."""
    from asyncserve import LLM
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"):
        LLM(tiny_model_dir("qwen3"), device="cpu", tensor_parallel_size=3)
    path, _ = build_quantized(tiny_model_dir("llama"), tmp_path / "gptq", fmt="gptq", group_size=64)
    with pytest.raises(ConfigError, match=r"GPTQ: layer 'layers.0.self_attn.o_proj' has 32 inputs on each of "
                                          r"tensor_parallel_size=2 ranks, not a multiple of the group size 64"):
        LLM(path, device="cpu", tensor_parallel_size=2)
    assert _workers() == []


def test_a_killed_worker_fails_the_engine_cleanly(tiny_model_dir):
    from asyncserve import LLM
    llm = LLM(tiny_model_dir("qwen3"), device="cpu", num_gpu_blocks_override=64, max_model_len=256,
              tensor_parallel_size=2)
    rank1 = next(p for p in _workers() if p.environ().get("RANK") == "1")
    os.kill(rank1.pid, signal.SIGKILL)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_greedy, llm)
        with pytest.raises(WorkerDiedError, match="rank 1"):
            future.result(timeout=60)
    assert _workers() == []
    with pytest.raises(EngineDeadError):  # and stays failed
        _greedy(llm)


def test_ranks_meet_the_multi_host_way(tiny_model_dir, monkeypatch):
    """Rank 1 starts on its own, as torchrun on a second host would; the engine runs rank 0 only."""
    from asyncserve import LLM
    path = tiny_model_dir("qwen2")
    kwargs = dict(device="cpu", dtype="float32", num_gpu_blocks_override=64, max_model_len=256)
    expected = _greedy(LLM(path, **kwargs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    other_host = subprocess.Popen([sys.executable, "-m", "asyncserve.executor.worker"],
                                  env=dict(os.environ, RANK="1", LOCAL_RANK="0", **rendezvous))
    try:
        for name, value in rendezvous.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("ASYNCSERVE_LOCAL_WORLD_SIZE", "1")
        llm = LLM(path, tensor_parallel_size=2, **kwargs)
        assert len([p for p in _workers() if p.pid != other_host.pid]) == 1  # only rank 0 is the engine's
        assert _greedy(llm) == expected
        llm.shutdown()
        assert other_host.wait(timeout=30) == 0  # rank 0 told it to leave
    finally:
        if other_host.poll() is None:
            other_host.kill()
            other_host.wait()
