"""Images in, text out (issue 27): the Qwen2.5-VL-7B shape with dummy weights, for asyncserve or for vLLM with
the same prompts and images, so both print comparable JSON lines.

    python scripts/bench_vision.py                                   # asyncserve
    PYTHONPATH=/tmp/vsite python scripts/bench_vision.py --engine vllm
    python scripts/bench_vision.py --tiny                            # CPU, a tiny checkpoint: that it runs

Two workloads, prefix caching off and a fresh random image per request (so neither engine's image or prefix
cache answers): time to first token of one request (a 1024x768 image, 999 image tokens, then 64 text tokens;
max_tokens=1; the median of --repeats, after a warm-up), and the throughput of --concurrency such requests
submitted together (128 tokens out each, ignore_eos). Image decoding is not timed (the engines get PIL images);
resizing and patching are, as each engine does them. The model directory is scripts/bench_models.py's for
model_configs/qwen2.5-vl-7b (the real config and preprocessor_config.json, a word-level tokenizer whose
vision tokens are Qwen's).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"


def random_image(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_requests(count: int, first_seed: int, args, rng: random.Random) -> list[dict]:
    """`count` prompts of one image then `--text-len` words ("t<id>", one token each in the bench tokenizer)."""
    width, height = args.image_size
    requests = []
    for index in range(count):
        words = " ".join(f"t{rng.randrange(1000, 100_000)}" for _ in range(args.text_len))
        requests.append({"prompt": f"{IMAGE_PROMPT} {words}",
                         "multi_modal_data": {"image": random_image(width, height, first_seed + index)}})
    return requests


def engine(args):
    kwargs = dict(model=args.model_dir, max_model_len=args.max_model_len, seed=0, enable_prefix_caching=False,
                  limit_mm_per_prompt={"image": 1}, max_num_seqs=max(args.concurrency, 64))
    if args.tiny:
        kwargs.update(dtype="float32", device="cpu", num_gpu_blocks_override=512)
    else:
        kwargs.update(dtype="bfloat16", load_format="dummy", gpu_memory_utilization=args.gpu_memory_utilization)
    if args.engine == "vllm":
        from vllm import LLM, SamplingParams
    else:
        from asyncserve import LLM, SamplingParams
    return LLM(**kwargs), SamplingParams


def row(args, workload: str, **values) -> dict:
    width, height = args.image_size
    out = {"engine": args.engine, "model": "tiny" if args.tiny else args.model, "workload": workload,
           "image": f"{width}x{height}", "text_tokens": args.text_len, **values}
    print(json.dumps(out), flush=True)
    return out


def time_to_first_token(llm, SamplingParams, args, rng: random.Random) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=1)
    times, prompt_tokens = [], 0
    for repeat in range(args.repeats + 1):  # the first is the warm-up
        request = make_requests(1, 10_000 + repeat, args, rng)
        started = time.perf_counter()
        output = llm.generate(request, params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - started
        prompt_tokens = len(output.prompt_token_ids)
        if repeat:
            times.append(elapsed)
    return row(args, "ttft", prompt_tokens=prompt_tokens, ttft_ms=round(1000 * statistics.median(times), 1),
               runs_ms=[round(1000 * t, 1) for t in times])


def throughput(llm, SamplingParams, args, rng: random.Random) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    warm = make_requests(min(args.concurrency, 4), 20_000, args, rng)
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    times, prompt_tokens = [], 0
    for repeat in range(args.repeats):
        requests = make_requests(args.concurrency, 30_000 + repeat * args.concurrency, args, rng)
        started = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        times.append(time.perf_counter() - started)
        prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
        assert all(len(output.outputs[0].token_ids) == args.output_len for output in outputs)
    elapsed = statistics.median(times)
    out_tokens = args.concurrency * args.output_len
    return row(args, "throughput", concurrency=args.concurrency, output_len=args.output_len,
               prompt_tokens=prompt_tokens, seconds=round(elapsed, 3),
               requests_per_s=round(args.concurrency / elapsed, 2),
               output_tok_per_s=round(out_tokens / elapsed, 1),
               total_tok_per_s=round((out_tokens + prompt_tokens) / elapsed, 1))


def breakdown(llm, args) -> dict:
    """asyncserve only: where one image's time goes: the processor (resize, normalize, patches; the content
    hash) on the host, the vision tower on the device, each the median of --repeats after a warm-up."""
    import importlib.util
    import torch
    engine = llm.llm_engine
    images, model = engine.input_processor.images, engine.executor.runner.model
    placeholder = images.placeholder_id
    host, tower = [], []
    for repeat in range(args.repeats + 1):
        picture = random_image(*args.image_size, seed=40_000 + repeat)
        started = time.perf_counter()
        _, inputs = images.process([placeholder], [picture])
        processed = time.perf_counter()
        image = inputs.images[0]
        pixels = image.pixel_values.to(engine.config.model.device)
        torch.cuda.synchronize()
        encode_started = time.perf_counter()
        with torch.inference_mode():
            model.embed_images(pixels, [image.grid])
        torch.cuda.synchronize()
        if repeat:
            host.append(processed - started)
            tower.append(time.perf_counter() - encode_started)
    return row(args, "breakdown", processor_ms=round(1000 * statistics.median(host), 1),
               vision_tower_ms=round(1000 * statistics.median(tower), 1),
               torchvision=importlib.util.find_spec("torchvision") is not None,
               processor=type(images.hf_processor()).__name__)


def model_dir(args) -> str:
    if args.tiny:
        path = os.path.join(args.work_dir, "tiny-qwen2.5-vl")
        if not os.path.isfile(os.path.join(path, "config.json")):
            from asyncserve.testing.tiny_vision import build_tiny_vision_checkpoint
            build_tiny_vision_checkpoint(path)
        return path
    from bench_models import model_dir as bench_model_dir
    return bench_model_dir(args.model, os.path.join(args.work_dir, args.model))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("asyncserve", "vllm"), default="asyncserve")
    parser.add_argument("--model", default="qwen2.5-vl-7b", help="a scripts/model_configs name")
    parser.add_argument("--model-dir", default=None, help="a servable directory (default: built for --model)")
    parser.add_argument("--work-dir", default="/tmp/asyncserve-bench-models")
    parser.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT")
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--workload", choices=("ttft", "throughput", "both"), default="both")
    parser.add_argument("--breakdown", action="store_true", help="asyncserve on a GPU: processor and vision "
                        "tower times of one image, before the workloads")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU, a tiny random Qwen2.5-VL, small images and batches: only that the script runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.image_size, args.text_len = "112x84", 16
        args.concurrency, args.output_len, args.repeats, args.max_model_len = 4, 4, 1, 1024
    args.image_size = tuple(int(side) for side in args.image_size.lower().split("x"))
    args.model_dir = args.model_dir or model_dir(args)
    llm, SamplingParams = engine(args)
    rng = random.Random(0)
    if args.breakdown and args.engine == "asyncserve":
        breakdown(llm, args)
    if args.workload in ("ttft", "both"):
        time_to_first_token(llm, SamplingParams, args, rng)
    if args.workload in ("throughput", "both"):
        throughput(llm, SamplingParams, args, rng)


if __name__ == "__main__":
    main()
