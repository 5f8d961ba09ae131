"""Tuned MoE tiles: the file format (vLLM's names and keys), the nearest-token-count lookup and its cache,
the fallback to MOE_CONFIGS, the kernel with tuned-looking tiles against the reference, and the tuner's
search space and loop (with a fake timer) on the CPU."""

import json
import pathlib

import pytest
import torch
from asyncserve.kernels import (
    GemmTiles,
    MoeTiles,
    fused_moe_ref,
    fused_moe_triton,
    moe,
    moe_tuned,
)
from asyncserve.kernels.moe_tiles import moe_config, table_tiles
from asyncserve.kernels.moe_tuned import (
    config_file_name,
    read_tuned_configs,
    tuned_tiles,
    write_tuned_configs,
)

from tests.server.test_bench_serving import load_script

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"
GPU = "Fake_GPU_80GB"
SMALL = MoeTiles(GemmTiles(16, 64, 128, 1, 4, 4), GemmTiles(16, 32, 256, 1, 4, 5))
MIDDLE = MoeTiles(GemmTiles(32, 128, 64, 8, 8, 3), GemmTiles(32, 64, 64, 1, 4, 3))
LARGE = MoeTiles(GemmTiles(64, 128, 64, 16, 8, 3), GemmTiles(64, 256, 64, 16, 8, 4))
HUGE = MoeTiles(GemmTiles(128, 256, 64, 8, 8, 3), GemmTiles(128, 128, 64, 32, 8, 3))
TABLE = {1: SMALL, 4: MIDDLE, 64: LARGE, 4096: HUGE}


@pytest.fixture(autouse=True)
def fresh_caches():
    moe.moe_tiles.cache_clear()
    moe_tuned.tuned_table.cache_clear()
    yield
    moe.moe_tiles.cache_clear()
    moe_tuned.tuned_table.cache_clear()


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """An empty package folder of tuned files, and a CUDA device that reads as GPU."""
    monkeypatch.setattr(moe_tuned, "CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(moe, "cuda_device_name", lambda device: GPU)
    return tmp_path


def _write(folder, table, experts=8, intermediate=24, dtype=torch.bfloat16):
    path = folder / config_file_name(experts, intermediate, GPU, dtype)
    write_tuned_configs(path, table)
    return path


def _load_script(name):
    """A module of scripts/ by file (tune_moe.py's neighbours first: it imports them by name)."""
    if name == "tune_moe":
        _load_script("moe_tile_space")
        _load_script("moe_precompile")
    return load_script(name)


def test_file_names_follow_vllm_with_float32_apart():
    assert config_file_name(128, 768, "NVIDIA_H100_80GB_HBM3", torch.bfloat16) == \
        "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json"
    assert config_file_name(128, 768, "NVIDIA_H100_80GB_HBM3", torch.float16) == \
        "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json"
    assert config_file_name(8, 14336, "NVIDIA_H200", torch.float32) == \
        "E=8,N=14336,device_name=NVIDIA_H200,dtype=float32.json"


def test_written_file_reads_back_the_same_tiles(tmp_path):
    path = _write(tmp_path, TABLE)
    assert read_tuned_configs(path) == TABLE
    entries = json.loads(path.read_text())
    assert list(entries) == ["1", "4", "64", "4096"]
    assert entries["64"]["w13"] == {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16,
                                    "num_warps": 8, "num_stages": 3}


def test_a_flat_vllm_entry_serves_both_gemms(tmp_path):
    path = tmp_path / "flat.json"
    path.write_text(json.dumps({"8": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128,
                                      "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 4}}))
    tiles = GemmTiles(16, 64, 128, 1, 4, 4)
    assert read_tuned_configs(path) == {8: MoeTiles(tiles, tiles)}


def test_a_file_whose_gemms_differ_in_block_m_is_refused(tmp_path):
    path = _write(tmp_path, {1: MoeTiles(SMALL.w13, MIDDLE.w2)})
    with pytest.raises(ValueError, match="BLOCK_SIZE_M"):
        read_tuned_configs(path)


@pytest.mark.parametrize("num_tokens,expected", [
    (1, SMALL), (2, SMALL), (3, MIDDLE), (5, MIDDLE), (34, MIDDLE), (35, LARGE), (2080, LARGE), (2081, HUGE),
    (5000, HUGE), (100_000, HUGE)])
def test_lookup_takes_the_nearest_token_count(config_dir, num_tokens, expected):
    """The closest key, the smaller one on a tie (34 is 30 from 4 and 64), the largest past the end."""
    _write(config_dir, TABLE)
    assert tuned_tiles(num_tokens, 8, 24, GPU, torch.bfloat16) == expected


def test_lookup_finds_nothing_for_another_shape_gpu_or_dtype(config_dir):
    _write(config_dir, TABLE)
    assert tuned_tiles(1, 8, 24, GPU, torch.float16) == SMALL  # 16-bit floats share a file
    assert tuned_tiles(1, 8, 32, GPU, torch.bfloat16) is None
    assert tuned_tiles(1, 16, 24, GPU, torch.bfloat16) is None
    assert tuned_tiles(1, 8, 24, "Other_GPU", torch.bfloat16) is None
    assert tuned_tiles(1, 8, 24, GPU, torch.float32) is None


def _table_tiles(num_tokens, top_k=2, experts=8, intermediate=24, hidden=40, dtype=torch.bfloat16):
    return table_tiles(moe_config(num_tokens, top_k, experts), num_tokens, top_k, experts, 2 * intermediate, hidden,
                       dtype)


def test_cuda_batches_take_the_tuned_file(config_dir):
    _write(config_dir, TABLE)
    cuda = torch.device("cuda", 0)
    assert moe.moe_tiles(3, 2, 8, 24, 40, torch.bfloat16, cuda) == MIDDLE
    assert moe.moe_tiles(5000, 2, 8, 24, 40, torch.bfloat16, cuda) == HUGE


def test_without_a_file_the_table_rows_serve_unchanged(config_dir):
    cuda = torch.device("cuda", 0)
    for num_tokens in (1, 7, 300, 5000):
        assert moe.moe_tiles(num_tokens, 2, 8, 24, 40, torch.bfloat16, cuda) == _table_tiles(num_tokens)


def test_table_rows_made_concrete_as_before():
    """Qwen3-30B-A3B's decode: row 1, BLOCK_N halved to 32 for the few used blocks; float32 halves BLOCK_K."""
    qwen_decode = table_tiles(moe_config(1, 8, 128), 1, 8, 128, 1536, 2048, torch.bfloat16)
    assert qwen_decode == MoeTiles(GemmTiles(16, 32, 128, 1, 4, 4), GemmTiles(16, 32, 128, 1, 4, 4))
    mixtral_prefill = table_tiles(moe_config(4096, 2, 8), 4096, 2, 8, 28672, 4096, torch.float32)
    assert mixtral_prefill == MoeTiles(GemmTiles(128, 256, 32, 8, 8, 3), GemmTiles(128, 256, 32, 8, 8, 3))


def test_cpu_batches_never_look_for_a_file(config_dir, monkeypatch):
    _write(config_dir, TABLE)

    def refuse(*args, **kwargs):
        raise AssertionError("the CPU path looked for a tuned file")

    monkeypatch.setattr(moe, "tuned_tiles", refuse)
    monkeypatch.setattr(moe, "cuda_device_name", refuse)
    assert moe.moe_tiles(3, 2, 8, 24, 40, torch.bfloat16, torch.device("cpu")) == _table_tiles(3)


def test_the_file_is_read_once_and_each_batch_size_chosen_once(config_dir, monkeypatch):
    _write(config_dir, TABLE)
    opened, looked_up = [], []
    real_open, real_lookup = open, moe.tuned_tiles
    monkeypatch.setattr(moe_tuned, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k), raising=False)
    monkeypatch.setattr(moe, "tuned_tiles", lambda *a, **k: looked_up.append(a[0]) or real_lookup(*a, **k))
    cuda = torch.device("cuda", 0)
    for _ in range(3):
        for num_tokens in (1, 2, 3, 64, 5000):
            moe.moe_tiles(num_tokens, 2, 8, 24, 40, torch.bfloat16, cuda)
    assert len(opened) == 1
    assert looked_up == [1, 2, 3, 64, 5000]


TUNED_LOOKING = [
    MoeTiles(GemmTiles(16, 32, 32, 1, 4, 4), GemmTiles(16, 64, 16, 1, 4, 3)),
    MoeTiles(GemmTiles(16, 16, 64, 4, 4, 2), GemmTiles(16, 32, 32, 2, 4, 3)),
    MoeTiles(GemmTiles(32, 64, 16, 2, 4, 3), GemmTiles(32, 16, 32, 8, 8, 4)),
    MoeTiles(GemmTiles(64, 32, 32, 4, 8, 3), GemmTiles(64, 64, 16, 1, 4, 2)),
]


@pytest.mark.parametrize("tiles", TUNED_LOOKING, ids=lambda t: f"bm{t.w13.block_m}-g{t.w13.group_m}")
@pytest.mark.parametrize("num_tokens,hidden,inter,experts,top_k", [(25, 40, 24, 3, 2), (3, 24, 20, 9, 3)])
def test_tuned_tiles_match_the_reference(tiles, num_tokens, hidden, inter, experts, top_k, triton_device):
    """Tiles narrower and wider than the matrices, several row blocks per expert (25 tokens: ~17 rows each)
    with GROUP_M > 1, w13 and w2 tiled apart."""
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5
    logits = torch.randn(num_tokens, experts, generator=gen)
    out = fused_moe_triton(*(t.to(triton_device) for t in (x, w13, w2, logits)), top_k, True, tiles)
    torch.testing.assert_close(out.cpu(), fused_moe_ref(x, w13, w2, logits, top_k, True), rtol=1e-4, atol=1e-4)


# The tuner (scripts/tune_moe.py, its search space in scripts/moe_tile_space.py)

def test_block_m_follows_the_rows_each_expert_sees():
    space = _load_script("moe_tile_space")
    assert space.block_m_options(1.0) == [16]       # decode: one row per expert
    assert space.block_m_options(7.0) == [16]
    assert space.block_m_options(12.0) == [16, 32]   # up to twice the rows
    assert space.block_m_options(20.0) == [16, 32, 64]
    assert space.block_m_options(100.0) == [32, 64, 128]
    assert space.block_m_options(4096.0) == [64, 128]  # no shorter than 64 for long runs


def test_search_space_is_pruned_by_shared_memory_registers_and_rows():
    space = _load_script("moe_tile_space")
    wide = space.gemm_space(64, 10_000, 1536, 2048, 2, 100 * 1024, "large")
    assert wide and all(space.fits(t, 2, 100 * 1024) for t in wide)
    assert all(t.num_stages * (64 + t.block_n) * t.block_k * 2 <= 100 * 1024 for t in wide)
    assert GemmTiles(64, 256, 128, 8, 8, 3) not in wide  # 3 x 80 KiB stages
    tallest = space.gemm_space(128, 10_000, 1536, 2048, 2, 100 * 1024, "large")
    assert GemmTiles(128, 256, 32, 8, 8, 3) in tallest
    assert GemmTiles(128, 256, 32, 8, 4, 3) not in tallest  # 128 accumulators a thread at most
    assert {t.group_m for t in wide} == {1, 8, 32}        # an expert holds many row blocks
    assert {t.group_m for t in space.gemm_space(16, 1.0, 1536, 2048, 2, 100 * 1024, "large")} == {1}
    assert all(t.num_warps == 4 for t in space.gemm_space(16, 1.0, 1536, 2048, 2, 100 * 1024, "large")
               if t.block_n < 256)
    narrow = space.gemm_space(16, 1.0, 24, 40, 4, 232448, "small")  # tiles and stages clamp to the matrix
    assert {(t.block_n, t.block_k, t.num_stages) for t in narrow} == {(32, 64, 2)} and len(narrow) == 1


def test_shapes_come_from_model_configs():
    space = _load_script("moe_tile_space")
    qwen = {"hidden_size": 2048, "moe_intermediate_size": 768, "intermediate_size": 6144, "num_experts": 128,
            "num_experts_per_tok": 8}
    assert space.shape_from_config("q", qwen) == space.MoeShape("q", 128, 2048, 768, 8)
    assert space.shape_from_config("q", {"text_config": qwen}, tp=2) == space.MoeShape("q", 128, 2048, 384, 8)
    mixtral = {"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2}
    assert space.shape_from_config("m", mixtral) == space.MoeShape("m", 8, 4096, 14336, 2)


def test_tuner_keeps_the_fastest_confirmed_tiles_per_token_count(tmp_path, triton_device):
    """A fake timer ranks the candidates; at 1 token the fastest pair is made wrong, so the runner-up is
    written; at 40 tokens (20 rows per expert) the fastest is a BLOCK_M 64 pair."""
    tune, space = _load_script("tune_moe"), _load_script("moe_tile_space")
    shape = space.MoeShape("tiny", num_experts=4, hidden=32, intermediate=16, top_k=2)
    memory = 232448

    def spaces(num_tokens):
        return space.candidate_tiles(shape, num_tokens, torch.float32, memory, "small")

    one, forty = spaces(1), spaces(40)
    favourite = {1: (one["w13"][-1], one["w2"][-1]), 40: (forty["w13"][-1], forty["w2"][-1])}
    runner_up = one["w13"][-2]
    assert favourite[40][0].block_m == 64 and runner_up.block_m == favourite[1][0].block_m == 16
    launched = []

    def fake_timer(launch, *, gemm, tiles, num_tokens):
        if not launched:
            launch()  # the launch closure runs (interpreted on the CPU)
        launched.append((num_tokens, gemm, tiles))
        w13, w2 = favourite[num_tokens]
        if tiles == (w13 if gemm == "w13" else w2):
            return 1e-6
        return 2e-6 if (num_tokens, gemm, tiles) == (1, "w13", runner_up) else 9e-6

    wrong = MoeTiles(*favourite[1])

    def moe_fn(*args):
        out = fused_moe_triton(*args)
        return out + 1.0 if args[-1] == wrong else out

    lines = []
    tuned = tune.tune_shape(shape, [1, 40], dtype=torch.float32, device=triton_device, space="small",
                            shared_memory=memory, time_fn=fake_timer, moe_fn=moe_fn, log=lines.append)
    assert len(launched) == sum(len(s["w13"]) + len(s["w2"]) for s in (one, forty))
    assert tuned == {1: MoeTiles(runner_up, favourite[1][1]), 40: MoeTiles(*favourite[40])}
    assert any("REJECTED" in line for line in lines)
    path = tmp_path / "tuned.json"
    tune.write_merged(path, {4096: HUGE})
    tune.write_merged(path, tuned)
    assert read_tuned_configs(path) == {**tuned, 4096: HUGE}  # other token counts kept


def test_shipped_files_read_and_ship_in_the_wheel():
    """Every committed tuned file parses (both GEMMs one BLOCK_M, vLLM's name) and pyproject packages them."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((SCRIPTS.parent / "pyproject.toml").read_text())
    assert "moe_configs/*.json" in pyproject["tool"]["setuptools"]["package-data"]["asyncserve.kernels"]
    for path in pathlib.Path(moe_tuned.CONFIG_DIR).glob("*.json"):
        assert path.name.startswith("E=") and ",N=" in path.name and ",device_name=" in path.name
        assert read_tuned_configs(path)


def test_tuner_keeps_the_last_token_counts_tiles_within_the_slack():
    """Fewer distinct kernels for the server to compile, for a difference within timing noise."""
    tune = _load_script("tune_moe")
    timings = {"w13": [(1.00, SMALL.w13), (1.02, MIDDLE.w13), (1.10, LARGE.w13)],
               "w2": [(1.00, SMALL.w2), (1.00, MIDDLE.w2), (1.10, LARGE.w2)]}
    pairs = tune.ranked_pairs(timings)
    assert pairs[0] == (2.0, SMALL)
    assert [tiles for _, tiles in tune.with_reuse(pairs, timings, MIDDLE)][:2] == [MIDDLE, SMALL]
    assert tune.with_reuse(pairs, timings, LARGE) == pairs  # 10% slower: not kept
    assert tune.with_reuse(pairs, timings, HUGE) == pairs   # not timed at this token count
