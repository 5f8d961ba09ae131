"""Prometheus text exposition (format 0.0.4), written by hand: gauges, counters, histograms."""
from __future__ import annotations

import bisect
import math

from asyncserve.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "asyncserve:"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
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


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name = PREFIX + name
        self.help_text = help_text
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: dict[str, str]) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            cumulative += count
            bucket_labels = labels_text({**labels, "le": _number(bound)})
            lines.append(f"{self.name}_bucket{bucket_labels} {cumulative}")
        lines.append(f"{self.name}_sum{labels_text(labels)} {_number(self.sum)}")
        lines.append(f"{self.name}_count{labels_text(labels)} {self.count}")
        return lines


def sample(name: str, kind: str, help_text: str, value: float, labels: dict[str, str]) -> list[str]:
    name = PREFIX + name
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels_text(labels)} {_number(value)}"]


class ServerMetrics:
    """Per-request latency histograms and HTTP counters; engine gauges are read when scraped."""

    def __init__(self):
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated token.", _TTFT_BUCKETS)
        self.time_per_output_token = Histogram(
            "time_per_output_token_seconds", "Mean time between output tokens after the first, per request.",
            _TPOT_BUCKETS)
        self.e2e_latency = Histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last token.", _E2E_BUCKETS)
        self.finished_by_reason: dict[str, int] = {}
        self.num_internal_errors = 0

    def observe_finished(self, output: RequestOutput) -> None:
        for choice in output.outputs:
            reason = choice.finish_reason or "unknown"
            self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        timings = output.metrics
        arrival, first, finished = (timings.get("arrival_time"), timings.get("first_token_time"),
                                    timings.get("finished_time"))
        if arrival is None or finished is None:
            return
        self.e2e_latency.observe(finished - arrival)
        if first is None:
            return
        self.time_to_first_token.observe(first - arrival)
        num_tokens = timings.get("num_generation_tokens") or 0
        num_seqs = max(1, len(output.outputs))
        per_seq = num_tokens / num_seqs
        if per_seq > 1:
            self.time_per_output_token.observe((finished - first) / (per_seq - 1))

    def render(self, engine_stats: dict, extra: list[tuple[str, str, str, float]],
               labels: dict[str, str], histograms: list[Histogram]) -> str:
        lines: list[str] = []
        for key, value in engine_stats.items():
            if isinstance(value, (int, float)):
                kind = "counter" if key.endswith("_total") else "gauge"
                lines += sample(key, kind, _ENGINE_HELP.get(key, f"Engine statistic {key}."), value, labels)
            elif isinstance(value, list):  # one series per position (label "position", as vLLM's)
                name = PREFIX + key
                lines += [f"# HELP {name} {_ENGINE_HELP.get(key, f'Engine statistic {key}.')}",
                          f"# TYPE {name} counter"]
                lines += [f"{name}{labels_text({**labels, 'position': str(position)})} {_number(count)}"
                          for position, count in enumerate(value)]
        for name, kind, help_text, value in extra:
            lines += sample(name, kind, help_text, value, labels)
        success = PREFIX + "request_success_total"
        lines += [f"# HELP {success} Finished sequences, by finish reason.", f"# TYPE {success} counter"]
        for reason in sorted(set(self.finished_by_reason) | {"stop", "length", "abort"}):
            count = self.finished_by_reason.get(reason, 0)
            lines.append(f"{success}{labels_text({**labels, 'finished_reason': reason})} {count}")
        lines += sample("http_internal_errors_total", "counter",
                        "Requests answered 500 because of an unexpected exception (a bug).",
                        self.num_internal_errors, labels)
        for histogram in (self.time_to_first_token, self.time_per_output_token, self.e2e_latency,
                          *histograms):
            lines += histogram.render(labels)
        return "\n".join(lines) + "\n"
