"""Where `engine: browser` finds Chromium, and how it starts it.

The browser is Debian's `chromium` (found on PATH, or the file named by
`GEOSCRAPE_CHROMIUM`), never one Playwright downloads: workers in other clouds
run what their image ships, and the machines are often offline.

This module imports neither Playwright nor Scrapy, so the worker can check
for the browser at start (`check_browser_sites`) and fail with one line,
rather than every browser crawl failing later.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

from regions.settings import env_name, settings
from scheduler.config import Config
from scraper.errors import ScraperError

CHROMIUM_ENV = env_name("chromium")
CHROMIUM_NAMES = ("chromium", "chromium-browser")

# Flags for a headless crawl on a closed network. --no-sandbox: workers run as
# root in containers, where Chromium's sandbox cannot start. The rest stop
# Chromium's own traffic (updates, sync, field trials, QUIC probes): every
# connection it makes is one a page asked for, and passes the SSRF guard.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--disable-features=DnsOverHttps,MediaRouter,OptimizationHints",
    "--metrics-recording-only",
)


class ChromiumMissing(ScraperError):
    """No usable Chromium for `engine: browser`."""


def find_chromium() -> str:
    """The Chromium executable: $GEOSCRAPE_CHROMIUM, else `chromium` on PATH."""
    if (path := settings().chromium) is not None:
        configured = str(path)
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise ChromiumMissing(
            f"{CHROMIUM_ENV}={configured} is not an executable file (engine 'browser' needs "
            "Chromium: install Debian's 'chromium' package or point the variable at it)"
        )
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise ChromiumMissing(
        "engine 'browser' needs Chromium, and none is on PATH: install Debian's 'chromium' "
        f"package (apt-get install chromium) or set {CHROMIUM_ENV} to its executable"
    )


def browser_sites(config: Config, region: str) -> list[str]:
    """Names of the sites with `engine: browser` that run in `region`."""
    return [s.name for s in config.sites if s.engine == "browser" and region in s.regions]


def check_browser_sites(config: Config, region: str) -> None:
    """At worker start: a region with browser sites must have a Chromium."""
    names: Iterable[str] = browser_sites(config, region)
    if not names:
        return
    try:
        find_chromium()
    except ChromiumMissing as exc:
        raise ChromiumMissing(
            f"region {region!r} has browser site(s) {', '.join(names)}: {exc}"
        ) from None
