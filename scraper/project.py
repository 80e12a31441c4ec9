"""Scrapy projects run unchanged: a site's `project:` with its own settings.

Settings are layered the way `scrapy crawl` layers them: Scrapy's defaults,
then the project's settings module (priority "project"), then the spider's
`custom_settings` (priority "spider"). geoscrape then writes, at priority
"cmdline" (above both), only its safety guards, GUARDS below; everything
else (pipelines, middlewares, extensions, politeness, retries...) is the
project's. A guard that replaces a value the project or spider set is a
warning in `geoscrape check` and in the run's note. A limit the project sets
stricter than the site's `limits` is kept.

Runs inside the crawl child, and in `geoscrape check` (it imports Scrapy).
"""

from __future__ import annotations

import configparser
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scrapy
from scrapy.settings import SETTINGS_PRIORITIES, Settings
from scrapy.spiderloader import SpiderLoader

from regions.site import DEPLOYED_PREFIX, ResolvedSite
from scraper.errors import ScraperError

SCRAPY_CFG = "scrapy.cfg"
GUARD_PRIORITY = "cmdline"  # above the spider's custom_settings

RECORDER_MIDDLEWARE = "scraper.scrapy_engine.FetchRecorderMiddleware"
GUARD_MIDDLEWARE = "scraper.scrapy_engine.SSRFGuardMiddleware"
GUARDED_RESOLVER = "scraper.scrapy_engine.GuardedResolver"
EGRESS_MIDDLEWARE = "scraper.scrapy_engine.EgressMiddleware"
SOURCE_MIDDLEWARE = "scraper.scrapy_engine.SourceAddressMiddleware"
BUDGET_MIDDLEWARE = "scraper.scrapy_engine.RateBudgetMiddleware"


class ProjectError(ScraperError):
    """A `project:` that cannot be loaded (no scrapy.cfg, no settings module...)."""


class SpiderLoadError(ScraperError):
    """The configured `spider` cannot be found or imported."""


@dataclass(frozen=True)
class Guard:
    """One setting geoscrape forces on a project, and why (shown in docs and warnings)."""

    setting: str
    why: str
    # The site's value -> the value to force; `stricter` keeps a project value
    # that is at least as strict (a limit where 0 means "no limit").
    value: Callable[[ResolvedSite], Any]
    stricter: bool = False
    zero_is_unlimited: bool = True


def _depth(site: ResolvedSite) -> int:
    if site.follow is not None and site.follow.max_depth is not None:
        return site.follow.max_depth
    return site.limits.max_depth


GUARDS: tuple[Guard, ...] = (
    Guard("TWISTED_DNS_RESOLVER", "SSRF guard: refused addresses are dropped from every "
          "name resolution", lambda s: GUARDED_RESOLVER),
    Guard("TELNETCONSOLE_ENABLED", "no remote control of a worker", lambda s: False),
    Guard("REMOTE_CONTROL_ENABLED", "no remote control of a worker", lambda s: False),
    Guard("DOWNLOAD_TIMEOUT", "limits.timeout", lambda s: s.limits.timeout, stricter=True),
    Guard("DOWNLOAD_MAXSIZE", "limits.max_bytes", lambda s: s.limits.max_bytes, stricter=True),
    Guard("REDIRECT_MAX_TIMES", "limits.max_redirects", lambda s: s.limits.max_redirects,
          stricter=True, zero_is_unlimited=False),
    Guard("CLOSESPIDER_TIMEOUT", "limits.max_duration", lambda s: s.limits.max_duration,
          stricter=True),
    Guard("DEPTH_LIMIT", "limits.max_depth / follow.max_depth", _depth, stricter=True),
)  # fmt: skip
# Added to the project's DOWNLOADER_MIDDLEWARES (its own entries stay): the
# fetch recorder with limits.max_pages, the SSRF guard of every request, the
# region's source address, its egress exits (600: after retries, before
# HttpProxyMiddleware) and the shared rate budget (950: next to the
# downloader, so it counts what goes on the wire).
GEOSCRAPE_MIDDLEWARES = {
    RECORDER_MIDDLEWARE: 50,
    GUARD_MIDDLEWARE: 60,
    SOURCE_MIDDLEWARE: 70,
    EGRESS_MIDDLEWARE: 600,
    BUDGET_MIDDLEWARE: 950,
}


def _explicit(settings: Settings, name: str) -> bool:
    """Set by the project or its spider (not a Scrapy default)."""
    priority = settings.getpriority(name)
    return priority is not None and priority >= SETTINGS_PRIORITIES["project"]


def _forced(guard: Guard, site: ResolvedSite, current: Any, explicit: bool) -> Any:
    ours = guard.value(site)
    if not (guard.stricter and explicit):
        return ours
    theirs = float(current)
    if guard.zero_is_unlimited:
        if theirs > 0 and (ours == 0 or theirs <= ours):
            return current
    elif theirs <= ours:
        return current
    return ours


def apply_guards(settings: Settings, site: ResolvedSite) -> list[str]:
    """Force GUARDS (and geoscrape's middlewares) onto `settings`; the override warnings."""
    warnings: list[str] = []
    for guard in GUARDS:
        current = settings.get(guard.setting)
        explicit = _explicit(settings, guard.setting)
        forced = _forced(guard, site, current, explicit)
        if explicit and forced != current:
            warnings.append(
                f"project setting {guard.setting}={current!r} overridden by "
                f"geoscrape ({forced!r}: {guard.why})"
            )
        settings.set(guard.setting, forced, priority=GUARD_PRIORITY)
    middlewares = dict(settings.getdict("DOWNLOADER_MIDDLEWARES"))
    for path, order in GEOSCRAPE_MIDDLEWARES.items():
        if path in middlewares and middlewares[path] != order:
            warnings.append(f"project setting DOWNLOADER_MIDDLEWARES[{path!r}] overridden")
        middlewares[path] = order
    settings.set("DOWNLOADER_MIDDLEWARES", middlewares, priority=GUARD_PRIORITY)
    settings.set("GEOSCRAPE_MAX_PAGES", site.limits.max_pages, priority=GUARD_PRIORITY)
    settings.set("GEOSCRAPE_MAX_DEPTH", _depth(site), priority=GUARD_PRIORITY)
    return warnings


def settings_module_of(project: str) -> tuple[str, Path | None]:
    """(the settings module, the directory to import it from) of a `project:`.

    A directory must hold a scrapy.cfg whose [settings] `default` names the
    module (as `scrapy crawl` finds it); anything else is a module name.
    """
    path = Path(project)
    if project.startswith(DEPLOYED_PREFIX):
        raise ProjectError(
            f"project {project!r}: no code bundle here (a worker runs the one its job pins)"
        )
    if path.is_dir():
        cfg = path / SCRAPY_CFG
        if not cfg.is_file():
            raise ProjectError(f"project {project!r}: no {SCRAPY_CFG} in {path}")
        parser = configparser.ConfigParser()
        try:
            parser.read(cfg, encoding="utf-8")
        except configparser.Error as exc:
            raise ProjectError(f"{cfg}: {exc}") from None
        module = parser.get("settings", "default", fallback="").strip()
        if not module:
            raise ProjectError(f"{cfg}: no 'default' settings module under [settings]")
        return module, path.resolve()
    if "/" in project or project.startswith("."):
        raise ProjectError(f"project {project!r}: no such directory")
    return project, None


def load_settings(project: str) -> Settings:
    """Scrapy's defaults plus the project's settings module (priority "project").

    A project directory goes first on sys.path, as `scrapy crawl` run there has it.
    """
    module_name, root = settings_module_of(project)
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the settings module itself failing
        raise ProjectError(
            f"project {project!r}: cannot import settings module {module_name!r}: {exc}"
        ) from exc
    settings = Settings()
    settings.setmodule(module, priority="project")
    return settings


def spider_class(spec: str, settings: Settings | None = None) -> type[scrapy.Spider]:
    """A spider by "module:Class", by name in the project (SPIDER_MODULES), or by dotted path."""
    if ":" in spec:
        module_name, _, class_name = spec.partition(":")
        return _import_spider(module_name, class_name, spec)
    if settings is not None:
        try:
            loader = SpiderLoader.from_settings(settings)
        except Exception as exc:  # a spider module that fails to import
            raise SpiderLoadError(f"cannot load the project's spiders: {exc}") from exc
        if spec in loader.list():
            spider: type[scrapy.Spider] = loader.load(spec)
            return spider
    if "." in spec:
        module_name, _, class_name = spec.rpartition(".")
        return _import_spider(module_name, class_name, spec)
    known = ", ".join(SpiderLoader.from_settings(settings).list()) if settings else ""
    raise SpiderLoadError(f"no spider named {spec!r} (the project has: {known or 'none'})")


def _import_spider(module_name: str, class_name: str, spec: str) -> type[scrapy.Spider]:
    try:
        module = importlib.import_module(module_name)
        spider_cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise SpiderLoadError(f"cannot load spider {spec!r}: {exc}") from exc
    if not (isinstance(spider_cls, type) and issubclass(spider_cls, scrapy.Spider)):
        raise SpiderLoadError(f"{spec!r} is not a scrapy.Spider subclass")
    return spider_cls


def override_warnings(site: ResolvedSite) -> list[str]:
    """What `geoscrape check` says about a local project: the settings geoscrape overrides."""
    if site.project is None or site.spider is None:
        return []
    settings = load_settings(site.project)
    spider_cls = spider_class(site.spider, settings)
    settings = settings.copy()
    spider_cls.update_settings(settings)  # the spider's custom_settings, as Crawler does
    return apply_guards(settings, site)
