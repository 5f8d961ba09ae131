"""Whether a step speculates, from what speculation measures at this batch size.

Speculation pays while decode reads weights and the drafts come true; it loses when a large batch makes the
verify step compute-bound, when the drafts are mostly wrong (a workload the n-gram lookup cannot copy, a
draft model that disagrees), or both. Which case holds depends on the GPU, the models and the traffic, so no
fixed batch size is right: on an H100 a draft model accepted 94% of the time was 1.36x faster at batch 64,
one accepted 15% of the time 0.67x slower at batch 1 (docs/benchmarks.md). The governor times decode steps
of each kind per batch-size bucket and keeps the faster, measuring the other again after 16 to 200 steps (sooner
the closer it came: a few steps of the slower kind, under 3% of the steps).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

MIN_SAMPLES = 3        # clean intervals of each kind before a bucket trusts its rates
# Steps in a bucket after which the slower kind is measured again, by how close it came (its rate over the
# faster's): a close call is checked again soon, since traffic changes it (n-gram lookup finds nothing while
# a reply starts, then copies whole sentences); a clear loss rarely. Each re-measurement costs about
# MIN_SAMPLES + 1 steps of the slower kind: under 3% of the steps at any of these rows.
EXPLORE_AFTER = ((0.9, 16), (0.7, 64), (0.0, 200))
EXPLORE_EVERY = EXPLORE_AFTER[-1][1]  # the longest wait
SMOOTHING = 0.25       # weight of a new interval in the running rate
MAX_INTERVAL_S = 1.0   # a longer gap between two steps is idle time, not a step


def batch_bucket(num_running: int) -> int:
    """1, 2, 3-4, 5-8, ...: decode cost grows slowly with the batch, so a bucket's steps are alike."""
    return max(0, num_running - 1).bit_length()


@dataclass
class _Rate:
    tokens_per_seq_second: float = 0.0
    samples: int = 0

    def add(self, value: float) -> None:
        self.tokens_per_seq_second = value if self.samples == 0 else \
            (1 - SMOOTHING) * self.tokens_per_seq_second + SMOOTHING * value
        self.samples += 1


@dataclass
class _Bucket:
    plain: _Rate
    speculative: _Rate
    steps_since_measured: int = 0  # clean steps since both kinds were last measured


class SpeculationGovernor:
    """`wants(num_running)` before a step; `record(...)` when its results are applied. An interval between
    two applied steps counts when both were decode-only steps of the same kind in the same bucket (a
    prefill or a switch of kind would blur it); its rate is output tokens per sequence per second."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}
        self._last: tuple[float, int, bool, bool] | None = None  # (time, bucket, speculated, decode only)

    def _bucket(self, key: int) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(_Rate(), _Rate())
        return bucket

    def wants(self, num_running: int) -> bool:
        bucket = self._bucket(batch_bucket(num_running))
        if bucket.speculative.samples < MIN_SAMPLES:
            return True
        if bucket.plain.samples < MIN_SAMPLES:
            return False
        return bucket.speculative.tokens_per_seq_second >= bucket.plain.tokens_per_seq_second

    def record(self, speculated: bool, num_seqs: int, num_tokens: int, decode_only: bool) -> None:
        """An applied step: whether it verified drafts, its sequences, the tokens it emitted, and whether it
        was decode only (no prompt chunk)."""
        now = self._clock()
        key = batch_bucket(num_seqs)
        last, self._last = self._last, (now, key, speculated, decode_only)
        if not (decode_only and last is not None and last[3] and last[1] == key and last[2] == speculated):
            return
        interval = now - last[0]
        if not 0 < interval <= MAX_INTERVAL_S or num_seqs == 0:
            return
        bucket = self._bucket(key)
        (bucket.speculative if speculated else bucket.plain).add(num_tokens / (num_seqs * interval))
        if bucket.plain.samples < MIN_SAMPLES or bucket.speculative.samples < MIN_SAMPLES:
            return
        bucket.steps_since_measured += 1
        plain, speculative = bucket.plain.tokens_per_seq_second, bucket.speculative.tokens_per_seq_second
        slower, faster = (bucket.plain, speculative) if speculative >= plain else (bucket.speculative, plain)
        closeness = slower.tokens_per_seq_second / faster if faster > 0 else 1.0
        if bucket.steps_since_measured >= next(steps for floor, steps in EXPLORE_AFTER if closeness >= floor):
            # The traffic may have changed (other prompts, other acceptance): forget the slower kind's rate,
            # so the next steps measure it afresh (MIN_SAMPLES intervals) before deciding again.
            slower.samples, slower.tokens_per_seq_second = 0, 0.0
            bucket.steps_since_measured = 0

    def summary(self) -> str:
        """Which batch sizes speculate now, from the measured rates (the periodic log's words)."""
        parts = []
        for key, bucket in sorted(self._buckets.items()):
            low, high = (1 << (key - 1)) + 1 if key else 1, 1 << key
            sizes = str(high) if low == high else f"{low}-{high}"
            if bucket.plain.samples < MIN_SAMPLES or bucket.speculative.samples < MIN_SAMPLES:
                parts.append(f"{sizes} measuring")
                continue
            plain = bucket.plain.tokens_per_seq_second
            ratio = bucket.speculative.tokens_per_seq_second / plain if plain > 0 else float("inf")
            parts.append(f"{sizes} {'on' if ratio >= 1 else 'off'} ({ratio:.2f}x)")
        return "speculation by batch size: " + ", ".join(parts)

    def rates(self) -> dict[int, tuple[float, float]]:
        """bucket -> (plain, speculative) output tokens per sequence per second, for the log and tests."""
        return {key: (b.plain.tokens_per_seq_second, b.speculative.tokens_per_seq_second)
                for key, b in sorted(self._buckets.items())}
