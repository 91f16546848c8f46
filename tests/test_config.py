"""Settings from HEARTH_* variables, and the CLI's refusal of bad config."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from app.config import Settings, known_variables, settings_table, unknown_variables
from app.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
#: A message key of the right shape for HEARTH_MESSAGE_KEY.
MESSAGE_KEY = "k1:" + "A" * 43 + "="


def hearth_env(**variables: str) -> dict[str, str]:
    """This process's environment without any HEARTH_* variable, plus *variables*."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HEARTH_")}
    return {**env, "HEARTH_LOG_DIR": "", **variables}


def run_hearth(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m app *args`` with exactly *env*."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


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
        ("HEARTH_EVENT_LOOP", "trio"),
        ("HEARTH_TOKEN_RECHECK", "-1"),
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
    """README.rst carries the table of every HEARTH_* variable (`python -m app settings --table`)."""
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


def test_settings_table_command_ignores_the_environment():
    """`settings --table` prints the README table of defaults, whatever the environment holds."""
    result = run_hearth(hearth_env(HEARTH_PORT="9001"), "settings", "--table")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == settings_table() + "\n"


def test_settings_command_prints_effective_values_with_secrets_hidden():
    """`settings` prints this environment's values, with DSN passwords and the key masked."""
    env = hearth_env(
        HEARTH_PORT="9001",
        HEARTH_DATABASE_URL="postgresql://hearth:Zqhunter2@db.internal/hearth",
        HEARTH_REDIS_URL="redis://:Zqredispw@cache:6379/0",
        HEARTH_MESSAGE_KEY=MESSAGE_KEY,
        HEARTH_WS_COMPRESS="yes",
    )
    result = run_hearth(env, "settings")
    assert result.returncode == 0, result.stderr
    printed = dict(shlex.split(line)[0].split("=", 1) for line in result.stdout.splitlines())
    assert printed.keys() == known_variables()
    assert printed["HEARTH_PORT"] == "9001"
    assert printed["HEARTH_DATABASE_URL"] == "postgresql://hearth:***@db.internal/hearth"
    assert printed["HEARTH_REDIS_URL"] == "redis://:***@cache:6379/0"
    assert printed["HEARTH_MESSAGE_KEY"] == "***"
    assert printed["HEARTH_WS_COMPRESS"] == "true"
    assert printed["HEARTH_TOKEN_TTL_HOURS"] == "24.0"
    for secret in ("Zqhunter2", "Zqredispw", MESSAGE_KEY):
        assert secret not in result.stdout + result.stderr


def test_effective_values_read_back_as_the_same_settings():
    """Fed back as the environment, the effective values give equal settings."""
    settings = Settings.from_env(
        {
            "HEARTH_PORT": "9001",
            "HEARTH_WS_COMPRESS": "on",
            "HEARTH_DATABASE_URL": "host=db user=hearth dbname=x",
            "HEARTH_EVENT_SOURCES": '[{"name": "jobs", "url": "http://h/s", "kind": "get"}]',
        }
    )
    assert Settings.from_env(dict(settings.effective())) == settings


def test_unknown_variables_are_named_with_a_suggestion_when_close():
    """Only unknown HEARTH_* names are reported, each with its closest known name or None."""
    environ = {"HEARTH_DB_TIMEOUTS": "3", "HEARTH_NONSENSE": "", "HEARTH_PORT": "1", "PATH": "/"}
    assert unknown_variables(environ) == [
        ("HEARTH_DB_TIMEOUTS", "HEARTH_DB_TIMEOUT"),
        ("HEARTH_NONSENSE", None),
    ]


@given(
    variable=st.sampled_from(sorted(known_variables())),
    position=st.integers(min_value=len("HEARTH_"), max_value=60),
    edit=st.sampled_from(["drop", "swap"]),
)
def test_a_one_letter_typo_is_traced_back(variable, position, edit):
    """A variable with one letter dropped or two swapped is suggested back as itself."""
    assume(position < len(variable) - 1)
    if edit == "drop":
        typo = variable[:position] + variable[position + 1 :]
    else:
        typo = (
            variable[:position]
            + variable[position + 1]
            + variable[position]
            + variable[position + 2 :]
        )
    assume(typo not in known_variables())
    assert unknown_variables({typo: ""}) == [(typo, variable)]


def test_unknown_variable_logs_one_warning_naming_the_intended_one():
    """A typo'd HEARTH_* variable gets one JSON WARN line naming it and its likely intent."""
    result = run_hearth(hearth_env(HEARTH_DB_TIMEOUTS="3"), "settings")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(line["level"], line["variable"], line["suggestion"]) for line in lines] == [
        ("warn", "HEARTH_DB_TIMEOUTS", "HEARTH_DB_TIMEOUT")
    ]
    assert "HEARTH_DB_TIMEOUT" in lines[0]["msg"]
