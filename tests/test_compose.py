"""docker-compose.yml, deploy/region.compose.yml and the Dockerfile, checked without Docker.

These fast checks need no Docker engine (tests/compose/ brings the stack up on
a real one); they check what can go wrong in the files themselves: they parse;
every `geoscrape` command a service runs exists with those arguments (`--help`
succeeds); each worker pins exactly its region and logs in as its region's
user; every setting (regions/settings.py) is classified and set where it is
needed; the image's entry point exists; images and ports are variables.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from regions import settings

ROOT = Path(__file__).resolve().parent.parent

# Every GEOSCRAPE_* setting, classified. A new field of regions.settings.Settings
# fails test_every_setting_is_classified until added here.
CENTRAL = {
    "GEOSCRAPE_CONFIG",
    "GEOSCRAPE_BROKER_URL",
    "GEOSCRAPE_DATABASE_URL",
    "GEOSCRAPE_REDIS_URL",
}
REQUIRED_BY_COMMAND = {
    "worker": {"GEOSCRAPE_CONFIG", "GEOSCRAPE_BROKER_URL"},
    "ingest": {
        "GEOSCRAPE_BROKER_URL",
        "GEOSCRAPE_DATABASE_URL",
        "GEOSCRAPE_RUN_LEASE",
        "GEOSCRAPE_MAX_ATTEMPTS",
    },
    "beat": CENTRAL,
    "api": {"GEOSCRAPE_DATABASE_URL", "GEOSCRAPE_API_TOKEN"},
    "db": {"GEOSCRAPE_DATABASE_URL"},
    "broker": {"GEOSCRAPE_CONFIG", "GEOSCRAPE_BROKER_URL"},
}
TLS = {"GEOSCRAPE_BROKER_CA", "GEOSCRAPE_BROKER_CERT", "GEOSCRAPE_BROKER_KEY"}
OPTIONAL = {
    "GEOSCRAPE_REDIS_PREFIX",  # has a default that compose keeps
    # docs/OPERATIONS.md: where relative SQLite paths resolve, and logging
    "GEOSCRAPE_HOME",
    "GEOSCRAPE_LOG_LEVEL",
    "GEOSCRAPE_LOG_FILE",
    "GEOSCRAPE_LOG_FORMAT",
    # workers: a Chromium not on PATH (docs/BROWSER.md); deployed code bundles
    # (docs/PROJECTS.md); distributed runs and warm crawl processes (docs/SCALE.md)
    "GEOSCRAPE_CHROMIUM",
    "GEOSCRAPE_CODE_URL",
    "GEOSCRAPE_CODE_TOKEN",
    "GEOSCRAPE_CODE_CACHE",
    "GEOSCRAPE_FRONTIER_LEASE",
    "GEOSCRAPE_WARM_CHILDREN",
    # the API: the dashboard's requeue button (docs/DASHBOARD.md)
    "GEOSCRAPE_API_WRITE_TOKEN",
}
PREFIXES = {
    "GEOSCRAPE_BROKER_PASSWORD_",  # + REGION: set for `broker provision`
    "GEOSCRAPE_CODE_TOKEN_",  # + REGION: the API's per-region code tokens
}


def load(path: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / path).read_text())


def services() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (file, service) of both compose files, region file prefixed `region:`."""
    found = {
        n: ("docker-compose.yml", s) for n, s in load("docker-compose.yml")["services"].items()
    }
    for name, svc in load("deploy/region.compose.yml")["services"].items():
        found[f"region:{name}"] = ("deploy/region.compose.yml", svc)
    return found


def geoscrape_services() -> dict[str, dict[str, Any]]:
    """Services running the image's `geoscrape` entry point."""
    return {
        n: s
        for n, (_, s) in services().items()
        if s.get("image") == "geoscrape:latest" and "entrypoint" not in s
    }


def expand(value: str) -> str:
    # ${VAR:?msg} / ${VAR} placeholders: a region for the region file, else a dummy.
    value = re.sub(r"\$\{GEOSCRAPE_REGION[^}]*\}", "eu", value)
    return re.sub(r"\$\{[A-Z0-9_]+[^}]*\}", "x", value)


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    assert isinstance(env, dict), "environment must be a mapping"
    return {k: str(v) for k, v in env.items()}


def declared_regions() -> list[str]:
    return list(load("examples/sites.yaml")["regions"])


def test_files_parse_and_every_image_is_built_from_the_one_dockerfile() -> None:
    compose = load("docker-compose.yml")
    assert set(compose["services"]) >= {
        "rabbitmq", "redis", "postgres", "migrate", "beat", "ingest", "api", "flower",
        "worker-eu", "worker-us", "worker-asia",
    }  # fmt: skip
    assert "management" in compose["services"]["rabbitmq"]["image"]
    for name, (path, svc) in services().items():
        if "build" in svc:
            build = svc["build"]
            dockerfile = (ROOT / path).parent / build["context"] / "Dockerfile"
            assert dockerfile.resolve() == ROOT / "Dockerfile", name
            assert svc["image"] == "geoscrape:latest", name
            # The base image is a build argument with today's default (offline: a stand-in).
            assert build["args"] == {"PYTHON_IMAGE": "${PYTHON_IMAGE:-python:3.11-slim}"}, name


def test_images_and_published_ports_are_variables_with_todays_defaults() -> None:
    compose = load("docker-compose.yml")["services"]
    assert compose["rabbitmq"]["image"] == "${RABBITMQ_IMAGE:-rabbitmq:3.13-management}"
    assert compose["redis"]["image"] == "${REDIS_IMAGE:-redis:7-alpine}"
    assert compose["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:16-alpine}"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3.11-slim\nFROM \$\{PYTHON_IMAGE\}$",
                     (ROOT / "Dockerfile").read_text(), re.M)  # fmt: skip
    for name, svc in compose.items():
        for port in svc.get("ports", []):
            # PUBLISH_ADDRESS:HOST_PORT:CONTAINER_PORT, both host parts variables
            assert re.fullmatch(
                r"\$\{PUBLISH_ADDRESS:-0\.0\.0\.0\}:\$\{[A-Z_]+:-(\d+)\}:\1", port
            ), (
                name,
                port,
            )


@pytest.mark.parametrize("name", sorted(geoscrape_services()))
def test_every_geoscrape_command_exists_with_its_arguments(name: str) -> None:
    svc = geoscrape_services()[name]
    argv = [expand(a) for a in svc["command"]]
    done = subprocess.run(
        [sys.executable, "-m", "geoscrape.cli", *argv, "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, f"{name}: geoscrape {' '.join(argv)} --help\n{done.stderr}"
    assert "Usage:" in done.stdout


def test_flower_runs_celery_from_the_image() -> None:
    _, flower = services()["flower"]
    assert flower["entrypoint"] == ["sh", "-c"]
    assert flower["command"][0].startswith("exec celery ") and " flower " in flower["command"][0]
    assert (Path(sys.executable).parent / "celery").exists()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("flower") for dep in extras["flower"])
    assert 'pip install ".[flower]"' in (ROOT / "Dockerfile").read_text()


def test_each_worker_pins_exactly_its_region_under_its_own_user() -> None:
    workers = {n: s for n, (_, s) in services().items() if n.startswith("worker-")}
    assert sorted(workers) == sorted(f"worker-{r}" for r in declared_regions())
    for name, svc in workers.items():
        region = name.removeprefix("worker-")
        assert svc["command"] == ["worker", "--region", region], name
        url = environment(svc)["GEOSCRAPE_BROKER_URL"]
        assert url.startswith(f"amqp://geoscrape-{region}:"), name
        assert f"GEOSCRAPE_BROKER_PASSWORD_{region.upper()}" in url, name
    _, regional = services()["region:worker"]
    assert regional["command"] == [
        "worker",
        "--region",
        "${GEOSCRAPE_REGION:?set the region in region.env}",
    ]
    assert environment(regional)["GEOSCRAPE_BROKER_URL"].startswith("${GEOSCRAPE_BROKER_URL")


def setting_variables() -> set[str]:
    """Every GEOSCRAPE_* variable the code reads (tests/test_settings.py checks that no
    module reads one outside the model)."""
    return set(settings.variables())


def test_every_setting_is_classified() -> None:
    known = set().union(*REQUIRED_BY_COMMAND.values(), TLS, OPTIONAL)
    unknown = sorted(setting_variables() - known)
    assert unknown == [], (
        f"classify these in tests/test_compose.py and set them in compose: {unknown}"
    )
    # and nothing classified here is stale: each is a setting the code has
    assert sorted(known - setting_variables()) == []
    assert set(settings.PREFIXES) == PREFIXES


def test_every_service_has_the_variables_its_command_reads() -> None:
    for name, svc in geoscrape_services().items():
        env = environment(svc)
        command = svc["command"][0]
        missing = REQUIRED_BY_COMMAND[command] - set(env)
        assert not missing, f"{name} ({command}) lacks {sorted(missing)}"
        if command == "worker":
            # A regional worker holds broker credentials only, never the store's.
            assert "GEOSCRAPE_DATABASE_URL" not in env, name
        if command == "broker":
            assert {f"GEOSCRAPE_BROKER_PASSWORD_{r.upper()}" for r in declared_regions()} <= set(
                env
            )
    # A region in another cloud talks amqps with the CA, its certificate and key.
    _, regional = services()["region:worker"]
    assert set(environment(regional)) >= TLS
    everywhere = set().union(*(environment(s) for _, s in services().values()))
    assert (setting_variables() - OPTIONAL) <= everywhere


def test_the_images_entry_point_exists() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["geoscrape"\]$', dockerfile, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["geoscrape"] == "geoscrape.cli:main"
    assert shutil.which("geoscrape", path=str(Path(sys.executable).parent))
    for source in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is missing"
    # Every package of the project is copied into the image.
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in include["packages"]["find"]["include"]:
        assert f"COPY {package.rstrip('*')} " in dockerfile, package


def test_the_image_copies_every_package_the_project_installs() -> None:
    """A package missing from the Dockerfile's COPY lines installs fine from a
    checkout and fails only inside the image (`No module named ...`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), re.M))
    assert packages <= copied, f"Dockerfile does not COPY: {sorted(packages - copied)}"
