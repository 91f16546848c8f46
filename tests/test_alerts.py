"""Alert rules: in-process evaluation, deploy/alerts.yml kept equal to it, the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app import alerts
from app.alerts import RULES, AlertRules, Sample

ROOT = Path(__file__).resolve().parent.parent
ALERTS_YML = ROOT / "deploy" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
# On PATH, or beside the venv's python where `make test` may unpack it.
PROMTOOL = shutil.which("promtool") or shutil.which(
    "promtool", path=str(Path(sys.executable).parent)
)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install --no-install-recommends prometheus)",
)

#: Metric names hearth exports (histograms by their base name); reconcile with app/metrics.py.
EXPORTED_METRICS = frozenset(
    {
        "up",
        "hearth_requests_total",
        "hearth_http_request_duration_seconds",
        "hearth_errors_total",
        "hearth_publishes_total",
        "hearth_messages_out_total",
        "hearth_deliveries_total",
        "hearth_fanout_seconds",
        "hearth_connections",
        "hearth_connections_limit",
        "hearth_db_state",
        "hearth_db_ping_seconds",
        "hearth_db_unresponsive",
        "hearth_db_query_seconds",
        "hearth_redis_state",
        "hearth_redis_canary_age_seconds",
        "hearth_memory_used_ratio",
        "hearth_disk_free_ratio",
        "hearth_actor_state",
        "hearth_actor_restarts_total",
        "hearth_actor_mailbox_depth",
        "hearth_breaker_state",
        "hearth_spool_depth",
        "hearth_spool_dead_letters",
        "hearth_gc_pause_seconds",
        "hearth_gc_pause_max_seconds",
        "hearth_alerts_firing",
    }
)
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
RUNBOOK_SECTIONS = frozenset(
    {
        "database-lost-or-hung",
        "redis-lost",
        "upstream-down",
        "rate-limit-storms",
        "websocket-trouble",
        "disk-full",
        "dead-letters",
        "instance-down",
        "actor-restart-loop",
        "memory-high",
        "error-rate-high",
    }
)
RULE_BY_NAME = {rule.name: rule for rule in RULES}


def healthy(at: float, **changes: Any) -> Sample:
    """A sample of an instance with nothing wrong, changed by *changes*."""
    sample = Sample(
        at=at,
        requests=0,
        server_errors=0,
        database_state="connected",
        redis_state="connected",
        slow_queries=0,
        memory_used_share=0.5,
        disk_free_share=0.5,
        connections=10,
        connection_limit=100,
        actors_in_restart_loop=(),
        dead_letters=0,
    )
    return replace(sample, **changes)


def firing_names(rules: AlertRules, sample: Sample) -> set[str]:
    return {alert.name for alert in rules.observe(sample)}


def traffic(seconds: int, requests_per_second: int, errors_per_second: int) -> list[Sample]:
    """One healthy sample a second with steady traffic and errors, from 0 to *seconds*."""
    return [
        healthy(t, requests=t * requests_per_second, server_errors=t * errors_per_second)
        for t in range(seconds + 1)
    ]


# In-process rules -------------------------------------------------------------------------

STATE_CASES: dict[str, dict[str, Any]] = {
    "database_down": {"database_state": "reconnecting"},
    "disk_low": {"disk_free_share": 0.05},
    "actor_restart_loop": {"actors_in_restart_loop": ("hub",)},
    "redis_degraded": {"redis_state": "degraded"},
    "memory_high": {"memory_used_share": 0.85},
    "connections_near_limit": {"connections": 90, "connection_limit": 100},
    "dead_letters": {"dead_letters": 2},
}


@pytest.mark.parametrize("name", sorted(STATE_CASES))
def test_a_rule_fires_only_after_its_for_duration_and_clears_with_its_condition(name):
    """A condition held from t=10 fires exactly at 10 + for, keeps since=10, and clears at once."""
    rule = RULE_BY_NAME[name]
    rules = AlertRules()
    start = 10
    end = start + int(rule.for_seconds) + 5
    for t in range(start):
        assert firing_names(rules, healthy(t)) == set()
    for t in range(start, end + 1):
        fired = rules.observe(healthy(t, **STATE_CASES[name]))
        if t - start < rule.for_seconds:
            assert fired == ()
        else:
            assert [(alert.name, alert.severity, alert.since) for alert in fired] == [
                (name, rule.severity, start)
            ]
    assert firing_names(rules, healthy(end + 1)) == set()


def test_a_single_good_sample_restarts_the_for_clock():
    """Memory high for 100 s, fine for one sample, high for 100 s more never fires a 2 min rule."""
    rules = AlertRules()
    fired = set()
    for t in range(100):
        fired |= firing_names(rules, healthy(t, memory_used_share=0.9))
    fired |= firing_names(rules, healthy(100, memory_used_share=0.7))
    for t in range(101, 201):
        fired |= firing_names(rules, healthy(t, memory_used_share=0.9))
    assert fired == set()
    assert firing_names(rules, healthy(221, memory_used_share=0.9)) == {"memory_high"}


@pytest.mark.parametrize(
    "changes",
    [
        {"memory_used_share": alerts.MEMORY_HIGH},
        {"memory_used_share": None},
        {"disk_free_share": alerts.DISK_LOW},
        {"disk_free_share": None},
        {"connections": 89, "connection_limit": 100},
        {"connections": 5000, "connection_limit": 0},
        {"redis_state": "disabled"},
        {"redis_state": "connecting"},
    ],
)
def test_readings_at_a_threshold_or_unknown_never_alert(changes):
    """Memory at 80%, disk at 10% free, 89% of the limit, no limit, unknowns and disabled Redis stay quiet."""
    rules = AlertRules()
    for t in range(700):
        assert firing_names(rules, healthy(t, **changes)) == set()


@pytest.mark.parametrize("state", ["disconnected", "reconnecting", "unresponsive", "unknown"])
def test_every_database_state_but_connected_counts_as_down(state):
    """Unresponsive, unknown and the rest all fire database_down after a minute."""
    rules = AlertRules()
    for t in range(60):
        assert firing_names(rules, healthy(t, database_state=state)) == set()
    fired = rules.observe(healthy(60, database_state=state))
    assert [(alert.name, alert.summary) for alert in fired] == [
        ("database_down", f"database is {state}")
    ]


def test_the_restart_loop_summary_names_the_actors():
    """The actor_restart_loop summary lists every looping actor, sorted."""
    rules = AlertRules()
    fired = rules.observe(healthy(0, actors_in_restart_loop=("hub", "db_monitor")))
    assert [alert.summary for alert in fired] == ["actors in a restart loop: db_monitor, hub"]


def test_a_slow_query_alerts_for_five_minutes_after_it_finished():
    """One statement over 5 s at t=10 fires slow_query from t=10 through t=309 and no longer."""
    rules = AlertRules()
    firing_at = []
    for t in range(400):
        slow = 1 if t >= 10 else 0
        if "slow_query" in firing_names(rules, healthy(t, slow_queries=slow)):
            firing_at.append(t)
    assert firing_at == list(range(10, 310))


def test_alerts_come_critical_first_in_rule_order():
    """With every condition held, all ten rules fire and the critical ones are listed first."""
    rules = AlertRules()
    bad = {
        "database_state": "unresponsive",
        "redis_state": "degraded",
        "memory_used_share": 0.95,
        "disk_free_share": 0.01,
        "connections": 100,
        "connection_limit": 100,
        "actors_in_restart_loop": ("hub",),
        "dead_letters": 1,
    }
    fired: tuple[alerts.Alert, ...] = ()
    for t in range(400):
        fired = rules.observe(
            healthy(t, requests=10 * t, server_errors=5 * t, slow_queries=t, **bad)
        )
    assert [alert.name for alert in fired] == [rule.name for rule in RULES]
    severities = [alert.severity for alert in fired]
    assert severities == sorted(severities)  # "critical" sorts before "warning"
    assert severities.count("critical") == 4


# Error rate -------------------------------------------------------------------------------


def test_error_rate_rules_fire_after_their_for_durations():
    """20% of requests failing from t=1 fires the critical at t=121 and the warning at t=301."""
    rules = AlertRules()
    critical_from = high_from = None
    for sample in traffic(400, requests_per_second=100, errors_per_second=20):
        for alert in rules.observe(sample):
            assert alert.since == 1
            assert alert.value == pytest.approx(0.2)
            assert alert.summary == "20.0% of requests failed over the last 60 s"
            if alert.name == "error_rate_critical" and critical_from is None:
                critical_from = sample.at
            if alert.name == "error_rate_high" and high_from is None:
                high_from = sample.at
    assert (critical_from, high_from) == (121, 301)


def test_a_five_percent_error_rate_fires_only_the_warning():
    """5% failing is over 1% but not over 10%: error_rate_high alone fires."""
    rules = AlertRules()
    fired = set()
    for sample in traffic(400, requests_per_second=100, errors_per_second=5):
        fired |= firing_names(rules, sample)
    assert fired == {"error_rate_high"}


def test_a_counter_reset_is_a_restart_from_zero_not_a_drop_in_traffic():
    """A process restart mid-storm keeps the error rate at exactly 5%, so the warning keeps firing."""
    rules = AlertRules()
    requests = errors = 0
    for t in range(401):
        if t == 320:
            requests = errors = 0  # the counters start over in the new process
        if t > 0:
            requests += 100
            errors += 5
        fired = rules.observe(healthy(t, requests=requests, server_errors=errors))
        if t >= 301:
            assert [(alert.name, alert.since) for alert in fired] == [("error_rate_high", 1)]
            assert fired[0].value == pytest.approx(0.05)


def test_no_requests_means_no_error_rate_alert_even_after_a_storm():
    """With no requests in the last minute the error-rate alerts clear, however many failed before."""
    rules = AlertRules()
    samples = traffic(200, requests_per_second=100, errors_per_second=50)
    for sample in samples:
        rules.observe(sample)
    assert firing_names(rules, samples[-1]) == {"error_rate_critical"}
    quiet = [replace(samples[-1], at=200 + t) for t in range(1, 121)]
    fired_while_quiet = [firing_names(rules, sample) for sample in quiet]
    assert fired_while_quiet[58] == {"error_rate_critical"}  # t=259: t=200 still in range
    assert fired_while_quiet[59:] == [set()] * 61


_steps = st.lists(
    st.tuples(
        st.floats(min_value=0.1, max_value=30.0),
        st.integers(min_value=0, max_value=1000),
        st.booleans(),
    ),
    max_size=200,
)


@given(steps=_steps)
def test_without_server_errors_no_error_rate_alert_ever_fires(steps):
    """With server_errors always 0, whatever the traffic and counter resets, no error-rate alert fires."""
    rules = AlertRules()
    at, requests = 0.0, 0
    for seconds, new_requests, reset in steps:
        at += seconds
        requests = new_requests if reset else requests + new_requests
        names = firing_names(rules, healthy(at, requests=requests))
        assert not names & {"error_rate_critical", "error_rate_high"}


@settings(max_examples=40)
@given(data=st.data())
def test_errors_over_ten_percent_held_for_two_minutes_fire_the_critical(data):
    """More than 10% failing at every step, resets included, fires error_rate_critical after 2 min."""
    rules = AlertRules()
    at, requests, errors = 0.0, 0, 0
    rules.observe(healthy(at))
    first_holding = None
    while first_holding is None or at - first_holding < alerts.ERROR_RATE_CRITICAL_FOR:
        at += data.draw(st.floats(min_value=0.5, max_value=5.0), label="seconds")
        new_requests = data.draw(st.integers(min_value=1, max_value=1000), label="requests")
        new_errors = data.draw(
            st.integers(min_value=new_requests // 10 + 1, max_value=new_requests), label="errors"
        )
        if data.draw(st.booleans(), label="reset"):
            requests, errors = 0, 0
        requests += new_requests
        errors += new_errors
        fired = rules.observe(healthy(at, requests=requests, server_errors=errors))
        if first_holding is None:
            first_holding = at
    critical = [alert for alert in fired if alert.name == "error_rate_critical"]
    assert [alert.since for alert in critical] == [first_holding]
    assert critical[0].value is not None and critical[0].value > alerts.ERROR_RATE_CRITICAL


# Bounded history ------------------------------------------------------------------------


@pytest.mark.parametrize("window", [alerts.LONGEST_RANGE, 600.0])
def test_the_history_keeps_only_the_window(window):
    """Over three hours at one sample a second the history never holds more than window + 1 samples."""
    rules = AlertRules(window=window)
    longest = 0
    for t in range(3 * 3600):
        rules.observe(healthy(t, requests=t))
        longest = max(longest, rules.retained)
    assert longest == window + 1
    assert rules.retained == window + 1


def test_a_window_shorter_than_a_rule_s_range_is_refused():
    """A window that could not hold the slow-query range raises ValueError."""
    with pytest.raises(ValueError, match="window must be at least 300"):
        AlertRules(window=alerts.LONGEST_RANGE - 1)


def test_a_sample_older_than_the_last_is_refused():
    """Samples out of time order raise ValueError instead of corrupting the counters."""
    rules = AlertRules()
    rules.observe(healthy(10))
    with pytest.raises(ValueError, match="older than the last"):
        rules.observe(healthy(9))


# deploy/alerts.yml ------------------------------------------------------------------------


def prometheus_rules() -> dict[str, dict[str, str]]:
    """deploy/alerts.yml's rules by alert name: expr, for, severity and annotations.

    PyYAML is not a dependency, so the file keeps to one key per line; promtool checks the YAML.
    """
    blocks = re.split(r"^\s*- alert: ", ALERTS_YML.read_text(), flags=re.MULTILINE)[1:]
    parsed = {}
    for block in blocks:
        name, _, body = block.partition("\n")
        fields = dict(re.findall(r"^\s+(\w+): (.+)$", body, flags=re.MULTILINE))
        parsed[name.strip()] = {key: value.strip().strip('"') for key, value in fields.items()}
    return parsed


def duration(seconds: float) -> str:
    """*seconds* as a Prometheus duration, the way deploy/alerts.yml writes it."""
    whole = int(seconds)
    assert whole == seconds
    return f"{whole // 60}m" if whole and whole % 60 == 0 else f"{whole}s"


def test_every_in_process_rule_has_a_prometheus_twin():
    """Each rule of app/alerts.py is in deploy/alerts.yml with its severity, for and runbook."""
    prometheus = prometheus_rules()
    assert set(prometheus) == set(RULE_BY_NAME) | {"instance_down", "upstream_breaker_open"}
    for rule in RULES:
        twin = prometheus[rule.name]
        assert (twin["severity"], twin["for"]) == (rule.severity, duration(rule.for_seconds))
        assert twin["runbook_url"] == f"docs/runbook.rst#{rule.runbook}"
    for twin in prometheus.values():
        assert twin["severity"] in {"critical", "warning"}
        assert twin["summary"] and twin["description"]
        assert twin["runbook_url"].removeprefix("docs/runbook.rst#") in RUNBOOK_SECTIONS


def _range_selector(seconds: float) -> str:
    return f"[{duration(seconds)}]"


#: The piece of each rule's expression that carries a constant of app/alerts.py.
THRESHOLD_FRAGMENTS = {
    "error_rate_critical": [
        f") > {alerts.ERROR_RATE_CRITICAL:g}",
        _range_selector(alerts.ERROR_RATE_RANGE),
    ],
    "error_rate_high": [
        f") > {alerts.ERROR_RATE_HIGH:g}",
        _range_selector(alerts.ERROR_RATE_RANGE),
    ],
    "database_down": ['{state="connected"}) != 1'],
    "disk_low": [f"hearth_disk_free_ratio < {alerts.DISK_LOW:g}"],
    "actor_restart_loop": [
        f"{_range_selector(alerts.ACTOR_RESTART_LOOP_RANGE)})) >= {alerts.ACTOR_RESTART_LOOP_RESTARTS}",
        '{state="failed"}) == 1',
    ],
    "redis_degraded": ['{state="degraded"} == 1'],
    "slow_query": [
        f'{{le="{alerts.SLOW_QUERY_SECONDS}"}}',
        _range_selector(alerts.SLOW_QUERY_RANGE),
        ") > 0",
    ],
    "memory_high": [f"hearth_memory_used_ratio > {alerts.MEMORY_HIGH:g}"],
    "connections_near_limit": [
        f"hearth_connections >= {alerts.CONNECTIONS_NEAR_LIMIT:g} * hearth_connections_limit"
    ],
    "dead_letters": ["hearth_spool_dead_letters > 0"],
}


def test_prometheus_thresholds_are_the_module_constants():
    """Every threshold and range in deploy/alerts.yml is the one app/alerts.py evaluates."""
    prometheus = prometheus_rules()
    assert set(THRESHOLD_FRAGMENTS) == set(RULE_BY_NAME)
    for name, fragments in THRESHOLD_FRAGMENTS.items():
        for fragment in fragments:
            assert fragment in prometheus[name]["expr"], (name, fragment)
    numbers = {
        name: {float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", prometheus[name]["expr"])}
        for name in RULE_BY_NAME
    }
    for rule in RULES:
        if rule.threshold is not None:
            assert rule.threshold in numbers[rule.name], rule.name


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(?:hearth_[a-z0-9_]+|up(?=\{))", expr))
    base = set()
    for name in names:
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in EXPORTED_METRICS:
                name = name.removesuffix(suffix)
        base.add(name)
    return base


def test_prometheus_rules_use_only_exported_metrics():
    """Every metric an alert expression reads is one hearth exports."""
    used = set().union(*(_metric_names(rule["expr"]) for rule in prometheus_rules().values()))
    assert used - EXPORTED_METRICS == set()
    assert {"up", "hearth_breaker_state", "hearth_db_query_seconds"} <= used


@needs_promtool
def test_promtool_accepts_the_rules():
    """`promtool check rules deploy/alerts.yml` succeeds and counts every rule."""
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS_YML)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(prometheus_rules())} rules found" in result.stdout


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    every = {"job": "hearth", "instance": "a", **labels}
    rendered = ",".join(f'{key}="{value}"' for key, value in every.items())
    return {"series": f"{metric}{{{rendered}}}", "values": values}


#: For each Prometheus alert: input series (one sample per 15 s, 40 samples = 10 min) that
#: make its condition hold from the start, and the seconds that condition must hold.
PROMETHEUS_SCENARIOS = {
    "instance_down": ([_series("up", "0x40")], 60),
    "error_rate_critical": (
        [
            _series("hearth_requests_total", "0+40x40", transport="http", status_class="2xx"),
            _series("hearth_requests_total", "0+40x40", transport="ws", status_class="2xx"),
            _series("hearth_requests_total", "0+20x40", transport="http", status_class="5xx"),
        ],
        alerts.ERROR_RATE_CRITICAL_FOR,
    ),
    "error_rate_high": (
        [
            _series("hearth_requests_total", "0+95x40", transport="http", status_class="2xx"),
            _series("hearth_requests_total", "0+5x40", transport="ws", status_class="5xx"),
        ],
        alerts.ERROR_RATE_HIGH_FOR,
    ),
    "database_down": (
        [
            _series("hearth_db_state", "0x40", state="connected"),
            _series("hearth_db_state", "1x40", state="unresponsive"),
        ],
        alerts.DATABASE_DOWN_FOR,
    ),
    "disk_low": ([_series("hearth_disk_free_ratio", "0.05x40")], alerts.DISK_LOW_FOR),
    "actor_restart_loop": (
        [
            _series("hearth_actor_state", "0x40", actor="hub", state="running"),
            _series("hearth_actor_restarts_total", "0+1x40", actor="hub"),
        ],
        0,
    ),
    "redis_degraded": (
        [_series("hearth_redis_state", "1x40", state="degraded")],
        alerts.REDIS_DEGRADED_FOR,
    ),
    "slow_query": (
        [
            _series("hearth_db_query_seconds_count", "0+3x40", operation="select", table="m"),
            _series(
                "hearth_db_query_seconds_bucket", "0+2x40", operation="select", table="m", le="5.0"
            ),
        ],
        0,
    ),
    "memory_high": ([_series("hearth_memory_used_ratio", "0.85x40")], alerts.MEMORY_HIGH_FOR),
    "connections_near_limit": (
        [_series("hearth_connections", "90x40"), _series("hearth_connections_limit", "100x40")],
        alerts.CONNECTIONS_NEAR_LIMIT_FOR,
    ),
    "dead_letters": ([_series("hearth_spool_dead_letters", "2x40")], 0),
    "upstream_breaker_open": (
        [_series("hearth_breaker_state", "1x40", source="weather", state="open")],
        300,
    ),
}

#: Series of a healthy instance: every alert stays quiet on them.
HEALTHY_SERIES = [
    _series("up", "1x40"),
    _series("hearth_requests_total", "0+100x40", transport="http", status_class="2xx"),
    _series("hearth_requests_total", "0+0x40", transport="http", status_class="5xx"),
    _series("hearth_db_state", "1x40", state="connected"),
    _series("hearth_db_state", "0x40", state="unresponsive"),
    _series("hearth_disk_free_ratio", "0.5x40"),
    _series("hearth_actor_state", "1x40", actor="hub", state="running"),
    _series("hearth_actor_state", "0x40", actor="hub", state="failed"),
    _series("hearth_actor_restarts_total", "0+0x40", actor="hub"),
    _series("hearth_redis_state", "1x40", state="connected"),
    _series("hearth_redis_state", "0x40", state="degraded"),
    _series("hearth_db_query_seconds_count", "0+3x40", operation="select", table="m"),
    _series("hearth_db_query_seconds_bucket", "0+3x40", operation="select", table="m", le="5.0"),
    _series("hearth_memory_used_ratio", "0.8x40"),
    _series("hearth_connections", "89x40"),
    _series("hearth_connections_limit", "100x40"),
    _series("hearth_spool_dead_letters", "0x40"),
    _series("hearth_breaker_state", "0x40", source="weather", state="open"),
]


def _firing(at: float, expected: list[tuple[str, str]]) -> dict[str, object]:
    return {
        "expr": 'count by (alertname, severity) (ALERTS{alertstate="firing"})',
        "eval_time": f"{at:g}s",
        "exp_samples": [
            {"labels": f'{{alertname="{name}",severity="{severity}"}}', "value": 1}
            for name, severity in expected
        ],
    }


def _promtool_test(tmp_path: Path, tests: list[dict[str, object]]) -> subprocess.CompletedProcess:
    # JSON is YAML, so promtool reads this without PyYAML on our side.
    unit = tmp_path / "alerts_test.yml"
    unit.write_text(
        json.dumps({"rule_files": [str(ALERTS_YML)], "evaluation_interval": "15s", "tests": tests})
    )
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "test", "rules", str(unit)], capture_output=True, text=True, check=False
    )


@needs_promtool
@pytest.mark.parametrize("name", sorted(PROMETHEUS_SCENARIOS))
def test_prometheus_alert_fires_only_after_its_for_duration(name, tmp_path):
    """Under promtool each alert is silent just before its for duration and alone firing after it."""
    series, hold = PROMETHEUS_SCENARIOS[name]
    severity = prometheus_rules()[name]["severity"]
    assert duration(hold) == prometheus_rules()[name]["for"]
    # A range needs a second sample (15 s) before the condition can hold.
    checks = [_firing(hold + 60, [(name, severity)])]
    if hold:
        checks.append(_firing(hold - 15, []))
    result = _promtool_test(
        tmp_path, [{"interval": "15s", "input_series": series, "promql_expr_test": checks}]
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_prometheus_alerts_stay_quiet_on_a_healthy_instance(tmp_path):
    """Ten minutes of healthy series, thresholds met but not crossed, fire no alert under promtool."""
    checks = [_firing(at, []) for at in (60, 300, 540)]
    result = _promtool_test(
        tmp_path, [{"interval": "15s", "input_series": HEALTHY_SERIES, "promql_expr_test": checks}]
    )
    assert result.returncode == 0, result.stdout + result.stderr


# deploy/grafana-dashboard.json --------------------------------------------------------------


def _dashboard_exprs(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_dashboard_is_importable_and_reads_only_exported_metrics():
    """The dashboard takes its data source as an input, and every metric it plots is exported."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 39
    assert [entry["name"] for entry in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    sources = [panel["datasource"] for panel in dashboard["panels"]] + [
        target["datasource"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    assert all(source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for source in sources)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = set().union(*(_metric_names(expr) for expr in _dashboard_exprs(dashboard)))
    assert used - EXPORTED_METRICS == set()
    # Everything but the alerts' own inputs has a panel.
    assert (
        EXPORTED_METRICS - {"up", "hearth_db_query_seconds", "hearth_db_unresponsive"} - used
        == set()
    )
