"""The files in monitoring/ on their own: promtool checks and runs the alert rules' unit tests,
every shipped expression parses, the Grafana alerts are the rules, and the Watchdog wiring
holds together. (tests/monitoring/test_exported_metrics.py checks them against a daemon.)"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from promql import (
    COMPOSE,
    DASHBOARD,
    GRAFANA_ALERTS,
    JOB,
    PROMTOOL,
    ROOT,
    RULE_TESTS,
    RULES,
    SCRAPE,
    alert_rules,
    all_exprs,
    dashboard,
    dashboard_exprs,
    load_yaml,
    requires_promtool,
    selectors,
)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# -- the alert rules ------------------------------------------------------------------------


@requires_promtool
def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@requires_promtool
def test_promtool_runs_the_rules_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """The unit tests have, for each alert, an evaluation where it fires and one where not."""
    tests = load_yaml(RULE_TESTS)["tests"]
    assert load_yaml(RULE_TESTS)["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
            for alert in case.get("exp_alerts") or []:
                # Instances other than "a" are there not to fire.
                assert alert["exp_labels"]["instance"] in ("a", "past"), alert
    names = {rule["alert"] for rule in alert_rules()}
    assert firing == names
    assert quiet == names


def test_rules_have_the_labels_and_annotations_alerting_needs() -> None:
    for rule in alert_rules():
        assert rule["alert"].startswith("ChtRapidpro"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["labels"]["service"] == JOB
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


@requires_promtool
def test_every_shipped_expression_is_valid_promql(tmp_path: Path) -> None:
    """Rules and dashboard queries (Grafana's variables filled in), parsed by promtool."""
    exprs = all_exprs()
    recording = {
        "groups": [
            {
                "name": "parse",
                "rules": [
                    {"record": f"parsed:expr_{n}", "expr": expr}
                    for n, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(recording), encoding="utf-8")
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# -- Grafana (CHT Watchdog alerts from Grafana) ---------------------------------------------


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "monitoring_alerts", ROOT / "scripts" / "monitoring_alerts.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grafana_alerts_are_the_prometheus_rules() -> None:
    generator = _generator()
    assert GRAFANA_ALERTS.read_text(encoding="utf-8") == generator.grafana_alerts(
        RULES.read_text(encoding="utf-8")
    ), "monitoring/grafana-alerts.yml is out of date: run scripts/monitoring-alerts"
    (group,) = load_yaml(GRAFANA_ALERTS)["groups"]
    assert group["folder"] == "CHT"  # beside Watchdog's own alerts
    grafana = {rule["title"]: rule for rule in group["rules"]}
    prometheus = {rule["alert"]: rule for rule in alert_rules()}
    assert list(grafana) == list(prometheus)
    uids = [rule["uid"] for rule in grafana.values()]
    assert len(set(uids)) == len(uids) and all(len(uid) <= 40 for uid in uids)
    for name, rule in prometheus.items():
        mirrored = grafana[name]
        query, condition = mirrored["data"]
        assert query["model"]["expr"] == rule["expr"], name
        assert query["datasourceUid"] == generator.WATCHDOG_DATASOURCE_UID
        assert mirrored["condition"] == condition["refId"]
        assert mirrored["for"] == rule.get("for", "0s")
        assert mirrored["labels"] == rule["labels"]
        assert mirrored["noDataState"] == "OK"
        assert mirrored["annotations"]["__dashboardUid__"] == dashboard()["uid"]
        for key, text in rule["annotations"].items():
            assert mirrored["annotations"][key] == text.replace("$value", "$values.A.Value")


# -- the Watchdog wiring --------------------------------------------------------------------


def test_scrape_config_selects_the_job_the_rules_and_dashboard_use() -> None:
    (job,) = load_yaml(SCRAPE)["scrape_configs"]
    assert job["job_name"] == JOB
    assert job["scrape_interval"] == "1m"  # the rules' windows count on 1-minute samples
    ups = [s for _, expr in all_exprs() for s in selectors(expr) if s.name == "up"]
    assert ups, "nothing watches up"
    assert all(("job", "=", JOB) in s.matchers for s in ups), ups


def test_compose_override_mounts_the_files_where_watchdog_reads_them() -> None:
    services = load_yaml(COMPOSE)["services"]
    mounts: dict[str, str] = {}
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source, target, mode = volume.split(":")
            assert mode == "ro"
            assert source.startswith("./exporters/cht-rapidpro/"), source
            mounts[target] = source.removeprefix("./exporters/cht-rapidpro/")
    assert mounts == {
        # Watchdog's prometheus.yml: scrape_config_files: /etc/prometheus/scrape_configs/*.yml
        "/etc/prometheus/scrape_configs/cht-rapidpro.yml": SCRAPE.name,
        "/etc/prometheus/cht-rapidpro-metrics-password": "metrics-password",  # the operator's
        # Grafana reads every file in provisioning/alerting; Watchdog's dashboard provider
        # reads provisioning/dashboards/CHT.
        "/etc/grafana/provisioning/alerting/cht-rapidpro.yml": GRAFANA_ALERTS.name,
        "/etc/grafana/provisioning/dashboards/CHT/cht-rapidpro.json": DASHBOARD.name,
    }
    (job,) = load_yaml(SCRAPE)["scrape_configs"]
    assert job["basic_auth"]["password_file"] == "/etc/prometheus/cht-rapidpro-metrics-password"


@requires_promtool
def test_scrape_config_is_valid_for_prometheus(tmp_path: Path) -> None:
    """Watchdog includes the file by scrape_config_files (Prometheus ≥ 2.43); promtool checks
    it here inside a whole configuration, which any Prometheus version reads."""
    config: dict[str, Any] = {"global": {"scrape_interval": "5m"}, **load_yaml(SCRAPE)}
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the dashboard --------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == JOB
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids)
    variable = {"type": "prometheus", "uid": "${datasource}"}
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == variable, panel["title"]
        assert panel["description"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        assert all(target["datasource"] == variable for target in panel["targets"])


def test_every_alert_is_on_the_dashboard() -> None:
    """Each alert's metrics are shown, and a panel's description names the alert."""
    descriptions = " ".join(panel.get("description", "") for panel in dashboard()["panels"])
    shown = {s.name for _, expr in dashboard_exprs() for s in selectors(expr)}
    for rule in alert_rules():
        assert rule["alert"] in descriptions, rule["alert"]
        missing = {s.name for s in selectors(str(rule["expr"]))} - shown
        assert not missing, f"{rule['alert']}: {missing} on no panel"


def test_the_readme_lists_every_alert() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for rule in alert_rules():
        assert f"| `{rule['alert']}` |" in readme, rule["alert"]
