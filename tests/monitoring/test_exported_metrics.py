"""The alert rules and the dashboard against the metrics a real daemon exports.

A daemon is driven so that the series the rules watch exist (a message sent through the
sandbox after one 429, delivered; a refused, a stored and a malformed webhook call; a
malformed message document), and its /metrics is scraped. Then:

- every metric name (and matcher label) used by a rule or a panel is one it exports, so a
  renamed metric or label fails here instead of silently emptying a panel or an alert;
- promtool lints the exposition, and runs the rules over the daemon's own series: quiet as
  they are, and each alert firing when the real series it watches moves;
- a real Prometheus scrapes the daemon with the shipped scrape config, evaluates the rules
  without error and answers every dashboard query.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pouchdb import free_port
from promql import (
    JOB,
    PROMETHEUS,
    PROMTOOL,
    RULES,
    SCRAPE,
    alert_rules,
    all_exprs,
    load_yaml,
    requires_prometheus,
    requires_promtool,
    selectors,
)
from support import INCOMING_KEY, CouchAdmin, all_tasks, eventually, message_doc, task

V2 = "/api/v2/sms/rapidpro/incoming-messages"
#: Labels Prometheus adds to every scraped series (the daemon exports neither).
TARGET_LABELS = frozenset({"job", "instance"})
INSTANCE = "cht.example.org:8443"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Driven:
    daemon: Any
    text: str  # the /metrics body

    @property
    def samples(self) -> list[Sample]:
        return [
            Sample(sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
        ]

    def labels_of(self, name: str) -> set[str]:
        return {label for s in self.samples if s.name == name for label in s.labels}


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def _webhook(daemon: Any, key: str, body: Any) -> int:
    headers = {"Authorization": f"Token {key}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(daemon.url + V2, data=json.dumps(body), headers=headers) as resp,
    ):
        return resp.status


@pytest.fixture
async def driven(cht: CouchAdmin, rapidpro: Any, daemon_factory: Any) -> Driven:
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    # One 429 before the broadcast is accepted: the throttle series exist too.
    rapidpro.sandbox.add_fault(method="POST", path="broadcasts.json", status=429, retry_after=1)
    doc = await cht.put(message_doc([task("+254700000501", "watched")]))
    await cht.put(
        {"_id": "malformed", "type": "data_record", "tasks": [{"state": "pending", "messages": 1}]}
    )
    daemon = await daemon_factory()

    async def state() -> str:
        found = await cht.get(doc["_id"])
        assert found is not None
        return str(all_tasks(found)[0]["state"])

    await eventually(state, lambda s: s == "delivered", what="message delivered")
    sms = {"id": str(uuid.uuid4()), "from": "+254700000502", "content": "hello"}
    assert await _webhook(daemon, "not-the-key", sms) == 403
    assert await _webhook(daemon, INCOMING_KEY, sms) == 200
    assert await _webhook(daemon, INCOMING_KEY, {"from": "+254700000502"}) == 400

    async def scrape() -> str:
        status, text = await _get(daemon.url + "/metrics")
        assert status == 200
        return text

    text = await eventually(
        scrape,
        lambda t: "chtrp_bad_documents_total 1.0" in t,
        what="the malformed document counted",
    )
    return Driven(daemon, text)


# -- every name the rules and panels use is exported ------------------------------------------


async def test_every_metric_and_label_used_is_exported(driven: Driven) -> None:
    exported = {sample.name for sample in driven.samples}
    unknown = []
    for where, expr in all_exprs():
        for selector in selectors(expr):
            if selector.name == "up":  # Prometheus's own, per target
                continue
            if selector.name not in exported:
                unknown.append(f"{where}: {selector.name} is not exported")
                continue
            for label, _, _ in selector.matchers:
                if label not in TARGET_LABELS and label not in driven.labels_of(selector.name):
                    unknown.append(f"{where}: {selector.name} has no label {label!r}")
    assert unknown == [], "\n".join(unknown)


async def test_the_state_gauges_have_the_values_the_quiet_rules_expect(driven: Driven) -> None:
    values = {s.name: s.value for s in driven.samples if not s.labels}
    assert values["chtrp_healthy"] == 1
    assert values["chtrp_sending_paused"] == 0
    assert values["chtrp_unsent_messages"] == 0  # the malformed document holds none
    assert values["chtrp_oldest_unsent_age_seconds"] == 0
    assert values["chtrp_bad_documents_total"] == 1


# -- promtool on the exposition and on the daemon's series ------------------------------------


def _promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> Any:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, cwd=cwd, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


@requires_promtool
async def test_promtool_lints_the_exposition(driven: Driven) -> None:
    result = _promtool("check", "metrics", stdin=driven.text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout


def _series(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _values(values: list[float]) -> str:
    def one(value: float) -> str:
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)

    return " ".join(one(value) for value in values)


MINUTES = 31  # 0m..30m, a sample a minute; alerts are looked at 30m


def _constant(value: float) -> list[float]:
    return [value] * MINUTES


def _growing(step: float) -> Callable[[float], list[float]]:
    return lambda start: [start + step * minute for minute in range(MINUTES)]


@dataclass(frozen=True)
class Move:
    """Moves one of the daemon's real series (or a copy with `relabel`) to fire `alert`."""

    alert: str
    metric: str
    labels: dict[str, str]  # picks the series among the scraped ones
    values: Callable[[float], list[float]]
    relabel: dict[str, str] | None = None
    aggregated: bool = False  # the rule sums by (job, instance)


MOVES = [
    Move("ChtRapidproDown", "up", {}, lambda _: _constant(0)),
    Move("ChtRapidproUnhealthy", "chtrp_healthy", {}, lambda _: _constant(0)),
    Move("ChtRapidproSendingPaused", "chtrp_sending_paused", {}, lambda _: _constant(1)),
    Move("ChtRapidproMessagesPending", "chtrp_oldest_unsent_age_seconds", {}, _growing(60)),
    Move("ChtRapidproThrottled", "chtrp_rapidpro_throttled_total", {"scope": "broadcasts"},
         _growing(1)),
    Move("ChtRapidproBudgetExhausted", "chtrp_rapidpro_budget_remaining",
         {"scope": "broadcasts"}, lambda _: _constant(0)),
    Move("ChtRapidproFeedLagging", "chtrp_feed_lag_seconds", {}, _growing(60)),
    Move("ChtRapidproWebhookRefused", "chtrp_webhook_requests_total", {"code": "403"},
         _growing(1)),
    # No 5xx was provoked: a copy of the real 403 series with another code stands in for one.
    Move("ChtRapidproWebhookErrors", "chtrp_webhook_requests_total", {"code": "403"},
         _growing(1), relabel={"code": "503"}, aggregated=True),
    Move("ChtRapidproWriteConflicts", "chtrp_write_conflicts_total", {}, _growing(2),
         aggregated=True),
    Move("ChtRapidproBadDocuments", "chtrp_bad_documents_total", {}, _growing(1)),
]  # fmt: skip


def _promtool_test(driven: Driven, move: Move | None) -> dict[str, Any]:
    """A promtool test group: the daemon's series held still for 30 minutes, but `move`."""
    target = {"job": JOB, "instance": INSTANCE}
    series: dict[str, list[float]] = {_series("up", target): _constant(1)}
    for sample in driven.samples:
        series[_series(sample.name, {**sample.labels, **target})] = _constant(sample.value)
    expected = []
    if move is not None:
        picked = [
            s
            for s in [Sample("up", {}, 1.0), *driven.samples]
            if s.name == move.metric and move.labels.items() <= s.labels.items()
        ]
        assert len(picked) == 1, f"{move.alert}: the daemon exports no {move.metric}{move.labels}"
        labels = {**picked[0].labels, **(move.relabel or {}), **target}
        series[_series(move.metric, labels)] = move.values(picked[0].value)
        (rule,) = [rule for rule in alert_rules() if rule["alert"] == move.alert]
        fired = target if move.aggregated else labels
        alert = {**fired, **rule["labels"], "alertname": move.alert, "alertstate": "firing"}
        expected = [{"labels": _series("ALERTS", alert), "value": 1}]
    return {
        "name": f"the daemon's series, {move.alert if move else 'still'}",
        "interval": "1m",
        "input_series": [
            {"series": name, "values": _values(values)} for name, values in series.items()
        ],
        "promql_expr_test": [
            {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "30m", "exp_samples": expected}
        ],
    }


@requires_promtool
async def test_rules_over_the_daemons_own_series(driven: Driven, tmp_path: Path) -> None:
    """Held still, the daemon's series fire nothing; each moved series fires its alert and
    only that one (so its selector, labels and threshold fit what the daemon exports)."""
    assert {move.alert for move in MOVES} == {rule["alert"] for rule in alert_rules()}
    tests = [_promtool_test(driven, None), *(_promtool_test(driven, move) for move in MOVES)]
    path = tmp_path / "daemon-series.test.yml"
    path.write_text(
        yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}),
        encoding="utf-8",
    )
    result = _promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- a real Prometheus scraping the daemon ----------------------------------------------------


@contextlib.contextmanager
def _prometheus(config: dict[str, Any], workdir: Path) -> Iterator[str]:
    assert PROMETHEUS is not None
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    address = f"127.0.0.1:{free_port()}"
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://{address}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def _api(base: str, path: str, **params: str) -> Any:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(base + path, params=params) as resp,
        ):
            body = await resp.json()
    except aiohttp.ClientError:
        return None  # not listening yet
    assert body["status"] == "success", body
    return body["data"]


@requires_prometheus
async def test_real_prometheus_scrapes_the_daemon_and_answers_every_query(
    driven: Driven, tmp_path: Path
) -> None:
    """The shipped scrape config (its target pointed at the test daemon, 1-second scrapes),
    the rules loaded as they are."""
    (job,) = load_yaml(SCRAPE)["scrape_configs"]
    password = tmp_path / "metrics-password"
    password.write_text("s3cret\n", encoding="utf-8")
    job.update(scrape_interval="1s", scrape_timeout="1s", scheme="http")
    job["basic_auth"]["password_file"] = str(password)
    job["static_configs"] = [{"targets": [driven.daemon.url.removeprefix("http://")]}]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [job],
    }
    with _prometheus(config, tmp_path) as base:

        async def rules() -> list[dict[str, Any]]:
            data = await _api(base, "/api/v1/rules")
            return [] if data is None else [r for g in data["groups"] for r in g["rules"]]

        def evaluated(found: list[dict[str, Any]]) -> bool:
            return len(found) == len(alert_rules()) and all(
                not r["lastEvaluation"].startswith("0001") for r in found
            )

        async def scrapes() -> float:
            data = await _api(
                base, "/api/v1/query", query=f'count_over_time(up{{job="{JOB}"}}[1m])'
            )
            return float(data["result"][0]["value"][1]) if data and data["result"] else 0.0

        # Two scrapes, so that rate() over the dashboard's windows has two samples.
        await eventually(scrapes, lambda n: n >= 2, within=60, what="two scrapes of the daemon")
        found = await eventually(rules, evaluated, within=60, what="every rule evaluated")
        assert [(r["name"], r["health"], r.get("lastError", "")) for r in found] == [
            (rule["alert"], "ok", "") for rule in alert_rules()
        ]
        up = await _api(base, "/api/v1/query", query=f'up{{job="{JOB}"}}')
        assert [sample["value"][1] for sample in up["result"]] == ["1"]

        for where, expr in all_exprs():
            data = await _api(base, "/api/v1/query", query=expr)
            assert data is not None and "resultType" in data, f"{where}: {expr}"
            for selector in selectors(expr):
                series = await _api(base, "/api/v1/series", **{"match[]": selector.name})
                assert series, f"{where}: Prometheus holds no {selector.name}"
        # The panels the operator looks at first show the daemon's values.
        stats = ["chtrp_healthy", "chtrp_sending_paused", "chtrp_oldest_unsent_age_seconds"]
        for name in stats:
            data = await _api(base, "/api/v1/query", query=f'{name}{{job="{JOB}"}}')
            assert len(data["result"]) == 1, name
        alerts = await _api(base, "/api/v1/alerts")
        assert alerts["alerts"] == []  # a healthy daemon: nothing pending or firing
