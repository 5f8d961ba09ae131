"""The PromQL subset that the dashboard test evaluates means what Prometheus means, on two scrapes 10 s apart."""
from __future__ import annotations

import math

import pytest

from tests.server.promql_subset import Sample, Scrape, evaluate

MODEL = frozenset({("model_name", "m")})


def _scrape(time: float, requests: float, buckets: tuple[float, float, float], running: float) -> Scrape:
    samples = {("requests_total", MODEL): requests, ("running", MODEL): running,
               ("other_total", frozenset({("model_name", "m-2")})): 1.0}
    for bound, count in zip(("1.0", "2.0", "+Inf"), buckets):
        samples[("latency_bucket", MODEL | {("le", bound)})] = count
    return Scrape(time, samples)


BEFORE = _scrape(0.0, 5.0, (0.0, 0.0, 0.0), 1.0)
AFTER = _scrape(10.0, 25.0, (5.0, 10.0, 10.0), 3.0)


def _values(expr: str) -> list[float]:
    return sorted(sample.value for sample in evaluate(expr, BEFORE, AFTER))


def test_an_instant_selector_reads_the_later_scrape_with_its_labels():
    assert evaluate('running{model_name="m"}', BEFORE, AFTER) == [
        Sample(MODEL | {("__name__", "running")}, 3.0)]


def test_rate_is_the_increase_over_the_seconds_between_scrapes_and_drops_the_name():
    assert evaluate('rate(requests_total{model_name="m"}[1m])', BEFORE, AFTER) == [Sample(MODEL, 2.0)]
    assert _values("increase(requests_total[15s])") == [20.0]


def test_a_counter_that_went_down_was_reset():
    reset = _scrape(10.0, 4.0, (0.0, 0.0, 0.0), 0.0)
    assert [s.value for s in evaluate("increase(requests_total[1m])", BEFORE, reset)] == [4.0]


def test_a_window_shorter_than_the_scrape_gap_has_no_rate():
    assert evaluate("rate(requests_total[5s])", BEFORE, AFTER) == []


def test_regex_matchers_are_anchored():
    assert _values('other_total{model_name=~"m"}') == []
    assert _values('other_total{model_name=~"m.*"}') == [1.0]
    assert _values('running{model_name!~"m-.*"}') == [3.0]


def test_histogram_quantile_interpolates_inside_the_bucket_where_the_rank_falls():
    by_le = "sum by(le) (rate(latency_bucket[1m]))"
    assert _values(f"histogram_quantile(0.5, {by_le})") == [1.0]
    assert _values(f"histogram_quantile(0.75, {by_le})") == [1.5]
    assert _values(f"histogram_quantile(1, {by_le})") == [2.0]
    idle = _scrape(20.0, 25.0, (5.0, 10.0, 10.0), 0.0)  # no observation since AFTER
    assert math.isnan(evaluate(f"histogram_quantile(0.5, {by_le})", AFTER, idle)[0].value)


def test_aggregations_keep_only_their_by_labels():
    assert evaluate("sum by (model_name) (rate(latency_bucket[1m]))", BEFORE, AFTER) == [Sample(MODEL, 2.5)]
    assert evaluate("max(rate(latency_bucket[1m]))", BEFORE, AFTER) == [Sample(frozenset(), 1.0)]
    assert _values("avg without (le) (rate(latency_bucket[1m]))") == [2.5 / 3]


def test_arithmetic_matches_vectors_on_their_labels_and_applies_scalars():
    assert _values("rate(requests_total[1m])\n/\nrunning") == [2.0 / 3.0]
    assert _values("(sum(increase(requests_total[1m])) / sum(running)) * 100 - 1") == [20.0 / 3.0 * 100 - 1]
    assert _values("other_total / running") == []  # no series with the same labels


def test_what_is_outside_the_subset_is_refused():
    for expr in ("topk(1, running)", "running offset 5m", "running > 1", "rate(running)", "running[1m] / 2"):
        with pytest.raises(ValueError):
            evaluate(expr, BEFORE, AFTER)
