"""Units of Scrapy-project support: config rules, bundles, settings guards (no processes)."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from scheduler.config import Config
from scraper.bundle import BundleError, make_bundle, project_name, sha256_hex, unpack_bundle

PROJECT = Path(__file__).parent / "data" / "shopproject"


def config(**site: Any) -> Config:
    site.setdefault("name", "shop")
    site.setdefault("regions", ["eu"])
    return Config.model_validate({"regions": {"eu": None}, "sites": [site]})


def error_of(**site: Any) -> str:
    with pytest.raises(ValidationError) as info:
        config(**site)
    return str(info.value)


def test_a_project_site_resolves_with_its_spider_args() -> None:
    resolved = config(
        project="deployed:shopbot",
        spider="catalog",
        spider_args={"base_url": "http://x", "pages": 3},
        extract={"key": "sku"},
    ).resolved_site("shop")
    assert resolved.project == "deployed:shopbot"
    assert resolved.spider_args == {"base_url": "http://x", "pages": 3}
    assert resolved.extract is not None and resolved.extract.key == "sku"


@pytest.mark.parametrize(
    ("site", "message"),
    [
        (
            {
                "project": "/srv/p",
                "start_urls": ["http://x"],
                "extract": {"fields": {"a": {"css": "a"}}},
            },
            "'project' and 'spider_args' need",
        ),
        ({"spider": "catalog"}, "a bare spider name needs 'project'"),
        (
            {"project": "/srv/p", "spider": "catalog", "politeness": {"delay": 1}},
            "polite as its settings.py says",
        ),
        ({"project": "deployed:Bad Name", "spider": "catalog"}, "bundle name"),
        ({"start_urls": ["http://x"], "extract": {"key": "sku"}}, "'extract' with 'fields'"),
    ],
)
def test_project_config_errors(site: dict[str, Any], message: str) -> None:
    assert message in error_of(**site)


def test_old_jobs_without_project_keys_still_validate() -> None:
    from regions.site import ResolvedSite

    resolved = config(spider="pkg.mod:Spider").resolved_site("shop").model_dump(mode="json")
    del resolved["project"], resolved["spider_args"]
    assert ResolvedSite.model_validate(resolved).project is None


def test_bundles_are_deterministic_and_skip_caches(tmp_path: Path) -> None:
    copy = tmp_path / "p"
    shutil.copytree(PROJECT, copy)
    first = make_bundle(copy)
    (copy / "shopbot" / "__pycache__").mkdir(exist_ok=True)
    (copy / "shopbot" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert make_bundle(copy) == first
    (copy / "shopbot" / "pipelines.py").write_text("# changed\n")
    assert sha256_hex(make_bundle(copy)) != sha256_hex(first)
    assert project_name(copy) == "shopbot"
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert "scrapy.cfg" in archive.namelist()


def test_unpack_refuses_entries_outside_the_target(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../escape.py", "print('no')")
    with pytest.raises(BundleError, match="leaves its directory"):
        unpack_bundle(buffer.getvalue(), tmp_path / "out")
    assert not (tmp_path / "escape.py").exists()


def test_not_a_project_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no scrapy\.cfg"):
        make_bundle(tmp_path)


def test_guards_override_and_warn_keep_stricter_limits() -> None:
    from scrapy.settings import Settings

    from scraper.project import apply_guards

    site = config(
        project="/srv/p", spider="catalog", limits={"timeout": "20s", "max_redirects": 5}
    ).resolved_site("shop")
    settings = Settings()
    settings.setdict(
        {
            "TELNETCONSOLE_ENABLED": True,
            "DOWNLOAD_TIMEOUT": 5,  # stricter than the site's 20 s: kept
            "REDIRECT_MAX_TIMES": 50,  # looser than 5: overridden
            "DOWNLOADER_MIDDLEWARES": {"myproject.mw.Custom": 500},
        },
        priority="project",
    )
    warnings = apply_guards(settings, site)
    assert settings.getbool("TELNETCONSOLE_ENABLED") is False
    assert settings.getfloat("DOWNLOAD_TIMEOUT") == 5
    assert settings.getint("REDIRECT_MAX_TIMES") == 5
    assert settings.getdict("DOWNLOADER_MIDDLEWARES")["myproject.mw.Custom"] == 500
    assert "scraper.scrapy_engine.SSRFGuardMiddleware" in settings.getdict("DOWNLOADER_MIDDLEWARES")
    assert len(warnings) == 2
    assert any("TELNETCONSOLE_ENABLED=True overridden" in w for w in warnings)
    assert any("REDIRECT_MAX_TIMES=50 overridden" in w for w in warnings)


def test_dispatch_pins_the_newest_bundle_and_refuses_without_one(sqlite_url: str) -> None:
    from scheduler.dispatch import DispatchError, plan_jobs
    from storage.code import code_pinner, save_bundle
    from storage.db import make_engine, session_factory

    cfg = config(project="deployed:shopbot", spider="catalog")
    with pytest.raises(DispatchError, match="needs the store"):
        plan_jobs(cfg, "shop")
    pin = code_pinner(sqlite_url)
    with pytest.raises(DispatchError, match="no code deployed as 'shopbot'"):
        plan_jobs(cfg, "shop", pin_code=pin)
    sessions = session_factory(make_engine(sqlite_url))
    for content in (b"first", b"second"):
        with sessions() as session:
            save_bundle(session, "shopbot", sha256_hex(content), content)
            session.commit()
    [job] = plan_jobs(cfg, "shop", pin_code=pin)
    assert job.code is not None and job.code.sha256 == sha256_hex(b"second")


def test_deploy_bad_input_is_one_line_and_exit_2(tmp_path: Path, sqlite_url: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "GEOSCRAPE_DATABASE_URL": sqlite_url}
    for target, message in (
        (tmp_path / "missing", "no such directory"),
        (tmp_path, "not a Scrapy project (no scrapy.cfg)"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "geoscrape.cli", "deploy", str(target)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_job_pinning_code_the_worker_cannot_get_fails_before_any_crawl(tmp_path: Path) -> None:
    from pydantic import BaseModel

    from regions.messages import CodeRef, Job, RunFinished, RunStarted
    from scraper.code import CodeCache
    from scraper.runner import run_job

    site = config(project="deployed:shopbot", spider="catalog").resolved_site("shop")
    job = Job(
        run_id="r1",
        site="shop",
        region="eu",
        config=site.model_dump(mode="json"),
        code=CodeRef(name="shopbot", sha256="0" * 64),
    )
    messages: list[BaseModel] = []
    finished = run_job(job, messages.append, worker="w")
    assert finished.status == "failed" and "no code source here" in (finished.error or "")
    no_url = CodeCache(tmp_path / "cache", None, None, "eu")
    finished = run_job(job, messages.append, worker="w", code=no_url.path)
    assert "GEOSCRAPE_CODE_URL is not set" in (finished.error or "")
    assert [type(m) for m in messages] == [RunStarted, RunFinished] * 2
    assert not (tmp_path / "cache").exists()
