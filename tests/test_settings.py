"""regions/settings.py: one typed model of every GEOSCRAPE_* variable.

Defaults and parsing against the real environment (monkeypatched), the one-line
error of a bad value through a real `geoscrape` process, the docs table built
from the model, and a scan of the code for GEOSCRAPE_* names read anywhere else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from regions.errors import SettingsError
from regions.settings import (
    INTERNAL,
    PREFIXES,
    Settings,
    markdown_table,
    per_region_env,
    per_region_value,
    settings,
    variables,
)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["regions", "scheduler", "scraper", "storage", "geoscrape", "dashboard"]
# GEOSCRAPE_* names in the code that are not environment variables at all.
SCRAPY_SETTING_NAMES = {
    "GEOSCRAPE_MAX_PAGES",
    "GEOSCRAPE_MAX_DEPTH",
    "GEOSCRAPE_SOURCE_ADDRESS",
    "GEOSCRAPE_MIDDLEWARES",  # a Python constant
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GEOSCRAPE_* variable set (the suite's own, e.g. the Redis prefix, removed)."""
    for name in list(os.environ):
        if name.startswith("GEOSCRAPE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = settings()
    assert s.broker_url == "amqp://guest:guest@127.0.0.1:5672//"
    assert s.database_url == "sqlite:///geoscrape.db"
    assert (s.redis_url, s.redis_prefix) == ("redis://127.0.0.1:6379/0", "geoscrape:")
    assert (s.run_lease, s.max_attempts, s.frontier_lease) == (10.0, 3, 60.0)
    assert s.warm_children is True
    assert (s.log_level, s.log_format) == ("info", "text")
    unset = ["config", "home", "broker_ca", "broker_cert", "broker_key", "chromium"]
    unset += ["code_url", "code_token", "code_cache", "api_token", "api_write_token", "log_file"]
    assert {name: getattr(s, name) for name in unset} == dict.fromkeys(unset)


def test_values_are_parsed_to_their_types(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GEOSCRAPE_RUN_LEASE", "2.5")
    clean_env.setenv("GEOSCRAPE_MAX_ATTEMPTS", "5")
    clean_env.setenv("GEOSCRAPE_WARM_CHILDREN", "0")
    clean_env.setenv("GEOSCRAPE_CHROMIUM", "/opt/chromium/chrome")
    clean_env.setenv("GEOSCRAPE_API_TOKEN", "s3cret")
    clean_env.setenv("GEOSCRAPE_LOG_FORMAT", "json")
    s = settings()
    assert (s.run_lease, s.max_attempts, s.warm_children) == (2.5, 5, False)
    assert s.chromium == Path("/opt/chromium/chrome")
    assert s.log_format == "json"
    assert s.api_token is not None and s.api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)  # secrets stay out of logs and tracebacks
    clean_env.setenv("GEOSCRAPE_WARM_CHILDREN", "yes")
    assert settings().warm_children is True


def test_the_environment_is_read_again_after_it_changes(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GEOSCRAPE_REDIS_PREFIX", "a:")
    assert settings().redis_prefix == "a:"
    clean_env.setenv("GEOSCRAPE_REDIS_PREFIX", "b:")
    assert settings().redis_prefix == "b:"
    clean_env.setenv("GEOSCRAPE_REDIS_PREFIX", "")  # empty: unset, the default
    assert settings().redis_prefix == "geoscrape:"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GEOSCRAPE_MAX_ATTEMPTS", "abc", "must be a whole number above 0"),
        ("GEOSCRAPE_MAX_ATTEMPTS", "0", "must be a whole number above 0"),
        ("GEOSCRAPE_MAX_ATTEMPTS", "2.5", "must be a whole number above 0"),
        ("GEOSCRAPE_RUN_LEASE", "-1", "must be a number of seconds above 0"),
        ("GEOSCRAPE_RUN_LEASE", "nan", "must be a number of seconds above 0"),
        ("GEOSCRAPE_FRONTIER_LEASE", "1m", "must be a number of seconds above 0"),
        ("GEOSCRAPE_WARM_CHILDREN", "maybe", "must be true or false (1/0, yes/no, on/off)"),
        ("GEOSCRAPE_LOG_LEVEL", "loud", "must be one of debug, info, warning, error"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    clean_env: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        settings()
    assert str(err.value) == f"environment variable {name}={value!r}: {message}"
    clean_env.delenv(name)  # fixed: the error is not cached
    assert settings() == Settings()


def test_every_bad_value_is_named_in_the_one_line(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GEOSCRAPE_MAX_ATTEMPTS", "x")
    clean_env.setenv("GEOSCRAPE_RUN_LEASE", "y")
    with pytest.raises(SettingsError) as err:
        settings()
    text = str(err.value)
    assert "\n" not in text
    assert "GEOSCRAPE_MAX_ATTEMPTS='x'" in text and "GEOSCRAPE_RUN_LEASE='y'" in text


def geoscrape(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `geoscrape` entry point, importing this checkout."""
    script = Path(sys.executable).parent / "geoscrape"
    return subprocess.run(
        [str(script), *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_cli_prints_a_bad_value_as_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOSCRAPE_")}
    env["GEOSCRAPE_DATABASE_URL"] = f"sqlite:///{tmp_path}/store.db"
    sites = str(ROOT / "examples" / "sites.yaml")
    good = geoscrape(env, "check", sites)
    assert good.returncode == 0, good.stderr
    bad = geoscrape({**env, "GEOSCRAPE_MAX_ATTEMPTS": "abc"}, "check", sites)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr == (
        "error: environment variable GEOSCRAPE_MAX_ATTEMPTS='abc': must be a whole number above 0\n"
    )


def test_per_region_names() -> None:
    prefix = "GEOSCRAPE_CODE_TOKEN_"
    assert prefix in PREFIXES
    assert per_region_env(prefix, "asia-east") == "GEOSCRAPE_CODE_TOKEN_ASIA_EAST"


def test_per_region_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOSCRAPE_CODE_TOKEN_ASIA_EAST", "t")
    monkeypatch.setenv("GEOSCRAPE_CODE_TOKEN_EU", "")
    assert per_region_value("GEOSCRAPE_CODE_TOKEN_", "asia-east") == "t"
    assert per_region_value("GEOSCRAPE_CODE_TOKEN_", "eu") is None


def test_every_field_has_a_description() -> None:
    missing = [name for name, info in variables().items() if not info.description]
    assert missing == []


def test_the_docs_table_is_the_models() -> None:
    doc = (ROOT / "docs" / "SETTINGS.md").read_text()
    found = re.search(
        r"<!-- settings table: begin -->\n(.*)<!-- settings table: end -->", doc, re.S
    )
    assert found is not None, "docs/SETTINGS.md lost its table markers"
    assert found.group(1) == markdown_table(), (
        "docs/SETTINGS.md is out of date: paste `python -m regions.settings` between the markers"
    )
    for name in [*variables(), *INTERNAL]:
        assert f"`{name}`" in doc, name
    for prefix in PREFIXES:
        assert f"`{prefix}<REGION>`" in doc, prefix
    assert "docs/SETTINGS.md" in (ROOT / "README.md").read_text()


def code_names() -> dict[str, set[str]]:
    """GEOSCRAPE_* names in the packages' code -> the files naming them."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for name in re.findall(r"GEOSCRAPE_[A-Z0-9_]*", path.read_text()):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_code_names_no_variable_outside_the_model() -> None:
    """A GEOSCRAPE_* name in the code is a setting, a per-region prefix, a worker's
    message to its crawl child, or a Scrapy setting: anything else was read
    around the model (add it as a field of Settings)."""
    known = set(variables()) | set(INTERNAL) | SCRAPY_SETTING_NAMES | {"GEOSCRAPE_"}
    unknown = {
        name: sorted(files)
        for name, files in code_names().items()
        if name not in known and not any(name.startswith(p) for p in PREFIXES)
    }
    assert unknown == {}
