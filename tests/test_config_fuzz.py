"""Config fuzzing: whatever YAML arrives, the loader and `geoscrape check` either
accept it or raise a ConfigError whose every problem names a line.

Three generators: schema-shaped documents with wrong-typed or odd values (they
get past the YAML parser and exercise the models), valid documents with random
text spliced in (they exercise the parser's error paths), and arbitrary text.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.check import check
from scheduler.config import Config
from scheduler.loader import ConfigError, parse_config

FILE = "fuzz.yaml"
PROBLEM_LINE = re.compile(r"^fuzz\.yaml:\d+: \S")

VALID = """\
regions:
  eu: {}
  us: {description: "US"}
defaults:
  politeness: {delay: 0.25, concurrency: 8, robots: obey}
  limits: {max_pages: 100, max_depth: 3, timeout: 30s, max_bytes: 1MB, max_redirects: 5}
  allow_hosts: ["127.0.0.1:8801"]
sites:
  - name: docs
    start_urls: ["http://127.0.0.1:8801/index.html"]
    regions: [eu]
    schedule: {every: 1h}
    follow: {allow: ['^http://127\\.0\\.0\\.1:8801/'], deny: ['_sources']}
    extract:
      key: sku
      fields:
        sku: {css: ".sku::text"}
        price: {xpath: "//span/text()", type: price}
  - name: prices
    engine: requests
    start_urls: ["https://shop.example/prices"]
    regions: [eu, us]
    allow_networks: ["10.0.0.0/8"]
    limits: {timeout: 1m, max_links: 10}
    extract:
      items: "div.product"
      fields:
        name: {css: ".name::text"}
"""

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "1h",
            "30s",
            "-5m",
            "10MB",
            "0",
            "obey",
            "scrapy",
            "requests",
            "eu",
            "[",
            "${HOME}",
            "${NOPE}",
            "${X:-y}",
            "::1",
            "10.0.0.0/33",
            "127.0.0.1:99999",
            "*",
            "a:b",
            "//x",
        ]
    ),
)
KEYS = [
    "regions",
    "defaults",
    "sites",
    "name",
    "start_urls",
    "engine",
    "spider",
    "schedule",
    "follow",
    "extract",
    "politeness",
    "limits",
    "every",
    "cron",
    "timezone",
    "delay",
    "concurrency",
    "robots",
    "max_pages",
    "max_depth",
    "timeout",
    "max_bytes",
    "max_links",
    "max_redirects",
    "max_duration",
    "allow",
    "deny",
    "fields",
    "css",
    "xpath",
    "key",
    "items",
    "pages",
    "type",
    "join",
    "allow_hosts",
    "allow_networks",
    "eu",
    "us",
    "<<",
    "typo",
]
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)


@st.composite
def schema_shaped(draw: st.DrawFn) -> str:
    """A VALID document with some of its values replaced by generated ones."""
    data: Any = yaml.safe_load(VALID)
    for _ in range(draw(st.integers(1, 4))):
        node: Any = data
        path = draw(st.lists(st.sampled_from([*KEYS, 0, 1]), min_size=1, max_size=4))
        for step in path[:-1]:
            nxt = node.get(step) if isinstance(node, dict) else None
            if isinstance(node, list) and isinstance(step, int) and step < len(node):
                nxt = node[step]
            if not isinstance(nxt, dict | list):
                break
            node = nxt
        last = path[-1]
        settable = isinstance(node, list) and isinstance(last, int) and last < len(node)
        if isinstance(node, dict) or settable:
            node[last] = draw(values)
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@st.composite
def spliced(draw: st.DrawFn) -> str:
    """VALID with random text inserted at a random place."""
    at = draw(st.integers(0, len(VALID)))
    junk = draw(
        st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"%@`#, \n\t?aZ9\\$")), max_size=12)
    )
    return VALID[:at] + junk + VALID[at + draw(st.integers(0, 5)) :]


documents = st.one_of(schema_shaped(), spliced(), st.text(max_size=200))


def assert_only_located_config_errors(text: str) -> None:
    try:
        config = parse_config(text, FILE, env={"HOME": "/root"})
    except ConfigError as exc:
        assert exc.problems, "a ConfigError with no problem"
        for problem in exc.problems:
            if problem.line is None:  # only a file with nothing in it has no line to name
                assert problem.message.startswith("the config is empty"), (str(problem), text)
                assert yaml.safe_load(text) is None
                continue
            assert problem.line >= 1, (str(problem), text)
            assert PROBLEM_LINE.match(str(problem)), (str(problem), text)
            assert "\n" not in str(problem), (str(problem), text)
    else:
        assert isinstance(config, Config)


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)


@FUZZ
@given(schema_shaped())
def test_schema_shaped_documents(text: str) -> None:
    assert_only_located_config_errors(text)


@FUZZ
@given(spliced())
def test_spliced_documents(text: str) -> None:
    assert_only_located_config_errors(text)


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    assert_only_located_config_errors(text)


@settings(max_examples=150, deadline=None, database=None)
@given(documents)
def test_check_command_logic(tmp_path_factory: Any, text: str) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / FILE
    path.write_text(text, encoding="utf-8")
    code, output = check(path)
    # check() agrees with the loader: 0 exactly when the text loads as a config.
    try:
        parse_config(text, str(path))
        expected = 0
    except ConfigError:
        expected = 1
    assert code == expected, (code, output, text)
    if code == 1 and "the config is empty" not in output:
        for line in output.split("\n"):
            assert re.match(rf"^{re.escape(str(path))}:\d+: \S", line), (line, text)


@settings(max_examples=8, deadline=None, database=None)
@given(documents)
def test_geoscrape_check_cli_never_shows_a_traceback(tmp_path_factory: Any, text: str) -> None:
    path = Path(tmp_path_factory.mktemp("fuzzcli")) / FILE
    path.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "geoscrape.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        parse_config(text, str(path))
        expected = 0
    except ConfigError:
        expected = 1
    assert done.returncode == expected, done.stderr
    assert "Traceback" not in done.stderr
    if done.returncode == 1 and "the config is empty" not in done.stderr:
        assert all(
            re.match(rf"^{re.escape(str(path))}:\d+: ", line)
            for line in done.stderr.strip().split("\n")
        ), done.stderr


def test_the_seed_document_is_valid() -> None:
    config = parse_config(VALID, FILE)
    assert [s.name for s in config.sites] == ["docs", "prices"]
    assert config.resolved_site("prices").allow_networks == ["10.0.0.0/8"]
