"""Speculative decoding's speed-up on an extractive workload (repeat / lightly edit a given text, where
n-gram proposals from the prompt come true), with and without speculation, for asyncserve or for vLLM on the
same model, prompts and config, so the two runs print comparable JSON lines.

    python scripts/bench_spec_decode.py --model /tmp/smollm2                       # asyncserve
    PYTHONPATH=/tmp/vsite python scripts/bench_spec_decode.py --model /tmp/smollm2 --engine vllm
    ... --speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2}' --batch-sizes 1 8 64

A draft model instead of n-gram: `--draft-model DIR` (vLLM's {"method": "draft_model", "model": DIR,
"num_speculative_tokens": K}, K from `--num-speculative-tokens`). For the 8B shape without a trained draft,
`--draft-layers N` writes a layer-truncated copy of the target's config (and tokenizer files) and uses it as
the draft; with `--load-format dummy` both get random weights, which makes acceptance meaningless (near 0:
the figure is the cost of drafting), so also run `--draft-model` equal to `--model` for the all-accepted
ceiling (the same dummy weights, drafts always right):

    python scripts/bench_spec_decode.py --model /ckpt/llama-8b --load-format dummy --draft-layers 4
    python scripts/bench_spec_decode.py --model /ckpt/llama-8b --load-format dummy --draft-model /ckpt/llama-8b

An EAGLE-3 head: `--eagle3-head DIR` (vLLM's {"method": "eagle3", "model": DIR, ...}, e.g. the public
yuhuili/EAGLE3-LLaMA3.1-Instruct-8B beside Llama-3.1-8B-Instruct); `--dummy-eagle3-head` writes a head of the
target's shape with random weights in the public layout (for timing only: acceptance is near 0, the figure
is the cost of drafting), which both engines load:

    python scripts/bench_spec_decode.py --model /ckpt/llama-8b --eagle3-head /ckpt/eagle3-llama-8b
    python scripts/bench_spec_decode.py --model /ckpt/llama-8b --load-format dummy --dummy-eagle3-head

Greedy, so both runs of an engine produce the same tokens (checked: speculation must not change them); each
figure is output tokens per second over the whole batch (prefill included, as a user sees it), the median of
`--repeats` runs after a warm-up. Acceptance is what the engine's own counters say (vLLM's metric names).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

# Original prose, so that no download is needed: the texts a user asks the model to repeat or correct.
PASSAGES = [
    "The harbour town wakes before the sun. Fishing boats slip out past the breakwater while the bakery on "
    "the corner pulls its first loaves from the oven, and the smell drifts down to the water where gulls wait "
    "on the pilings for whatever the morning brings.",
    "To replace the filter, first switch the unit off at the wall and wait five minutes for the fan to stop. "
    "Open the front panel by pressing both side clips, slide the old filter out, and insert the new one with "
    "the arrow pointing towards the fan. Close the panel until both clips click.",
    "Our quarterly results show revenue of 4.2 million, up 12 percent on the same quarter last year, driven "
    "mainly by the new subscription tier. Operating costs rose by 5 percent, largely from hiring in support, "
    "and the team expects margins to improve once onboarding is automated.",
    "The library will close early on Friday for the annual inventory. Books due that day may be returned on "
    "Monday without a late fee, and the reading room on the second floor will stay open until noon for anyone "
    "who needs a quiet place to work.",
    "A good cup of tea needs freshly boiled water, a warmed pot and patience. Let black tea steep for three to "
    "four minutes and green tea for two, at a slightly lower temperature, then pour it all out so the leaves "
    "do not turn the second cup bitter.",
    "The committee met on Tuesday to review the proposal for the new cycle path. Members agreed that the route "
    "along the river is safer than the one through the market, but asked for a second survey of the bridge "
    "before any money is committed to the project.",
    "Please remember that the office car park is being resurfaced next week. From Monday to Wednesday staff "
    "should use the overflow car park behind the warehouse, and a shuttle will run every fifteen minutes "
    "between the warehouse gate and the main entrance.",
    "The experiment measured how quickly seedlings grew under three colours of light. Plants under blue light "
    "were shorter but sturdier, those under red light grew tallest, and the control group under white light "
    "fell in between on every measure the students recorded.",
]
TASKS = [
    "Repeat the following text exactly, word for word, and nothing else:\n\n{}",
    "Rewrite the following text with British spelling and fix any typos, otherwise keeping every sentence "
    "unchanged:\n\n{}",
]


def prompts(tokenizer, count: int, random_len: int = 0) -> list[list[int]]:
    """The extractive chat prompts, or with `random_len` random ids of that length (a word-level benchmark
    tokenizer maps the English text to one unknown id)."""
    if random_len:
        import random
        rng = random.Random(0)
        return [[rng.randrange(1000, tokenizer.vocab_size - 1000) for _ in range(random_len)]
                for _ in range(count)]
    out = []
    for index in range(count):
        task = TASKS[index % len(TASKS)]
        passage = PASSAGES[index % len(PASSAGES)]
        messages = [{"role": "user", "content": task.format(passage)}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def counters(llm, engine: str) -> dict[str, float]:
    """The engine's speculative-decoding counters under vLLM's metric names (0 where it has none)."""
    names = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
             "vllm:spec_decode_num_accepted_tokens")
    found = dict.fromkeys(names, 0.0)
    if engine == "asyncserve":  # the engine's speculator keeps them (what /metrics serves)
        speculator = getattr(llm.llm_engine, "speculator", None)
        if speculator is not None:
            stats = speculator.stats
            found.update(zip(names, (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)))
        return found
    metrics = llm.get_metrics()  # vLLM v1, with stats logging on
    for metric in metrics:
        if getattr(metric, "name", None) in found:
            found[metric.name] = float(getattr(metric, "value", 0.0))
    return found


def truncated_draft(model: str, num_layers: int) -> str:
    """A folder beside the target's with its config cut to `num_layers` layers and its tokenizer files: a
    draft of the same vocabulary, for `--load-format dummy` runs (it holds no weights)."""
    out = os.path.join("/tmp", f"{os.path.basename(os.path.normpath(model))}-draft-{num_layers}-layers")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = num_layers
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists of some families follow the count
        if isinstance(config.get(key), list):
            config[key] = config[key][:num_layers]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "special_tokens", "generation_config", "vocab", "merges")):
            shutil.copy(os.path.join(model, name), out)
    return out


def dummy_eagle3_head(model: str) -> str:
    """A random EAGLE-3 head of the target's shape in the public layout, bf16 (the 8B shape: ~0.85 GB),
    written once to /tmp."""
    import torch

    from asyncserve.testing.eagle3_head import build_eagle3_head
    out = os.path.join("/tmp", f"{os.path.basename(os.path.normpath(model))}-dummy-eagle3")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        with open(os.path.join(model, "config.json")) as f:
            vocab_size = json.load(f)["vocab_size"]
        build_eagle3_head(out, model, draft_vocab_size=min(32000, vocab_size), std=0.02, dtype=torch.bfloat16)
    return out


def speculative_configs_of(args) -> list[dict]:
    """One config per draft model named (several: the same plain run is compared with each), else one."""
    if args.draft_model and len(args.draft_model) > 1:
        return [{"method": "draft_model", "model": path, "num_speculative_tokens": args.num_speculative_tokens}
                for path in args.draft_model]
    return [speculative_config_of(args)]


def speculative_config_of(args) -> dict:
    if args.dummy_eagle3_head:
        args.eagle3_head = dummy_eagle3_head(args.model)
    if args.eagle3_head is not None:
        return {"method": "eagle3", "model": args.eagle3_head, "num_speculative_tokens": args.num_speculative_tokens}
    if args.draft_layers is not None:
        args.draft_model = truncated_draft(args.model, args.draft_layers)
    if args.draft_model is not None:
        if isinstance(args.draft_model, list):
            args.draft_model = args.draft_model[0]
        return {"method": "draft_model", "model": args.draft_model,
                "num_speculative_tokens": args.num_speculative_tokens}
    return json.loads(args.speculative_config)


def build(args, speculative_config):
    kwargs = dict(model=args.model, dtype="bfloat16", max_model_len=args.max_model_len, seed=0,
                  enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
                  load_format=args.load_format)
    if speculative_config is not None:
        kwargs["speculative_config"] = speculative_config
    if args.engine == "vllm":
        from vllm import LLM, SamplingParams
        kwargs["disable_log_stats"] = False  # LLM.get_metrics() needs the stats loggers
    else:
        from asyncserve import LLM, SamplingParams
    return LLM(**kwargs), SamplingParams


def run(args, speculative_config) -> list[dict]:
    llm, sampling_params = build(args, speculative_config)
    tokenizer = llm.get_tokenizer()
    params = sampling_params(temperature=0.0, max_tokens=args.max_tokens)
    rows = []
    for batch in args.batch_sizes:
        inputs = [{"prompt_token_ids": ids} for ids in prompts(tokenizer, batch, args.random_prompt_len)]
        llm.generate(inputs, params, use_tqdm=False)  # warm-up: compiles, captures, fills caches
        before = counters(llm, args.engine)
        times, outputs = [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            outputs = llm.generate(inputs, params, use_tqdm=False)
            times.append(time.perf_counter() - started)
        after = counters(llm, args.engine)
        delta = {name.removeprefix("vllm:spec_decode_"): after[name] - before[name] for name in after}
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        elapsed = statistics.median(times)
        row = {"engine": args.engine, "speculative": speculative_config is not None, "batch": batch,
               "output_tokens": generated, "seconds": round(elapsed, 4),
               "output_tok_per_s": round(generated / elapsed, 1),
               "tokens": [o.outputs[0].token_ids for o in outputs][:2]}
        if delta["num_draft_tokens"]:
            row["acceptance"] = round(delta["num_accepted_tokens"] / delta["num_draft_tokens"], 3)
            row["mean_accepted_length"] = round(1 + delta["num_accepted_tokens"] / max(1, delta["num_drafts"]), 2)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", choices=("asyncserve", "vllm"), default="asyncserve")
    parser.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}')
    parser.add_argument("--draft-model", default=None, nargs="+",
                        help="a draft model's folder: method draft_model instead of --speculative-config; "
                             "several: one plain run compared with each")
    parser.add_argument("--draft-layers", type=int, default=None,
                        help="draft = the target's config cut to this many layers (with --load-format dummy)")
    parser.add_argument("--eagle3-head", default=None,
                        help="an EAGLE-3 head's folder: method eagle3 instead of --speculative-config")
    parser.add_argument("--dummy-eagle3-head", action="store_true",
                        help="an EAGLE-3 head of the target's shape with random weights (timing only)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="with a draft model or head")
    parser.add_argument("--load-format", default="auto", help="'dummy': random weights, target and draft")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-prompt-len", type=int, default=0,
                        help="random prompt ids of this length instead of the extractive text (for a "
                             "word-level benchmark tokenizer, with make_spec_pair.py's checkpoints)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--spec-json", default=None, help=argparse.SUPPRESS)  # one config, for --only
    parser.add_argument("--only", choices=("plain", "speculative"), default=None,
                        help="one side, in this process (the default runs each side in its own process, so "
                             "the second engine gets the memory the first one held)")
    args = parser.parse_args()
    if args.only is not None:
        config = None
        if args.only == "speculative":
            config = json.loads(args.spec_json) if args.spec_json else speculative_config_of(args)
        for row in run(args, config):
            print("ROW " + json.dumps(row), flush=True)
        return

    def side(extra: list[str]) -> list[dict]:
        result = subprocess.run([sys.executable, *sys.argv, *extra], capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"the run {extra} failed:\n{result.stderr[-4000:]}")
        return [json.loads(line[4:]) for line in result.stdout.splitlines() if line.startswith("ROW ")]

    plain = side(["--only", "plain"])
    for config in speculative_configs_of(args):
        fast_rows = side(["--only", "speculative", "--spec-json", json.dumps(config)])
        compare(args, config, plain, fast_rows)


def compare(args, config: dict, plain: list[dict], fast_rows: list[dict]) -> None:
    name = config.get("model") or config.get("method")
    for base, fast in zip(plain, fast_rows):
        same = base["tokens"] == fast["tokens"]
        print(f"{args.engine} [{name}] batch {base['batch']}: {base['output_tok_per_s']:,.1f} -> "
              f"{fast['output_tok_per_s']:,.1f} output tok/s ({fast['output_tok_per_s'] / base['output_tok_per_s']:.2f}x)"
              f"; acceptance {fast.get('acceptance', 'n/a')}, mean accepted length "
              f"{fast.get('mean_accepted_length', 'n/a')}; greedy tokens {'equal' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
