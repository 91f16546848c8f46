"""Settings from HEARTH_* variables, and the CLI's refusal of bad config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.config import Settings, settings_table
from app.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_without_environment():
    """An empty environment gives the documented defaults."""
    settings = Settings.from_env({})
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.redis_url == ""
    assert settings.log_level == "INFO"


def test_values_are_parsed_by_type():
    """Numbers and strings are read from their variables."""
    settings = Settings.from_env(
        {"HEARTH_PORT": "9001", "HEARTH_STALL_TIMEOUT": "2.5", "HEARTH_REDIS_URL": "redis://x:1/0"}
    )
    assert settings.port == 9001
    assert settings.stall_timeout == 2.5
    assert settings.redis_url == "redis://x:1/0"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HEARTH_PORT", "eighty"),
        ("HEARTH_PORT", "70000"),
        ("HEARTH_PORT", "-1"),
        ("HEARTH_LOG_LEVEL", "LOUD"),
        ("HEARTH_DATABASE_URL", "mysql://u@h/db"),
        ("HEARTH_REDIS_URL", "http://h"),
        ("HEARTH_MAILBOX_SIZE", "0"),
    ],
)
def test_invalid_values_name_their_variable(variable, value):
    """Each invalid value raises ConfigError naming the variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.variable == variable


@given(st.text(max_size=20))
def test_port_parsing_never_crashes_otherwise(raw):
    """Any port text either parses to a valid port or raises ConfigError."""
    try:
        settings = Settings.from_env({"HEARTH_PORT": raw})
    except ConfigError as exc:
        assert exc.variable == "HEARTH_PORT"
    else:
        assert 0 <= settings.port <= 65535


def test_every_setting_is_documented_in_readme():
    """README.rst carries the current table of every HEARTH_* variable (`python -m app settings`)."""
    readme = (ROOT / "README.rst").read_text()
    assert settings_table() in readme


def test_invalid_config_exits_2_with_one_fatal_line():
    """`serve` with a bad variable logs one FATAL JSON line, hides the DSN password, exits 2."""
    env = {
        **os.environ,
        "HEARTH_LOG_LEVEL": "LOUD",
        "HEARTH_DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:1/x",
    }
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    fatal = [line for line in lines if line["level"] == "fatal"]
    assert len(fatal) == 1
    assert "HEARTH_LOG_LEVEL" in fatal[0]["msg"]
    assert "hunter2" not in result.stdout + result.stderr
