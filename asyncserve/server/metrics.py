"""Prometheus text exposition (format 0.0.4), written by hand: gauges, counters, histograms."""
from __future__ import annotations

import math

from asyncserve.engine.bucket_counts import BucketCounts
from asyncserve.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "asyncserve:"
VLLM_PREFIX = "vllm:"  # vLLM's names, rendered beside ours for the dashboards, gateways and autoscalers that read them
# Ours that vLLM has under the same name and meaning (engine stats and the request histograms).
_VLLM_ENGINE_NAMES = frozenset({
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
    "generation_tokens_total", "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
    "spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total",
    "spec_decode_num_accepted_tokens_per_pos_total", "iteration_tokens_total"})
_QUEUE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                  480.0, 960.0, 1920.0, 7680.0)  # vLLM's request-time buckets

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
def one_two_five_buckets(largest: int) -> tuple[float, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `largest` (its max_model_len); floats, so
    that `le` reads "1.0" as vLLM's does."""
    buckets: list[float] = []
    scale = 1.0
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > largest:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Engine stats (AsyncEngine.stats()) -> help text; keys ending in _total are counters, the rest gauges.
_ENGINE_HELP = {
    "num_requests_running": "Requests whose sequences are being computed.",
    "num_requests_waiting": "Requests waiting to be scheduled.",
    "kv_cache_usage_perc": "Fraction of KV-cache blocks in use (0..1).",
    "prompt_tokens_total": "Prompt tokens received.",
    "generation_tokens_total": "Tokens generated.",
    "num_preemptions_total": "Sequences preempted for lack of KV blocks.",
    "prefix_cache_queries_total": "Blocks looked up in the prefix cache.",
    "prefix_cache_hits_total": "Blocks found in the prefix cache.",
    # Speculative decoding, with vLLM's names and meaning (present only with --speculative-config).
    "spec_decode_num_drafts_total": "Verifies of proposed tokens (one per sequence and step that proposed).",
    "spec_decode_num_draft_tokens_total": "Proposed (draft) tokens scored by the target model.",
    "spec_decode_num_accepted_tokens_total": "Draft tokens the target model accepted.",
    "spec_decode_num_accepted_tokens_per_pos_total": "Draft tokens accepted, by position in the proposal.",
    "iteration_tokens_total": "Tokens scheduled per engine step.",
}


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items()) + "}"


class Histogram(BucketCounts):
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        super().__init__(buckets)
        self.name = PREFIX + name
        self.help_text = help_text

    def render(self, labels: dict[str, str], name: str | None = None) -> list[str]:
        """`name`: the full metric name to render under (vLLM's, beside ours); default ours."""
        return render_histogram(self, name or self.name, self.help_text, labels)


def render_histogram(counts: BucketCounts, name: str, help_text: str, labels: dict[str, str]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, count in zip((*counts.buckets, math.inf), counts.counts):
        cumulative += count
        lines.append(f"{name}_bucket{labels_text({**labels, 'le': _number(bound)})} {cumulative}")
    lines.append(f"{name}_sum{labels_text(labels)} {_number(counts.sum)}")
    lines.append(f"{name}_count{labels_text(labels)} {counts.count}")
    return lines


def sample(name: str, kind: str, help_text: str, value: float, labels: dict[str, str]) -> list[str]:
    name = PREFIX + name
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels_text(labels)} {_number(value)}"]


class ServerMetrics:
    """Per-request latency histograms and HTTP counters; engine gauges are read when scraped."""

    def __init__(self, max_model_len: int = 8192):
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated token.", _TTFT_BUCKETS)
        self.time_per_output_token = Histogram(
            "time_per_output_token_seconds", "Mean time between output tokens after the first, per request.",
            _TPOT_BUCKETS)
        self.e2e_latency = Histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last token.", _E2E_BUCKETS)
        # vLLM's: each request's mean gap observed once per gap (one call per request, not per token).
        self.inter_token_latency = Histogram(
            "inter_token_latency_seconds", "Time between output tokens (each request's mean, once per gap).",
            _TPOT_BUCKETS)
        self.queue_time = Histogram(
            "request_queue_time_seconds", "Time from arrival to first scheduled.", _QUEUE_BUCKETS)
        self.prefill_time = Histogram(
            "request_prefill_time_seconds", "Time from first scheduled to the first token.", _QUEUE_BUCKETS)
        self.decode_time = Histogram(
            "request_decode_time_seconds", "Time from the first token to the last.", _QUEUE_BUCKETS)
        # vLLM's per-request token counts, under vLLM's names only (ours have no counterpart).
        token_buckets = one_two_five_buckets(max_model_len)
        self.prompt_tokens = Histogram("request_prompt_tokens", "Number of prefill tokens processed.",
                                       token_buckets)
        self.generation_tokens = Histogram("request_generation_tokens", "Number of generation tokens processed.",
                                           token_buckets)
        self.max_generation_tokens = Histogram(
            "request_max_num_generation_tokens", "The most tokens one sequence of a request generated.",
            token_buckets)
        self.finished_by_reason: dict[str, int] = {}
        self.num_internal_errors = 0

    def observe_finished(self, output: RequestOutput) -> None:
        for choice in output.outputs:
            reason = choice.finish_reason or "unknown"
            self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        timings = output.metrics
        seq_tokens = timings.get("seq_generation_tokens")
        if seq_tokens:  # as vLLM, which runs each of n sequences as a request: the max once per request
            self.prompt_tokens.observe(timings["num_prompt_tokens"], times=len(seq_tokens))
            for num_tokens in seq_tokens:
                self.generation_tokens.observe(num_tokens)
            self.max_generation_tokens.observe(max(seq_tokens))
        arrival, first, finished = (timings.get("arrival_time"), timings.get("first_token_time"),
                                    timings.get("finished_time"))
        if arrival is None or finished is None:
            return
        self.e2e_latency.observe(finished - arrival)
        scheduled = timings.get("scheduled_time")
        if scheduled is not None:
            self.queue_time.observe(scheduled - arrival)
        if first is None:
            return
        self.time_to_first_token.observe(first - arrival)
        if scheduled is not None:
            self.prefill_time.observe(first - scheduled)
        self.decode_time.observe(finished - first)
        num_tokens = timings.get("num_generation_tokens") or 0
        num_seqs = max(1, len(output.outputs))
        per_seq = num_tokens / num_seqs
        if per_seq > 1:
            mean_gap = (finished - first) / (per_seq - 1)
            self.time_per_output_token.observe(mean_gap)
            self.inter_token_latency.observe(mean_gap, times=int(num_tokens - num_seqs))

    def render(self, engine_stats: dict, extra: list[tuple[str, str, str, float]],
               labels: dict[str, str], histograms: list[Histogram], cache_info: dict | None = None) -> str:
        """`cache_info`: the KV cache's settings, as vLLM's `vllm:cache_config_info` labels."""
        lines: list[str] = []
        for key, value in engine_stats.items():
            for prefix in (PREFIX, VLLM_PREFIX) if key in _VLLM_ENGINE_NAMES else (PREFIX,):
                lines += _engine_lines(prefix + key, key, value, labels)
        if cache_info is not None:
            name = VLLM_PREFIX + "cache_config_info"
            lines += [f"# HELP {name} Information of the LLMEngine CacheConfig.", f"# TYPE {name} gauge",
                      f"{name}{labels_text({k: str(v) for k, v in cache_info.items()})} 1.0"]
        for name, kind, help_text, value in extra:
            lines += sample(name, kind, help_text, value, labels)
        reasons = sorted(set(self.finished_by_reason) | {"stop", "length", "abort"})
        for success in (PREFIX + "request_success_total", VLLM_PREFIX + "request_success_total"):
            lines += [f"# HELP {success} Finished sequences, by finish reason.", f"# TYPE {success} counter"]
            lines += [f"{success}{labels_text({**labels, 'finished_reason': reason})} "
                      f"{self.finished_by_reason.get(reason, 0)}" for reason in reasons]
        lines += sample("http_internal_errors_total", "counter",
                        "Requests answered 500 because of an unexpected exception (a bug).",
                        self.num_internal_errors, labels)
        for histogram in (self.time_to_first_token, self.time_per_output_token, self.e2e_latency,
                          *histograms):
            lines += histogram.render(labels)
        for histogram in (self.inter_token_latency, self.queue_time, self.prefill_time, self.decode_time):
            lines += histogram.render(labels)
        for histogram in (self.time_to_first_token, self.e2e_latency, self.inter_token_latency, self.queue_time,
                          self.prefill_time, self.decode_time, self.prompt_tokens, self.generation_tokens,
                          self.max_generation_tokens):  # the same counts under vLLM's names
            lines += histogram.render(labels, VLLM_PREFIX + histogram.name.removeprefix(PREFIX))
        return "\n".join(lines) + "\n"


def _engine_lines(name: str, key: str, value, labels: dict[str, str]) -> list[str]:
    help_text = _ENGINE_HELP.get(key, f"Engine statistic {key}.")
    if isinstance(value, BucketCounts):
        return render_histogram(value, name, help_text, labels)
    if isinstance(value, list):  # one series per position (label "position", as vLLM's)
        return [f"# HELP {name} {help_text}", f"# TYPE {name} counter",
                *(f"{name}{labels_text({**labels, 'position': str(position)})} {_number(count)}"
                  for position, count in enumerate(value))]
    kind = "counter" if key.endswith("_total") else "gauge"
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels_text(labels)} {_number(value)}"]
