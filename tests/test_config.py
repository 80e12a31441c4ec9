"""sites.yaml: loading, validation, and errors that name the file, line and field."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from regions.messages import Job, MessageError, RunQueued, dump, parse_ingest, stored_job
from regions.units import parse_duration, parse_size
from scheduler.check import check, summarize
from scheduler.config import Config, Site
from scheduler.dispatch import plan_jobs
from scheduler.errors import SchedulerError
from scheduler.loader import ConfigError, ConfigProblem, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "data" / "configs"
EXAMPLE = ROOT / "examples" / "sites.yaml"

# A valid config to vary. Lines: 1 regions, 4 sites, 5 "- name: shop", 6 start_urls,
# 7 regions, 8 extract, 9 items, 10 fields, 11 price, 12 sku.
BASE = """\
regions:
  eu: {}
  us: {}
sites:
  - name: shop
    start_urls: ["https://shop.example/"]
    regions: [eu, us]
    extract:
      items: "div.product"
      fields:
        price: {css: ".price::text", type: price}
        sku: {xpath: "@data-sku"}
"""


def load(text: str, env: Mapping[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "sites.yaml", env=env or {})


def errors(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The problems `text` has, one string each, as `geoscrape check` prints them."""
    with pytest.raises(ConfigError) as info:
        load(text, env)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return str(info.value).splitlines()


# --- valid configs ---------------------------------------------------------------


def test_base_config_is_valid() -> None:
    config = load(BASE)
    assert list(config.regions) == ["eu", "us"]
    extract = config.site("shop").extract
    assert extract is not None
    assert extract.items == "div.product"
    assert extract.fields["sku"].xpath == "@data-sku"


def test_valid_file_loads_with_units_parsed() -> None:
    config = load_config(CONFIGS / "valid.yaml")
    assert [s.name for s in config.sites] == ["news", "prices", "legacy"]
    assert config.regions["eu"] is not None
    assert config.regions["eu"].description == "Frankfurt exit"
    assert config.regions["us"] is None
    assert config.defaults.schedule is not None
    assert config.defaults.schedule.every == 7200.0
    assert config.defaults.schedule.jitter == 300.0
    assert config.defaults.limits.max_bytes == 5_000_000
    news = config.site("news")
    assert news.follow is not None
    assert news.follow.allow == [r"^https://news\.example/"]
    assert news.extract is not None
    assert news.extract.fields["body"].join == "\n"


def test_resolved_site_merges_site_overrides_over_defaults() -> None:
    config = load_config(CONFIGS / "valid.yaml")
    news = config.resolved_site("news")
    assert news.limits.timeout == 90.0  # site: 1m30s
    assert news.limits.max_pages == 200  # defaults
    assert news.limits.max_bytes == 5_000_000  # defaults: 5MB
    assert news.limits.max_depth == 5  # model default
    assert news.politeness.concurrency == 1  # site
    assert news.politeness.robots == "ignore"  # site
    assert news.politeness.delay == 1.0  # defaults: 1s
    prices = config.resolved_site("prices")
    assert prices.limits.timeout == 20.0
    assert prices.politeness.concurrency == 4
    assert prices.engine == "requests"


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert list(config.regions) == ["eu", "us", "asia"]
    assert [s.name for s in config.sites] == ["docs", "shop-prices", "books"]
    assert config.site("shop-prices").regions == ["eu", "us", "asia"]
    assert config.site("books").spider == "mypkg.spiders:BooksSpider"
    assert config.resolved_site("shop-prices").limits.timeout == 60.0
    assert config.resolved_site("docs").limits.max_bytes == 10_000_000


def test_yaml_merge_keys_are_supported() -> None:
    config = load(
        """\
        regions: {eu: {}}
        sites:
          - &shop
            name: shop-a
            start_urls: ["https://a.example/"]
            regions: [eu]
            extract: {fields: {t: {css: title}}}
          - <<: *shop
            name: shop-b
        """
    )
    assert [s.name for s in config.sites] == ["shop-a", "shop-b"]
    assert config.site("shop-b").start_urls == ["https://a.example/"]


def test_region_keys_are_names_not_yaml_booleans() -> None:
    # YAML 1.1 reads a bare `no` (Norway) as False; a key is always a name here.
    config = load("regions: {no: {}, on: {}}\n")
    assert list(config.regions) == ["no", "on"]


# --- durations and sizes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("1h30m", 5400.0), ("15m", 900.0), ("250ms", 0.25), ("2d", 172800.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("10MB", 10_000_000), ("512KiB", 524_288), ("1gib", 1024**3), ("42", 42)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["soon", "30x", "1h30", "-5s"])
def test_bad_duration_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["lots", "10 MiBs", "MB", "-1MB"])
def test_bad_size_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_units_in_config_are_parsed() -> None:
    config = load(BASE + "defaults:\n  limits: {timeout: 1h30m, max_bytes: 10MB}\n")
    assert config.defaults.limits.timeout == 5400.0
    assert config.defaults.limits.max_bytes == 10_000_000


def test_bad_units_in_config_name_line_and_field() -> None:
    text = BASE + "defaults:\n  limits:\n    timeout: 30 parsecs\n    max_bytes: lots\n"
    assert errors(text) == [
        "sites.yaml:15: defaults.limits.timeout: not a duration: '30 parsecs'"
        " (use e.g. 30s, 15m, 6h, 1h30m)",
        "sites.yaml:16: defaults.limits.max_bytes: not a size: 'lots' (use e.g. 512KB, 10MB, 1GiB)",
    ]


# --- YAML-level problems ----------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line() -> None:
    text = "regions:\n  eu: {}\nsites: a: b\n"
    assert errors(text) == ["sites.yaml:3: yaml: mapping values are not allowed here"]


def test_yaml_syntax_error_names_the_context_line() -> None:
    text = "regions:\n  eu: {}\n   us: {}\nsites: []\n"
    assert errors(text) == [
        "sites.yaml:3: yaml: while parsing a block mapping at line 2,"
        " expected <block end>, but found '<block mapping start>'"
    ]


def test_yaml_syntax_error_in_a_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("regions: {eu: {}}\nsites: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem == ConfigProblem(
        file=str(path),
        line=3,
        site=None,
        field="yaml",
        message="while parsing a flow node, expected the node content, but found '<stream end>'",
    )


def test_duplicate_key_is_an_error() -> None:
    text = BASE + "        price: {css: b}\n"
    assert errors(text) == [
        "sites.yaml:13: site 'shop': extract.fields.price: duplicate key 'price'"
        " (first given at line 11)"
    ]


def test_duplicate_top_level_key_is_an_error() -> None:
    assert errors(BASE + "regions: {asia: {}}\n") == [
        "sites.yaml:13: regions: duplicate key 'regions' (first given at line 1)"
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_an_error(text: str) -> None:
    assert errors(text) == [
        "sites.yaml: the config is empty; expected a mapping with 'regions' and 'sites'"
    ]


def test_top_level_list_is_an_error() -> None:
    assert errors("\n- name: shop\n") == [
        "sites.yaml:2: the top level is a list; expected a mapping with 'regions' and 'sites'"
    ]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read the config file: No such file or directory"
    assert info.value.problems[0].line is None
    assert isinstance(info.value, SchedulerError)


# --- model errors, located -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            BASE + "sitez: []\n",
            "sites.yaml:13: sitez: unknown key (did you mean 'sites'?)",
            id="top-level",
        ),
        pytest.param(
            BASE.replace("    regions: [eu, us]\n", "    regions: [eu, us]\n    colour: red\n"),
            "sites.yaml:8: site 'shop': colour: unknown key (expected one of: name, start_urls,"
            " regions, engine, spider, schedule, follow, extract, politeness, limits,"
            " allow_hosts, allow_networks, project, spider_args, browser, compare, access, expect,"
            " alerts, keep_bodies, distributed)",
            id="site",
        ),
        pytest.param(
            BASE.replace("type: price}", "type: price, csss: x}"),
            "sites.yaml:11: site 'shop': extract.fields.price.csss: unknown key"
            " (did you mean 'css'?)",
            id="extract-field",
        ),
    ],
)
def test_unknown_key_names_file_line_and_field(text: str, expected: str) -> None:
    assert errors(text) == [expected]


def test_unknown_key_on_its_own_line_inside_a_block() -> None:
    text = """\
        regions: {eu: {}}
        defaults:
          politeness:
            delay: 1s
            robot: obey
        """
    assert errors(text) == [
        "sites.yaml:5: defaults.politeness.robot: unknown key (did you mean 'robots'?)"
    ]


def test_missing_field_points_at_its_parent() -> None:
    text = BASE.replace("    regions: [eu, us]\n", "")
    assert errors(text) == ["sites.yaml:5: site 'shop': regions: required, but missing"]


def test_site_without_name_is_labelled_by_index() -> None:
    text = (
        BASE
        + "  - start_urls: ['http://x']\n    regions: [eu]\n    extract: {fields: {t: {css: a}}}\n"
    )
    assert errors(text) == ["sites.yaml:13: site '#1': name: required, but missing"]


def test_value_errors_show_the_offending_value() -> None:
    text = BASE.replace("    regions: [eu, us]\n", "    regions: [eu, us]\n    engine: curl\n")
    assert errors(text) == [
        "sites.yaml:8: site 'shop': engine: Input should be"
        " 'scrapy', 'requests' or 'browser' (got 'curl')"
    ]


def test_invalid_regex_names_its_index() -> None:
    text = BASE.replace(
        "    regions: [eu, us]\n",
        "    regions: [eu, us]\n    follow:\n      allow:\n        - ok\n        - '(oops'\n",
    )
    assert errors(text) == [
        "sites.yaml:11: site 'shop': follow.allow[1]: invalid regex '(oops':"
        " missing ), unterminated subpattern at position 0"
    ]


def test_bad_region_name_points_at_the_key() -> None:
    assert errors("regions:\n  eu: {}\n  Mars: {}\n") == [
        "sites.yaml:3: regions.Mars: region name 'Mars' must match ^[a-z0-9][a-z0-9_-]{0,62}$"
    ]


# --- cross-checks ------------------------------------------------------------------


def test_undeclared_region_names_exact_line() -> None:
    text = BASE.replace("    regions: [eu, us]\n", "    regions:\n      - eu\n      - mars\n")
    assert errors(text) == [
        "sites.yaml:9: site 'shop': regions[1]: region 'mars' is not declared under 'regions'"
        " (declared: eu, us)"
    ]


def test_invalid_css_selector_names_exact_line() -> None:
    text = BASE.replace('".price::text"', '".price::txt"')
    assert errors(text) == [
        "sites.yaml:11: site 'shop': extract.fields.price.css: invalid CSS selector"
        " '.price::txt': The pseudo-element ::txt is unknown"
    ]


def test_invalid_items_selector_names_exact_line() -> None:
    text = BASE.replace('"div.product"', '"div..product"')
    assert errors(text) == [
        "sites.yaml:9: site 'shop': extract.items: invalid CSS selector 'div..product':"
        " Expected ident, got <DELIM '.' at 4>"
    ]


def test_invalid_xpath_names_exact_line() -> None:
    text = BASE.replace('"@data-sku"', '"//div[@data-sku"')
    assert errors(text) == [
        "sites.yaml:12: site 'shop': extract.fields.sku.xpath: invalid XPath '//div[@data-sku':"
        " Invalid predicate"
    ]


def test_parsel_pseudo_elements_are_valid_css() -> None:
    text = BASE.replace('".price::text"', '".price::attr(data-currency)"')
    assert load(text).site("shop").extract is not None


def test_duplicate_site_name_names_the_second_site() -> None:
    second = '  - name: shop\n    spider: "a.b:C"\n    regions: [eu]\n'
    assert errors(BASE + second) == [
        "sites.yaml:13: site 'shop': name: site name 'shop' is already used by the site at line 5"
    ]


def test_config_model_validate_checks_what_the_loader_checks() -> None:
    """The semantic checks are validators: a Config built without the loader gets
    them too, each error at its own location."""
    data = yaml.safe_load(BASE)
    shop = data["sites"][0]
    shop["regions"] = ["eu", "mars"]
    shop["extract"]["items"] = "div..product"
    shop["extract"]["fields"]["sku"] = {"xpath": "//div[@data-sku"}
    data["sites"] += [
        {"name": "shop", "spider": "a.b:C", "regions": ["eu"]},
        {
            "name": "js",
            "engine": "browser",
            "start_urls": ["https://js.example/"],
            "regions": ["us"],
            "extract": {"fields": {"title": {"css": "h1::text"}}},
            "browser": {"wait_for": "li["},
        },
    ]
    with pytest.raises(ValidationError) as info:
        Config.model_validate(data)
    found = {tuple(e["loc"]): e["msg"] for e in info.value.errors()}
    assert sorted(found, key=str) == sorted(
        [
            ("sites", 0, "regions", 1),
            ("sites", 0, "extract", "items"),
            ("sites", 0, "extract", "fields", "sku", "xpath"),
            ("sites", 1, "name"),
            ("sites", 2, "browser", "wait_for"),
        ],
        key=str,
    )
    assert "region 'mars' is not declared under 'regions'" in found[("sites", 0, "regions", 1)]
    assert found[("sites", 1, "name")] == "site name 'shop' is already used by site #0"
    # A site alone knows no declared regions and no siblings: only its own checks.
    assert Site.model_validate({**data["sites"][1], "regions": ["mars"]}).regions == ["mars"]


RICH = (
    BASE
    + """    politeness: {rate: 10/s, delay: 250ms}
    limits: {max_bytes: 2MB, timeout: 1m}
    follow: {allow: ["/p/"], max_depth: 2}
    compare: {samples: 1, tolerance: 1%}
    access:
      signatures: [{name: geo-wall, kind: geo, status: [451], body: ["not available"]}]
    expect: {items: {min: 1}, coverage: {price: 90%}, drop: 50%}
    alerts:
      webhooks: [{url: "https://hooks.example/x", format: slack}]
      email: {smtp: "mail.example:25", from: "geo@example.com", to: ["ops@example.com"]}
defaults:
  allow_hosts: ["127.0.0.1:8080"]
"""
)


def test_a_job_is_the_same_after_the_json_round_trip() -> None:
    """Dispatch publishes model_dump(mode="json"); the worker, ingest and the store
    (runs.job) validate it back: the same job, and the same JSON again."""
    config = load(RICH)
    [job] = plan_jobs(config, "shop", ["eu"])
    body = json.loads(json.dumps(dump(job)))
    again = Job.model_validate(body)
    assert again == job
    assert dump(again) == body
    assert again.config.alerts is not None and again.config.alerts.email is not None
    assert again.config.alerts.email.sender == "geo@example.com"
    queued = parse_ingest(json.dumps(dump(RunQueued.for_job(job))))
    assert isinstance(queued, RunQueued) and queued.job == job
    assert stored_job(body) == job
    # A stored job from before the config was typed reads as unknown, not as an error.
    assert stored_job({**body, "config": {"name": "shop"}}) is None


def test_a_message_whose_job_config_does_not_validate_is_refused() -> None:
    config = load(BASE)
    [job] = plan_jobs(config, "shop", ["eu"])
    body = dump(RunQueued.for_job(job))
    body["job"]["config"]["extract"]["items"] = "div..product"
    with pytest.raises(MessageError, match="invalid CSS selector"):
        parse_ingest(body)


# --- environment variables -----------------------------------------------------------


def test_env_variables_are_substituted() -> None:
    text = BASE.replace(
        '["https://shop.example/"]',
        '["https://${SHOP_HOST}/", "https://${MIRROR:-mirror.example}/", "https://x.test/a$${b}"]',
    )
    config = load(text, env={"SHOP_HOST": "shop.test"})
    assert config.site("shop").start_urls == [
        "https://shop.test/",
        "https://mirror.example/",
        "https://x.test/a${b}",
    ]


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOSCRAPE_TEST_TIMEOUT", "45s")
    text = BASE + "defaults:\n  limits: {timeout: '${GEOSCRAPE_TEST_TIMEOUT}'}\n"
    config = parse_config(text)
    assert config.defaults.limits.timeout == 45.0


def test_missing_env_variable_names_line_and_variable() -> None:
    text = BASE + "defaults:\n  limits:\n    timeout: ${SHOP_TIMEOUT}\n"
    # One problem only: no follow-up complaint about the unsubstituted value.
    assert errors(text) == [
        "sites.yaml:15: defaults.limits.timeout: environment variable 'SHOP_TIMEOUT'"
        " is not set (and ${SHOP_TIMEOUT} has no default)"
    ]


def test_malformed_variable_reference_is_an_error() -> None:
    text = BASE.replace('"https://shop.example/"', '"https://${SHOP-HOST}/"')
    assert errors(text) == [
        "sites.yaml:6: site 'shop': start_urls[0]: malformed '${':"
        " write ${NAME} or ${NAME:-default}"
    ]


# --- all together -----------------------------------------------------------------


def test_several_errors_are_reported_together_in_line_order() -> None:
    path = CONFIGS / "several_errors.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == [
        f"{path}:6: defaults.limits.timeout: not a duration: 'soon' (use e.g. 30s, 15m, 6h, 1h30m)",
        f"{path}:11: site 'shop': regions[1]: region 'mars' is not declared under 'regions'"
        " (declared: eu, us)",
        f"{path}:13: site 'shop': extract.items: invalid CSS selector 'div..product':"
        " Expected ident, got <DELIM '.' at 4>",
        f"{path}:15: site 'shop': extract.fields.price.kind: unknown key"
        " (expected one of: css, xpath, join, type)",
        f"{path}:16: site 'shop': extract.fields.title.xpath: invalid XPath '//h1[':"
        " Invalid expression",
        f"{path}:18: site '#1': name: required, but missing",
    ]
    assert [p.line for p in info.value.problems] == [6, 11, 13, 15, 16, 18]
    assert info.value.problems[1].site == "shop"
    assert info.value.problems[1].field == "regions[1]"


def test_problem_str_drops_parts_that_do_not_apply() -> None:
    full = ConfigProblem("a.yaml", 3, "shop", "extract.items", "bad")
    assert str(full) == "a.yaml:3: site 'shop': extract.items: bad"
    assert str(ConfigProblem("a.yaml", 3, None, "regions", "bad")) == "a.yaml:3: regions: bad"
    assert str(ConfigProblem("a.yaml", None, None, "", "empty")) == "a.yaml: empty"


# --- check -----------------------------------------------------------------------


def test_summarize_example() -> None:
    assert summarize(load_config(EXAMPLE)).splitlines() == [
        "ok: 3 regions (eu, us, asia), 3 sites, 5 jobs per full fan-out",
        "  docs         scrapy                              eu            "
        "cron 0 */6 * * * (Europe/Berlin)",
        "  shop-prices  requests                            eu, us, asia  every 1h",
        "  books        scrapy (mypkg.spiders:BooksSpider)  us            every 1h",
    ]


def test_summarize_without_schedule_says_manual() -> None:
    assert summarize(load(BASE)).splitlines() == [
        "ok: 2 regions (eu, us), 1 site, 2 jobs per full fan-out",
        "  shop  scrapy  eu, us  manual",
    ]


def test_check_ok_returns_zero_and_summary() -> None:
    assert check(CONFIGS / "valid.yaml") == (
        0,
        "ok: 2 regions (eu, us), 3 sites, 4 jobs per full fan-out\n"
        "  news    scrapy                             eu, us  every 2h, jitter 5m\n"
        "  prices  requests                           us      cron */15 * * * * (UTC)\n"
        "  legacy  scrapy (legacy.spiders:Catalogue)  eu      every 2h, jitter 5m",
    )


def test_check_errors_return_one_and_every_problem() -> None:
    path = CONFIGS / "several_errors.yaml"
    code, text = check(path)
    assert code == 1
    assert len(text.splitlines()) == 6
    assert all(line.startswith(f"{path}:") for line in text.splitlines())


def test_xpath_with_a_control_character_is_a_config_error() -> None:
    # Found by the fuzzer: YAML's "\a" is BEL, which lxml refuses with ValueError.
    text = BASE.replace('{xpath: "@data-sku"}', '{xpath: "\\an/text()"}')
    assert errors(text) == [
        "sites.yaml:12: site 'shop': extract.fields.sku.xpath: invalid XPath '\\x07n/text()': "
        "All strings must be XML compatible: Unicode or ASCII, no NULL bytes or control "
        "characters"
    ]
