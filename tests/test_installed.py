"""What an install of geoscrape holds: the product, none of the test tooling.

The hostile site, the crashing spider and the namespace harness live in tests/
(as Scrapy keeps its mock servers there): nothing hostile is importable from an
installed geoscrape, and a sites.yaml on an installed worker cannot name
`tests.spiders:CrashingSpider`. (`geoscrape check` does not import a site's
`spider`, since a worker may have code the checking machine lacks: the crawl
process resolving it is where an install refuses it.)

The install is built the way setuptools builds the wheel: the packages that
pyproject's [tool.setuptools.packages.find] selects, their modules copied to a
directory of their own, imported by an isolated interpreter (-I: no cwd, no
PYTHONPATH) started outside the repository.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_namespace_packages

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
found = {}
for name in sys.argv[2:]:
    try:
        found[name] = importlib.import_module(name).__file__
    except ModuleNotFoundError as exc:
        found[name] = f"missing {exc.name}"
from scraper.project import SpiderLoadError, spider_class
try:
    spider_class("tests.spiders:CrashingSpider")
except SpiderLoadError as exc:
    found["spider"] = str(exc)
print(json.dumps(found))
"""


def installed_packages() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    return find_namespace_packages(str(ROOT), include=include)


def install(site: Path) -> None:
    """Every module of every installed package, at its place under `site`."""
    for package in installed_packages():
        source, target = ROOT.joinpath(*package.split(".")), site.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            shutil.copy(module, target / module.name)


def test_an_install_holds_no_test_tooling(tmp_path: Path) -> None:
    assert not [p for p in installed_packages() if p.split(".")[0] == "tests"]
    site = tmp_path / "site-packages"
    install(site)
    names = [
        "geoscrape",
        "geoscrape.testsite.catalog",  # the demo shop ships
        "geoscrape.testsite.spiders",
        "geoscrape.testsite.hostile",
        "tests.spiders",
        "tests.hostilesite",
    ]
    done = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, str(site), *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    # The copy is what was imported, not this checkout.
    assert found["geoscrape"] == str(site / "geoscrape" / "__init__.py")
    assert found["geoscrape.testsite.catalog"] == str(site / "geoscrape/testsite/catalog.py")
    assert found["geoscrape.testsite.spiders"] == "missing geoscrape.testsite.spiders"
    assert found["geoscrape.testsite.hostile"] == "missing geoscrape.testsite.hostile"
    assert found["tests.spiders"].startswith("missing tests")
    assert found["tests.hostilesite"].startswith("missing tests")
    assert found["spider"].startswith("cannot load spider 'tests.spiders:CrashingSpider'")
    assert "No module named 'tests" in found["spider"]


def test_the_image_holds_no_test_tooling() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^COPY (\S+/)?tests\b", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "tests" in ignored
