"""The monitoring files (monitoring/) as the tests read them, and the Prometheus tools.

`promtool` and `prometheus` come from Debian's `prometheus` package (or a Prometheus release);
tests that run them are skipped, with that hint, where they are not on PATH.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "cht-rapidpro.rules.yml"
RULE_TESTS = MONITORING / "cht-rapidpro.rules.test.yml"
DASHBOARD = MONITORING / "cht-rapidpro-dashboard.json"
GRAFANA_ALERTS = MONITORING / "grafana-alerts.yml"
SCRAPE = MONITORING / "scrape.yml"
COMPOSE = MONITORING / "compose.yml"
JOB = "cht-rapidpro"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
_HINT = (
    "not found on PATH: install Prometheus's tools to run this test "
    "(Debian/Ubuntu: apt-get install prometheus; or a Prometheus release's binaries)"
)
requires_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool {_HINT}")
requires_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus {_HINT}")

#: What Grafana puts in place of its variables, for Prometheus to evaluate an expression.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def grafana_expr(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced as Grafana would."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query: panels' targets and the variables' queries."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", grafana_expr(target["expr"])))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_]\w*)\)", query)
            assert inner is not None, f"variable {variable['name']}: {query!r}"
            found.append((f"variable {variable['name']!r}", grafana_expr(inner.group(1))))
    return found


def all_exprs() -> list[tuple[str, str]]:
    """Every PromQL expression shipped: alert rules and dashboard queries."""
    rules = [(f"alert {rule['alert']}", str(rule["expr"])) for rule in alert_rules()]
    return rules + dashboard_exprs()


# -- the metric names and label matchers of a PromQL expression ------------------------------

_AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ]
)
_GROUPING = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])
_KEYWORDS = frozenset(["and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"]) | _GROUPING
_STRING = r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`'
_TOKEN = re.compile(
    rf"(?P<string>{_STRING})"
    rf"|(?P<matchers>\{{(?:{_STRING}|[^{{}}\"'`])*\}})"
    r"|(?P<range>\[[^\]]*\])"
    r"|(?P<number>(?<![\w:])\d[\w.]*|0x[0-9a-fA-F]+)"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<space>\s+)"
    r"|(?P<other>.)",
    re.DOTALL,
)
_MATCHER = re.compile(rf"\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*({_STRING})\s*,?")


@dataclass(frozen=True)
class Selector:
    """A vector selector: the metric name and its label matchers (name, op, value)."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]


def selectors(expr: str) -> list[Selector]:
    """Every vector selector of `expr`, in order.

    A small PromQL scanner: identifiers followed by `(` are functions, aggregations are known
    by name, grouping clauses (`by (…)`, `on (…)`, …) hold label names, keywords are skipped;
    every other identifier is a metric name. Selectors without a name are refused, so that no
    metric can hide from the check.
    """
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    tokens = [(kind, text) for kind, text in tokens if kind != "space"]
    found: list[Selector] = []
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else (None, "")
        if kind == "matchers":
            raise ValueError(f"a selector without a metric name in {expr!r}")
        if kind != "ident":
            index += 1
            continue
        lowered = text.lower()
        if text in _GROUPING and following[1] == "(":
            index = _skip_parenthesised(tokens, index + 1)
            continue
        if following[1] == "(" or text in _AGGREGATIONS or lowered in _KEYWORDS:
            index += 1
            continue
        matchers: tuple[tuple[str, str, str], ...] = ()
        if following[0] == "matchers":
            body = following[1][1:-1]
            parsed = _MATCHER.findall(body)
            if "".join(_MATCHER.sub("", body).split()):
                raise ValueError(f"cannot read the matchers {following[1]!r} in {expr!r}")
            matchers = tuple(
                (name, op, json.loads(_json_string(value))) for name, op, value in parsed
            )
            index += 1
        found.append(Selector(text, matchers))
        index += 1
    return found


def _json_string(literal: str) -> str:
    if literal.startswith("`"):
        return json.dumps(literal[1:-1])
    if literal.startswith("'"):
        return json.dumps(literal[1:-1].replace("\\'", "'"))
    return literal


def _skip_parenthesised(tokens: list[tuple[str | None, str]], index: int) -> int:
    """The index after the parenthesised group starting at `index`."""
    depth = 0
    while index < len(tokens):
        text = tokens[index][1]
        depth += text == "("
        depth -= text == ")"
        index += 1
        if depth == 0:
            return index
    raise ValueError("unbalanced parentheses")
