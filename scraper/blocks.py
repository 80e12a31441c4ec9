"""Block pages: which known CDN block page, bot wall or captcha a response is.

    signature = match(page, site.access.signatures)   # None: a real page

The built-in set is the versioned data file scraper/data/block_signatures.yaml;
a site's own `access.signatures:` are tried first. A signature holds when every
condition it gives holds (status in the list; each header matching its pattern;
any one body pattern, searched case-insensitively in the first 64 KiB; the
final URL matching `redirect`; `offsite`: the redirect left the host asked
for). Matching ignores the status code unless the signature names one: a 200
captcha page is a block, not data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict

from regions.site import BlockSignature

# Block pages are small: only the start of a body is searched, so a big real page
# costs little (a regex pass over 64 KiB is well under a millisecond).
BODY_SCAN_BYTES = 64 * 1024


class SignatureSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    signatures: list[BlockSignature]


@cache
def builtin() -> SignatureSet:
    """The signature set shipped with geoscrape."""
    text = resources.files("scraper").joinpath("data/block_signatures.yaml").read_text("utf-8")
    return SignatureSet.model_validate(yaml.safe_load(text))


@dataclass(frozen=True)
class Page:
    """One response as block detection sees it."""

    url: str  # as asked for
    final_url: str  # after redirects
    status: int
    headers: Sequence[tuple[str, str]]
    body: bytes


def _host(url: str) -> str:
    host = (urlsplit(url).hostname or "").lower()
    return host.removeprefix("www.")


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


@cache
def _body_pattern(pattern: str) -> re.Pattern[str]:
    """A body pattern, searched in the lower-cased body: Python's IGNORECASE
    search is some 50 times slower, so only a pattern with upper-case
    characters (an escape like \\S, or a site's own) pays for it."""
    flags = re.IGNORECASE if any(c.isupper() for c in pattern) else 0
    return re.compile(pattern, flags)


def matches(page: Page, sig: BlockSignature, text: str) -> bool:
    """Whether ``page`` (``text``: its body's start, lower-cased) is this block page."""
    if sig.status and page.status not in sig.status:
        return False
    for name, pattern in sig.headers.items():
        values = [v for k, v in page.headers if k.lower() == name.lower()]
        if not any(_compiled(pattern).search(v) for v in values):
            return False
    if sig.body and not any(_body_pattern(p).search(text) for p in sig.body):
        return False
    if sig.redirect is not None and (
        page.final_url == page.url or not _compiled(sig.redirect).search(page.final_url)
    ):
        return False
    return not (sig.offsite and _host(page.final_url) == _host(page.url))


def warm() -> None:
    """Parse the built-in set and compile its patterns now (the fork server does,
    so that no crawl forked from it pays for them)."""
    for sig in builtin().signatures:
        for pattern in sig.body:
            _body_pattern(pattern)
        for pattern in [*sig.headers.values(), *([sig.redirect] if sig.redirect else [])]:
            _compiled(pattern)


def match(page: Page, own: Sequence[BlockSignature] = ()) -> BlockSignature | None:
    """The first signature (the site's own, then the built-in ones) the page matches."""
    text = page.body[:BODY_SCAN_BYTES].decode("utf-8", "replace").lower()
    for sig in [*own, *builtin().signatures]:
        if matches(page, sig, text):
            return sig
    return None
