"""promql.selectors: the metric names (and matchers) the monitoring tests check expressions by.

If it missed a name, a renamed metric could hide in a panel; so it is tested on the PromQL
shapes the rules and the dashboard use, and it refuses what it cannot read.
"""

from __future__ import annotations

import pytest

from promql import Selector, all_exprs, selectors


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('up{job="cht-rapidpro"} == 0', [Selector("up", (("job", "=", "cht-rapidpro"),))]),
        (
            "(chtrp_healthy == 0) unless on (job, instance) (chtrp_sending_paused == 1)",
            [Selector("chtrp_healthy", ()), Selector("chtrp_sending_paused", ())],
        ),
        (
            "chtrp_oldest_unsent_age_seconds > 15 * 60",
            [Selector("chtrp_oldest_unsent_age_seconds", ())],
        ),
        (
            "sum by (job, instance) "
            '(increase(chtrp_webhook_requests_total{code=~"5.."}[10m])) >= 3',
            [Selector("chtrp_webhook_requests_total", (("code", "=~", "5.."),))],
        ),
        (
            "histogram_quantile(0.95, sum by (le, instance) (rate(chtrp_send_seconds_bucket"
            '{instance=~".*"}[1m])))',
            [Selector("chtrp_send_seconds_bucket", (("instance", "=~", ".*"),))],
        ),
        (
            "sum(rate(a_total[5m] offset 1h)) by (le) / ignoring(x) group_left(y) b and bool c",
            [Selector("a_total", ()), Selector("b", ()), Selector("c", ())],
        ),
        ("x{a=\"}\", b!~'q'} < +Inf or nan", [Selector("x", (("a", "=", "}"), ("b", "!~", "q")))]),
        ("max_over_time(d:recorded[5m:1m]) - 1e3", [Selector("d:recorded", ())]),
    ],
    ids=[
        "matcher",
        "unless-on",
        "arithmetic",
        "aggregation-by-first",
        "histogram",
        "keywords-and-grouping",
        "strings-and-inf",
        "subquery-and-colons",
    ],
)
def test_selectors(expr: str, expected: list[Selector]) -> None:
    assert selectors(expr) == expected


@pytest.mark.parametrize(
    "expr", ['{__name__="chtrp_healthy"}', 'x{a="1" junk}'], ids=["nameless", "unreadable"]
)
def test_what_it_cannot_check_is_refused(expr: str) -> None:
    with pytest.raises(ValueError, match=r"selector without a metric name|cannot read"):
        selectors(expr)


def test_every_shipped_expression_selects_something() -> None:
    for where, expr in all_exprs():
        assert selectors(expr), f"{where}: no metric found in {expr!r}"
