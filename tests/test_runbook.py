"""The runbook: it renders, and every command, metric, anchor and alert it relies on is real."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import docutils.core
import pytest
from docutils import nodes

from app.__main__ import build_parser
from app.alerts import RULES

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "docs" / "runbook.rst"
TEXT = RUNBOOK.read_text()
ALERTS_YML = (ROOT / "deploy" / "alerts.yml").read_text()

#: Calls whose first argument names a metric family (app/metrics.py, app/diagnostics.py).
METRIC_FACTORIES = frozenset(
    {"Counter", "Gauge", "Histogram", "GaugeMetricFamily", "CounterMetricFamily", "gauge"}
)
#: Sample suffixes a family's series may carry in the text.
SAMPLE_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
#: A command line for the CLI ends at the first shell operator or comment.
SHELL_END = re.compile(r"\s(?:\||&&|;|#|>|<)|\)|`")


def _doctree() -> nodes.document:
    return docutils.core.publish_doctree(
        TEXT, settings_overrides={"report_level": 5, "halt_level": 5}
    )


def _cli_commands() -> list[str]:
    """Every ``python -m app ...`` command line quoted in the runbook, without shell extras."""
    commands = []
    for node in _doctree().findall(lambda n: isinstance(n, nodes.literal | nodes.literal_block)):
        text = node.astext().replace("\\\n", " ")
        if isinstance(node, nodes.literal):
            text = " ".join(text.split())  # an inline literal may wrap across source lines
        for line in text.splitlines():
            for match in re.finditer(r"python -m app\b(?!\.)(.*)", line):
                rest = match.group(1)
                end = SHELL_END.search(rest)
                commands.append((rest[: end.start()] if end else rest).strip())
    return commands


def _metric_families() -> set[str]:
    """Family names defined in app/metrics.py and exported by the diagnostics collector."""
    families = set()
    for source in ("app/metrics.py", "app/diagnostics.py"):
        for node in ast.walk(ast.parse((ROOT / source).read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            first = node.args[0]
            if name in METRIC_FACTORIES and isinstance(first, ast.Constant):
                families.add(str(first.value).removesuffix("_total"))
    return families


def _section_ids() -> set[str]:
    ids = set()
    for section in _doctree().findall(nodes.section):
        ids.update(section["ids"])
    return ids


def test_runbook_renders_without_warnings():
    """docs/runbook.rst renders with docutils and reports not even a warning."""
    stream = io.StringIO()
    docutils.core.publish_string(
        TEXT,
        writer="null",
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": stream},
    )
    assert stream.getvalue() == ""


def test_runbook_quotes_the_cli_commands_operators_need():
    """The runbook quotes the maintenance, backup, check, spool and dead-letter commands."""
    quoted = {" ".join(command.split()[:2]) for command in _cli_commands()}
    for needed in ("maintenance on", "maintenance off", "backup verify", "check",
                   "drain-spool", "dead-letters list", "dead-letters retry", "token issue",
                   "user add"):  # fmt: skip
        assert any(command.startswith(needed) for command in quoted), needed


@pytest.mark.parametrize("command", sorted(set(_cli_commands())))
def test_quoted_cli_command_parses(command):
    """Every ``python -m app`` command line the runbook quotes is accepted by the CLI parser."""
    argv = shlex.split(command)
    assert argv, "a bare python -m app"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on an unknown command or a bad argument
        if exc.code != 0:  # --help exits 0
            pytest.fail(f"python -m app {command!r} does not parse (exit {exc.code})")


def test_every_metric_named_exists():
    """Every ``hearth_*`` name in the runbook is a metric family hearth exports."""
    families = _metric_families()
    assert {"hearth_db_state", "hearth_actor_state", "hearth_requests"} <= families
    named = set(re.findall(r"\bhearth_[a-z0-9_]+", TEXT))
    assert len(named) > 20
    unknown = sorted(
        name
        for name in named
        if name not in families
        and not any(name.removesuffix(suffix) in families for suffix in SAMPLE_SUFFIXES)
    )
    assert not unknown, unknown


def test_every_alert_runbook_url_resolves():
    """Each runbook_url of deploy/alerts.yml and each rule's runbook is a runbook section."""
    anchors = set(re.findall(r"runbook_url:\s*\"?docs/runbook\.rst#([\w-]+)", ALERTS_YML))
    assert len(anchors) >= 5
    anchors |= {rule.runbook for rule in RULES}
    missing = sorted(anchors - _section_ids())
    assert not missing, missing


def test_runbook_has_the_issue_scenarios():
    """The seven scenarios of issue 12 and the extra alert targets are sections."""
    expected = {
        "database-lost-or-hung", "redis-lost", "upstream-down", "rate-limit-storms",
        "websocket-trouble", "disk-full", "dead-letters", "instance-down",
        "actor-restart-loop", "memory-high",
    }  # fmt: skip
    assert expected <= _section_ids()


def test_every_alert_is_mentioned():
    """Every in-process rule and every Prometheus alert is named in the runbook."""
    names = {rule.name for rule in RULES}
    names |= set(re.findall(r"-\s*alert:\s*(\w+)", ALERTS_YML))
    assert len(names) >= len(RULES)
    missing = sorted(name for name in names if f"``{name}``" not in TEXT)
    assert not missing, missing
