"""vLLM's flags and routes that asyncserve knows but does not have: one line each, here and nowhere else.

A vLLM user's command line or client meets a one-line answer naming the vLLM feature, instead of
argparse's "unrecognized arguments" or a bare 404. When a feature is built, its line goes.

What happens to a flag:
- refused (exit 2) when it asks for something a client or operator would miss: adapters, speculative
  decoding, more GPUs or processes, TLS, another download folder, traces, response fields;
- accepted with a note (logged at start-up, then ignored) when leaving it out changes nothing a client
  receives nor what the server promises: logging, API docs, uvicorn/h11 settings, CUDA-graph and
  compilation knobs, scheduler tuning asyncserve has no counterpart for;
- accepted with a note whatever its kind when its value asks for what asyncserve does anyway (vLLM's
  default: `--pipeline-parallel-size 1`, `--tokenizer-mode auto`, ...).
Standard library only: the CLI reads this before anything heavy is imported.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

NOT_BUILT, NO_MEANING = "is not built in asyncserve yet", "has no meaning in asyncserve"


@dataclass(frozen=True)
class VllmFlag:
    names: tuple[str, ...]     # "--pipeline-parallel-size", "-pp"
    feature: str               # what it is in vLLM
    status: str                # NOT_BUILT or NO_MEANING
    takes: int | str           # how many values it consumes: 0, 1, "?" or "+"
    accepted: bool = False     # True: ignored with a note; False: refused (exit 2)
    hint: str = ""             # what to do instead, or why it means nothing here
    neutral: tuple[str, ...] = ()  # values that ask for nothing asyncserve does not do (vLLM's defaults)

    def line(self, flag: str, value: str | None = None) -> str:
        """The one line a user reads about this flag (and its value)."""
        if value is not None and value in self.neutral:
            return (f"{flag} {value} (vLLM: {self.feature}) asks for nothing asyncserve does not already do; "
                    "ignored.")
        if flag.startswith("--no-") and self.takes == 0:
            return f"{flag} (vLLM: {self.feature}) asks for nothing asyncserve does not already do; ignored."
        hint = f": {self.hint}" if self.hint else ""
        return f"{flag} (vLLM: {self.feature}) {self.status}{hint}{'; ignored' if self.accepted else ''}."

    def is_refused(self, flag: str, value: str | None) -> bool:
        if self.accepted or (value is not None and value in self.neutral):
            return False
        return not (flag.startswith("--no-") and self.takes == 0)


def _flag(names: str, feature: str, status: str, takes: int | str = 1, hint: str = "", neutral: str = "",
          accepted: bool = False) -> VllmFlag:
    return VllmFlag(tuple(names.split()), feature, status, takes, accepted, hint, tuple(neutral.split()))


def _ignored(names: str, feature: str, status: str, takes: int | str = 1, hint: str = "") -> VllmFlag:
    return _flag(names, feature, status, takes, hint, accepted=True)


_LORA = "LoRA adapters"
_SPEC = "speculative decoding"
_DP = "data-parallel engine replicas"
_DP_HINT = "it is one engine per process; run one server per GPU (or per --tensor-parallel-size group) " \
           "behind a load balancer"
_MM = "multimodal inputs"
_TLS = "HTTPS"
_TLS_HINT = "put a TLS-terminating proxy in front"
_LOGS = "asyncserve logs each request unless --disable-log-requests"
_UVICORN = "its HTTP server is aiohttp, not uvicorn"
_GRAPHS = ("asyncserve captures decode steps per batch size and mixed steps per token count "
           "(--max-cudagraph-capture-size; --enforce-eager skips both)")
_SCHED = "asyncserve's scheduler has no such knob"

FLAGS: tuple[VllmFlag, ...] = (
    # model and weights
    _flag("--speculative-model --num-speculative-tokens --ngram-prompt-lookup-max --ngram-prompt-lookup-min",
          _SPEC, NOT_BUILT, 1, "use --speculative-config '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'"),
    _flag("--lora-dtype --lora-extra-vocab-size --default-mm-loras", _LORA, NOT_BUILT),
    _flag("--fully-sharded-loras --enable-lora-bias", _LORA, NOT_BUILT, 0),
    _flag("--download-dir", "the folder weights download to", NOT_BUILT, 1,
          "set HF_HUB_CACHE=DIR (the Hugging Face cache) instead"),
    _flag("--hf-token", "a Hugging Face token", NOT_BUILT, "?", "set HF_TOKEN instead"),
    _flag("--hf-overrides", "config.json overrides", NOT_BUILT, 1, "edit a copy of the checkpoint's config.json"),
    _flag("--rope-scaling --rope-theta", "rotary overrides", NOT_BUILT, 1,
          "edit a copy of the checkpoint's config.json"),
    _flag("--tokenizer-revision", "a tokenizer revision apart from the model's", NOT_BUILT, 1,
          "use --tokenizer with a local folder"),
    _ignored("--code-revision", "a revision of the checkpoint's remote code", NO_MEANING, 1,
             "asyncserve never runs a checkpoint's code"),
    _flag("--tokenizer-mode", "tokenizer modes", NOT_BUILT, 1, "asyncserve loads the checkpoint's own tokenizer",
          neutral="auto hf"),
    _flag("--config-format", "config formats", NOT_BUILT, 1, "asyncserve reads Hugging Face's config.json",
          neutral="auto hf"),
    _flag("--model-impl", "model implementations", NOT_BUILT, 1, "asyncserve runs its own", neutral="auto vllm"),
    _flag("--override-generation-config", "generation-config overrides", NOT_BUILT, 1,
          "use --generation-config PATH with a folder holding your generation_config.json"),
    _flag("--logits-processor-pattern", "logits processors", NOT_BUILT),
    _flag("--logits-processors", "logits processors", NOT_BUILT, "+"),
    _flag("--logprobs-mode", "logprobs modes", NOT_BUILT, 1, neutral="raw_logprobs"),
    _flag("--disable-sliding-window", "turning sliding windows off", NOT_BUILT, 0),
    _ignored("--disable-cascade-attn", "cascade attention", NO_MEANING, 0),
    _flag("--enable-prompt-embeds", "prompt embeddings as input", NOT_BUILT, 0),
    _flag("--skip-tokenizer-init", "serving without a tokenizer", NOT_BUILT, 0),
    _flag("--enable-sleep-mode", "sleep mode", NOT_BUILT, 0),
    _flag("--model-loader-extra-config", "model loader options", NOT_BUILT),
    _ignored("--ignore-patterns", "download filters", NO_MEANING, "+",
             "asyncserve downloads only config, tokenizer and safetensors files"),
    _ignored("--use-tqdm-on-load", "a loading progress bar", NO_MEANING, 0,
             "asyncserve always shows one"),
    _ignored("--safetensors-load-strategy --pt-load-map-location --max-parallel-loading-workers",
             "weight-loading tuning", NO_MEANING, 1),
    # multimodal
    _flag("--mm-processor-kwargs --mm-processor-cache-gb --media-io-kwargs --mm-encoder-tp-mode", _MM, NOT_BUILT),
    _flag("--enable-mm-embeds --interleave-mm-strings", _MM, NOT_BUILT, 0),
    _ignored("--disable-mm-preprocessor-cache --skip-mm-profiling --disable-chunked-mm-input", _MM, NOT_BUILT, 0),
    # parallelism and processes
    _flag("--pipeline-parallel-size -pp", "pipeline parallelism", NOT_BUILT, 1,
          "use --tensor-parallel-size", neutral="1"),
    _flag("--data-parallel-size -dp", _DP, NO_MEANING, 1, _DP_HINT, neutral="1"),
    _flag("--data-parallel-size-local -dpl --data-parallel-rank -dpn --data-parallel-start-rank -dpr "
          "--data-parallel-address -dpa --data-parallel-rpc-port -dpp", _DP, NO_MEANING, 1, _DP_HINT),
    _flag("--data-parallel-backend -dpb", _DP, NO_MEANING, 1, _DP_HINT, neutral="mp"),
    _flag("--data-parallel-hybrid-lb --data-parallel-external-lb --headless", _DP, NO_MEANING, 0, _DP_HINT),
    _flag("--api-server-count -asc", "API server processes", NO_MEANING, 1,
          "it serves from one process; run several servers behind a load balancer", neutral="1"),
    _flag("--enable-expert-parallel -ep --enable-eplb", "expert parallelism", NOT_BUILT, 0),
    _flag("--eplb-config --expert-placement-strategy", "expert parallelism", NOT_BUILT),
    _flag("--decode-context-parallel-size -dcp", "context parallelism", NOT_BUILT, 1, neutral="1"),
    _flag("--distributed-executor-backend", "executor backends", NOT_BUILT, 1,
          "tensor-parallel ranks are asyncserve's worker processes (torchrun for several hosts)",
          neutral="mp uni"),
    _flag("--worker-cls --worker-extension-cls", "custom worker classes", NO_MEANING),
    _ignored("--disable-custom-all-reduce", "vLLM's custom all-reduce", NO_MEANING, 0,
             "tensor-parallel ranks use torch.distributed's"),
    _ignored("--ray-workers-use-nsight", "Ray", NO_MEANING, 0),
    _ignored("--disable-frontend-multiprocessing", "a separate engine process", NO_MEANING, 0,
             "asyncserve is one process"),
    _flag("--grpc", "the gRPC server", NOT_BUILT, 0),
    # KV cache and scheduler
    _flag("--kv-cache-memory-bytes", "a KV cache size in bytes", NOT_BUILT, 1,
          "use --num-gpu-blocks-override or --gpu-memory-utilization"),
    _flag("--cpu-offload-gb", "weight offloading to the CPU", NOT_BUILT, 1, neutral="0"),
    _flag("--calculate-kv-scales", "computed KV-cache scales", NOT_BUILT, 0,
          "--kv-cache-dtype fp8 takes the checkpoint's scales, else 1.0"),
    _ignored("--prefix-caching-hash-algo", "prefix-cache hash algorithms", NO_MEANING),
    _flag("--kv-transfer-config --kv-events-config", "KV-cache transfer and events", NOT_BUILT),
    _flag("--scheduler-cls", "custom schedulers", NO_MEANING),
    _ignored("--max-num-partial-prefills --max-long-partial-prefills --long-prefill-token-threshold "
             "--num-lookahead-slots --num-scheduler-steps", "scheduler tuning", NO_MEANING, 1, _SCHED),
    _ignored("--async-scheduling --disable-hybrid-kv-cache-manager --use-v2-block-manager "
             "--disable-async-output-proc", "scheduler tuning", NO_MEANING, 0, _SCHED),
    _ignored("--max-seq-len-to-capture", "CUDA-graph sizes", NO_MEANING, 1, _GRAPHS),
    _ignored("--cudagraph-capture-sizes --cuda-graph-sizes", "CUDA-graph sizes", NO_MEANING, "+", _GRAPHS),
    _ignored("--compilation-config -O", "torch.compile settings", NO_MEANING, 1,
             "asyncserve runs Triton kernels and CUDA graphs without torch.compile"),
    _flag("--additional-config", "platform-specific settings", NO_MEANING),
    _flag("--structured-outputs-config", "structured-outputs settings", NOT_BUILT, 1,
          "use --structured-outputs-backend"),
    # observability
    _flag("--otlp-traces-endpoint --collect-detailed-traces", "OpenTelemetry traces", NOT_BUILT),
    _ignored("--show-hidden-metrics-for-version", "hidden metrics", NO_MEANING),
    _ignored("--aggregate-engine-logging", "per-engine statistics", NO_MEANING, 0),
    _flag("--enable-per-request-metrics", "per-request timing in responses", NOT_BUILT, 0),
    # HTTP server
    _flag("--root-path", "serving under a path prefix", NOT_BUILT, 1,
          "have the proxy strip the prefix, or mount openai_app() in your aiohttp app with add_subapp"),
    _flag("--middleware", "ASGI middleware", NO_MEANING, 1,
          "it is an aiohttp app: mount openai_app() in your own aiohttp app with its middlewares"),
    _flag("--uds", "serving on a Unix socket", NOT_BUILT),
    _flag("--ssl-keyfile --ssl-certfile --ssl-ca-certs --ssl-cert-reqs --ssl-ciphers", _TLS, NOT_BUILT, 1, _TLS_HINT),
    _flag("--enable-ssl-refresh", _TLS, NOT_BUILT, 0, _TLS_HINT),
    _ignored("--uvicorn-log-level", "uvicorn's log level", NO_MEANING, 1, _UVICORN),
    _ignored("--disable-uvicorn-access-log", "uvicorn's access log", NO_MEANING, 0,
             "the access log follows --disable-log-requests"),
    _ignored("--disable-access-log-for-endpoints", "access-log filters", NOT_BUILT),
    _ignored("--h11-max-incomplete-event-size --h11-max-header-count", "h11 parser limits", NO_MEANING, 1,
             "aiohttp's parser has its own"),
    _ignored("--disable-fastapi-docs --enable-offline-docs", "FastAPI's /docs pages", NO_MEANING, 0,
             "asyncserve serves no API docs"),
    _ignored("--enable-log-requests", "request logging", NO_MEANING, 0, _LOGS),
    _ignored("--enable-log-outputs", "logging generated text", NOT_BUILT, 0),
    _ignored("--max-log-len", "truncated prompts in logs", NO_MEANING, 1, "request logs hold no prompt text"),
    _ignored("--log-config-file", "a logging config file", NOT_BUILT),
    _flag("--enable-request-id-headers", "X-Request-Id response headers", NOT_BUILT, 0),
    _flag("--enable-prompt-tokens-details", "usage.prompt_tokens_details", NOT_BUILT, 0),
    _flag("--enable-force-include-usage", "usage on every response", NOT_BUILT, 0,
          "ask for it per request with stream_options.include_usage"),
    _flag("--enable-server-load-tracking", "the /load route", NOT_BUILT, 0),
    _flag("--enable-tokenizer-info-endpoint", "the /tokenizer_info route", NOT_BUILT, 0),
    _flag("--response-role", "another role name in chat responses", NOT_BUILT, 1, neutral="assistant"),
    _flag("--chat-template-content-format", "message content as a list of parts in chat templates", NOT_BUILT, 1,
          "asyncserve renders content as one string", neutral="auto string"),
    _flag("--default-chat-template-kwargs", "default chat_template_kwargs", NOT_BUILT, 1,
          "send chat_template_kwargs with each request"),
    _flag("--trust-request-chat-template --exclude-tools-when-tool-choice-none", "chat template options",
          NOT_BUILT, 0),
    _flag("--tool-parser-plugin --tool-server", "tool-parser plugins and tool servers", NOT_BUILT),
)


@dataclass(frozen=True)
class VllmRoute:
    path: str      # matches itself and every path below it
    feature: str
    status: str
    hint: str = ""

    def line(self, method: str, path: str) -> str:
        hint = f": {self.hint}" if self.hint else ""
        return f"{method} {path} (vLLM: {self.feature}) {self.status}{hint}."


def _route(paths: str, feature: str, status: str = NOT_BUILT, hint: str = "") -> tuple[VllmRoute, ...]:
    return tuple(VllmRoute(path, feature, status, hint) for path in paths.split())


ROUTES: tuple[VllmRoute, ...] = (
    *_route("/v1/audio/transcriptions /v1/audio/translations", "speech-to-text models"),
    *_route("/v1/realtime", "the Realtime API"),
    *_route("/score /v1/score", "scoring with cross-encoder models"),
    *_route("/rerank /v1/rerank /v2/rerank", "reranking"),
    *_route("/pooling", "the pooling API", hint="use /v1/embeddings"),
    *_route("/classify", "classification models"),
    *_route("/inference/v1/generate", "the token-in, token-out generate API",
            hint="use /v1/completions with a prompt of token ids"),
    *_route("/invocations /ping", "SageMaker's routes", hint="use /v1/... and /health"),
    *_route("/start_profile /stop_profile", "the torch profiler"),
    *_route("/sleep /wake_up /is_sleeping", "sleep mode"),
    *_route("/pause /resume /is_paused", "pausing generation"),
    *_route("/reset_prefix_cache /reset_mm_cache /server_info /collective_rpc", "development-mode routes"),
    *_route("/load", "server load tracking", hint="see /metrics"),
    *_route("/tokenizer_info", "tokenizer information"),
    *_route("/scale_elastic_ep /is_scaling_elastic_ep", "elastic expert parallelism", NO_MEANING),
)


def route_line(method: str, path: str) -> str | None:
    """The line for a known vLLM route that asyncserve does not serve; None for any other path."""
    for route in ROUTES:
        if path == route.path or path.startswith(route.path + "/"):
            return route.line(method, path)
    return None


class _Seen(argparse.Action):
    """Records a known vLLM flag (with its values) for `flag_lines`; argparse consumes its values."""

    def __init__(self, option_strings, dest, flag: VllmFlag, **kwargs):
        self.flag = flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        value = values if isinstance(values, str) or values is None else " ".join(values)
        seen = getattr(namespace, self.dest, None) or []
        setattr(namespace, self.dest, [*seen, (self.flag, option_string, value)])


def add_vllm_flags(parser: argparse.ArgumentParser, dest: str = "vllm_flags") -> None:
    """Teaches `parser` every flag of FLAGS, hidden from --help; what was given lands in `dest`. A name the
    parser already has is a built flag: it wins (and its stale line here fails test_cli_habits.py)."""
    parser.set_defaults(**{dest: None})
    known = parser._option_string_actions  # argparse has no public way to ask
    for flag in FLAGS:
        names = list(flag.names)
        if flag.takes == 0:
            names += ["--no-" + name[2:] for name in flag.names if name.startswith("--")]
        names = [name for name in names if name not in known]
        if names:
            parser.add_argument(*names, action=_Seen, flag=flag, dest=dest, nargs=flag.takes,
                                help=argparse.SUPPRESS)


def flag_lines(seen: list | None) -> tuple[list[str], list[str]]:
    """(lines of refused flags, lines of flags accepted and ignored), in command-line order."""
    refused, ignored = [], []
    for flag, name, value in seen or ():
        (refused if flag.is_refused(name, value) else ignored).append(flag.line(name, value))
    return refused, ignored
