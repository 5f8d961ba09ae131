"""The PromQL that vLLM's Grafana dashboards use, evaluated over two scrapes of /metrics: enough of Prometheus's
meaning (selectors, rate/increase, aggregations, histogram_quantile, arithmetic) to tell whether a panel gets
data, with no Prometheus server. A recursive-descent parser; anything outside the subset raises."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

Labels = frozenset  # of (name, value) pairs; "__name__" holds the metric name until a function drops it


@dataclass
class Scrape:
    """One scrape: `time` in seconds, `samples` {(series name, Labels without __name__): value}."""
    time: float
    samples: dict[tuple[str, Labels], float]

    @classmethod
    def from_families(cls, time: float, families) -> Scrape:
        """From prometheus_client's parser (`text_string_to_metric_families`)."""
        return cls(time, {(sample.name, frozenset(sample.labels.items())): sample.value
                          for family in families for sample in family.samples})


@dataclass
class Sample:
    labels: Labels
    value: float


_TOKEN = re.compile(r"""\s*(?:
    (?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<duration>\[\s*(?:\d+[smhdwy])+\s*\])
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op>=~|!~|!=|[-+*/(){},=])
)""", re.VERBOSE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_AGGREGATIONS = {"sum": sum, "avg": lambda values: sum(values) / len(values), "max": max, "min": min,
                 "count": len}
_ARITHMETIC = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
               "/": lambda a, b: _divide(a, b)}


def _divide(numerator: float, denominator: float) -> float:
    if denominator == 0:  # Prometheus's float division: +-Inf, or NaN for 0/0
        return math.nan if numerator == 0 or math.isnan(numerator) else math.copysign(math.inf, numerator)
    return numerator / denominator


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"PromQL outside the subset at {position}: {text[position:position + 30]!r}")
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        position = match.end()
    return tokens


def _duration_seconds(token: str) -> float:
    return sum(int(count) * _SECONDS[unit] for count, unit in re.findall(r"(\d+)([smhdwy])", token))


def evaluate(expr: str, before: Scrape, after: Scrape) -> list[Sample] | float:
    """`expr` as an instant query at `after.time`; range selectors see `before` when it lies in their window."""
    parser = _Parser(_tokens(expr), before, after)
    result = parser.expression()
    if parser.position != len(parser.tokens):
        raise ValueError(f"PromQL outside the subset: unexpected {parser.tokens[parser.position][1]!r}")
    return result


class _Parser:
    """Evaluates while it parses: every node's value is a list of Samples (an instant vector), a float (a
    scalar) or, from a range selector, {Labels: (first value, last value, seconds between)}."""

    def __init__(self, tokens: list[tuple[str, str]], before: Scrape, after: Scrape):
        self.tokens, self.position, self.before, self.after = tokens, 0, before, after

    def peek(self) -> str | None:
        return self.tokens[self.position][1] if self.position < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.position == len(self.tokens):
            raise ValueError(f"PromQL ends early; expected {expected!r}")
        kind, text = self.tokens[self.position]
        if expected is not None and text != expected:
            raise ValueError(f"PromQL: expected {expected!r}, got {text!r}")
        self.position += 1
        return kind, text

    # expression := term (("+" | "-") term)* ; term := factor (("*" | "/") factor)*
    def expression(self):
        left = self.term()
        while self.peek() in ("+", "-"):
            left = _binary(self.take()[1], left, self.term())
        return left

    def term(self):
        left = self.factor()
        while self.peek() in ("*", "/"):
            left = _binary(self.take()[1], left, self.factor())
        return left

    def factor(self):
        kind, text = self.take()
        if kind == "number":
            return float(text)
        if text == "-":
            return _binary("*", -1.0, self.factor())
        if text == "(":
            inner = self.expression()
            self.take(")")
            return inner
        if kind != "name":
            raise ValueError(f"PromQL outside the subset: {text!r}")
        if text in _AGGREGATIONS:
            return self.aggregation(text)
        if self.peek() == "(":
            return self.function(text)
        return self.selector(text)

    def aggregation(self, operator: str) -> list[Sample]:
        grouping = self.grouping() if self.peek() in ("by", "without") else None
        self.take("(")
        vector = self.expression()
        self.take(")")
        if grouping is None and self.peek() in ("by", "without"):
            grouping = self.grouping()
        keyword, names = grouping or ("by", ())
        groups: dict[Labels, list[float]] = {}
        for sample in _vector(vector):
            if keyword == "by":
                key = frozenset((name, value) for name, value in sample.labels if name in names)
            else:
                key = frozenset((name, value) for name, value in sample.labels
                                if name not in names and name != "__name__")
            groups.setdefault(key, []).append(sample.value)
        return [Sample(key, _AGGREGATIONS[operator](values)) for key, values in groups.items()]

    def grouping(self) -> tuple[str, tuple[str, ...]]:
        keyword = self.take()[1]
        self.take("(")
        names = []
        while self.peek() != ")":
            names.append(self.take()[1])
            if self.peek() == ",":
                self.take(",")
        self.take(")")
        return keyword, tuple(names)

    def function(self, name: str):
        self.take("(")
        arguments = [self.expression()]
        while self.peek() == ",":
            self.take(",")
            arguments.append(self.expression())
        self.take(")")
        if name in ("rate", "increase") and len(arguments) == 1 and isinstance(arguments[0], dict):
            return [Sample(labels, _increase(first, last) / (seconds if name == "rate" else 1.0))
                    for labels, (first, last, seconds) in arguments[0].items()]
        if name == "histogram_quantile" and len(arguments) == 2 and isinstance(arguments[0], float):
            return _histogram_quantile(arguments[0], _vector(arguments[1]))
        raise ValueError(f"PromQL outside the subset: {name}() with these arguments")

    def selector(self, metric: str):
        matchers = [("__name__", "=", metric)]
        if self.peek() == "{":
            self.take("{")
            while self.peek() != "}":
                label = self.take()[1]
                operator = self.take()[1]
                kind, quoted = self.take()
                if kind != "string" or operator not in ("=", "!=", "=~", "!~"):
                    raise ValueError(f"PromQL outside the subset: matcher {label}{operator}{quoted}")
                matchers.append((label, operator, _unquote(quoted)))
                if self.peek() == ",":
                    self.take(",")
            self.take("}")
        window = None
        if self.position < len(self.tokens) and self.tokens[self.position][0] == "duration":
            window = _duration_seconds(self.take()[1])
        latest = _select(self.after, matchers)
        if window is None:
            return [Sample(labels, value) for labels, value in latest.items()]
        if not 0 < self.after.time - self.before.time <= window:  # a rate needs two samples in its window
            return {}
        earlier = _select(self.before, matchers)
        return {labels.difference({("__name__", metric)}): (earlier[labels], value,
                                                             self.after.time - self.before.time)
                for labels, value in latest.items() if labels in earlier}


def _unquote(quoted: str) -> str:
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


def _select(scrape: Scrape, matchers) -> dict[Labels, float]:
    selected = {}
    for (name, labels), value in scrape.samples.items():
        series = dict(labels, __name__=name)
        if all(_matches(series.get(label, ""), operator, wanted) for label, operator, wanted in matchers):
            selected[frozenset(series.items())] = value
    return selected


def _matches(value: str, operator: str, wanted: str) -> bool:
    if operator in ("=", "!="):
        return (value == wanted) == (operator == "=")
    return (re.fullmatch(wanted, value) is not None) == (operator == "=~")  # PromQL's regexes are anchored


def _increase(first: float, last: float) -> float:
    return last if last < first else last - first  # a counter that went down was reset


def _vector(value) -> list[Sample]:
    if not isinstance(value, list):
        raise ValueError("PromQL outside the subset: an instant vector was expected")
    return value


def _binary(operator: str, left, right):
    apply = _ARITHMETIC[operator]
    if isinstance(left, float) and isinstance(right, float):
        return apply(left, right)
    if isinstance(left, float):
        return [Sample(_drop_name(sample.labels), apply(left, sample.value)) for sample in _vector(right)]
    if isinstance(right, float):
        return [Sample(_drop_name(sample.labels), apply(sample.value, right)) for sample in _vector(left)]
    # vector-vector: one-to-one on all labels but the name, as Prometheus matches by default
    others = {_drop_name(sample.labels): sample.value for sample in _vector(right)}
    return [Sample(_drop_name(sample.labels), apply(sample.value, others[_drop_name(sample.labels)]))
            for sample in _vector(left) if _drop_name(sample.labels) in others]


def _drop_name(labels: Labels) -> Labels:
    return frozenset((name, value) for name, value in labels if name != "__name__")


def _histogram_quantile(quantile: float, buckets: list[Sample]) -> list[Sample]:
    """Prometheus's: linear interpolation inside the bucket where the rank falls; NaN with no observations."""
    series: dict[Labels, list[tuple[float, float]]] = {}
    for sample in buckets:
        labels = dict(_drop_name(sample.labels))
        if "le" not in labels:
            continue
        upper = float(labels.pop("le"))
        series.setdefault(frozenset(labels.items()), []).append((upper, sample.value))
    results = []
    for labels, points in series.items():
        points.sort()
        results.append(Sample(labels, _quantile(quantile, points)))
    return results


def _quantile(quantile: float, points: list[tuple[float, float]]) -> float:
    if quantile < 0:
        return -math.inf
    if quantile > 1:
        return math.inf
    if len(points) < 2 or points[-1][0] != math.inf or points[-1][1] == 0:
        return math.nan
    rank = quantile * points[-1][1]
    index = next(i for i, (_, count) in enumerate(points) if count >= rank)
    if index == len(points) - 1:
        return points[-2][0]
    upper, count = points[index]
    lower, below = (0.0, 0.0) if index == 0 else points[index - 1]
    if index == 0 and upper <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
