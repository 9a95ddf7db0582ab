"""Just enough PromQL to say what an expression reads: its metric selectors with their label matchers, the labels
its grouping clauses and label_replace name, and the functions it calls.

Used by the deploy tests to check alert rules, recording rules and dashboard queries against the metrics the code
exports, without a Prometheus. promtool, where installed, checks the full grammar; this only has to find names,
and it fails loudly on anything it does not understand rather than skip it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Grafana's interval variables stand in a range selector; any duration reads the same here.
GRAFANA_INTERVALS = re.compile(r"\$__(?:rate_)?interval\b|\$__range\b")

FUNCTIONS = frozenset(
    {
        "abs",
        "absent",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp_max",
        "clamp_min",
        "deriv",
        "floor",
        "histogram_quantile",
        "increase",
        "irate",
        "label_replace",
        "max_over_time",
        "min_over_time",
        "predict_linear",
        "rate",
        "round",
        "time",
        "vector",
    }
)
AGGREGATIONS = frozenset({"avg", "count", "max", "min", "quantile", "stddev", "sum", "topk", "bottomk"})
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = LABEL_LIST_KEYWORDS | {"and", "or", "unless", "bool", "offset"}

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<range>\[[0-9smhdwy:]+\])
    |(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])
    |(?P<space>\s+)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Matcher:
    """One label matcher of a selector: label, operator (=, !=, =~, !~) and value."""

    label: str
    op: str
    value: str

    def accepts(self, candidate: str) -> bool:
        """True when a series whose label has this value is selected."""
        if self.op in ("=", "!="):
            return (candidate == self.value) == (self.op == "=")
        return bool(re.fullmatch(self.value, candidate)) == (self.op == "=~")


@dataclass(frozen=True)
class Selector:
    """A metric selector: `name{label="value", ...}`."""

    metric: str
    matchers: tuple[Matcher, ...]


@dataclass
class Query:
    """What one PromQL expression reads and names."""

    selectors: list[Selector] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)
    """Labels of by/without/on/ignoring/group_left/group_right clauses."""
    replacements: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(destination, replacement, source, regex) of every label_replace, outermost first."""
    functions: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> set[str]:
        """Every metric name the expression selects."""
        return {selector.metric for selector in self.selectors}

    @property
    def added_labels(self) -> set[str]:
        """Labels label_replace writes."""
        return {destination for destination, _, _, _ in self.replacements}


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


def tokens(expr: str) -> list[Token]:
    """The expression as tokens, spaces dropped; a character no token starts with is an error."""
    text = GRAFANA_INTERVALS.sub("5m", expr)
    found: list[Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {text[position : position + 20]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            found.append(Token(kind, match.group()))
        position = match.end()
    return found


def parse(expr: str) -> Query:
    """What the expression reads: selectors, grouping labels, label_replace labels, functions."""
    query = Query()
    items = tokens(expr)
    i = 0
    while i < len(items):
        token = items[i]
        following = items[i + 1].text if i + 1 < len(items) else None
        if token.kind == "name" and token.text in LABEL_LIST_KEYWORDS and following == "(":
            labels, i = _label_list(items, i + 1)
            query.grouping_labels |= labels
            continue
        if token.kind == "name" and token.text in KEYWORDS:
            i += 1
            continue
        if (token.kind == "name" and following == "(") or (
            token.text in AGGREGATIONS and following in ("by", "without")
        ):
            _call(query, items, i, expr)
            i += 1
            continue
        if token.kind == "name":
            selector, i = _selector(items, i, expr)
            query.selectors.append(selector)
            continue
        if token.text == "{":
            raise ValueError(f"a selector without a metric name in {expr!r}")
        i += 1
    return query


def _call(query: Query, items: list[Token], i: int, expr: str) -> None:
    name = items[i].text
    if name not in FUNCTIONS | AGGREGATIONS:
        raise ValueError(f"unknown function {name}() in {expr!r}")
    query.functions.add(name)
    if name == "label_replace":
        arguments = _arguments(items, i + 1)
        strings = [argument[0].text[1:-1] for argument in arguments[1:] if len(argument) == 1]
        if len(arguments) != 5 or len(strings) != 4 or any(a[0].kind != "string" for a in arguments[1:]):
            raise ValueError(f"label_replace takes a vector and four strings in {expr!r}")
        destination, replacement, source, regex = strings
        query.replacements.append((destination, replacement, source, regex))


def _arguments(items: list[Token], open_at: int) -> list[list[Token]]:
    """The top-level, comma-separated arguments of the call whose `(` is at open_at."""
    arguments: list[list[Token]] = [[]]
    depth = 0
    for token in items[open_at:]:
        if token.text in ("(", "{"):
            depth += 1
            if depth == 1:
                continue
        elif token.text in (")", "}"):
            depth -= 1
            if depth == 0:
                return arguments
        elif token.text == "," and depth == 1:
            arguments.append([])
            continue
        arguments[-1].append(token)
    raise ValueError("unbalanced parentheses")


def _label_list(items: list[Token], open_at: int) -> tuple[set[str], int]:
    """The label names of `(a, b)` at open_at, and the index after its `)`."""
    labels: set[str] = set()
    i = open_at + 1
    while items[i].text != ")":
        if items[i].kind == "name":
            labels.add(items[i].text)
        elif items[i].text != ",":
            raise ValueError(f"not a label list: {items[i].text!r}")
        i += 1
    return labels, i + 1


def _selector(items: list[Token], i: int, expr: str) -> tuple[Selector, int]:
    """The selector starting at i (a metric name, maybe with `{...}`), and the index after it."""
    metric = items[i].text
    i += 1
    matchers: list[Matcher] = []
    if i < len(items) and items[i].text == "{":
        i += 1
        while items[i].text != "}":
            label, op, value = items[i], items[i + 1], items[i + 2]
            if label.kind != "name" or op.text not in ("=", "!=", "=~", "!~") or value.kind != "string":
                raise ValueError(f"not a label matcher at {label.text!r} in {expr!r}")
            matchers.append(Matcher(label.text, op.text, value.text[1:-1]))
            i += 3
            if items[i].text == ",":
                i += 1
        i += 1
    return Selector(metric, tuple(matchers)), i
