"""What every fetch records besides its status: digest, block signature, body.

Called by each engine once per response (the one place engines meet issue 14):

    facts = inspect(site, url, final_url, status, headers, body)
    recorder.fetch(Fetch(url=url, status=status, bytes=len(body), **facts.fields()))
    if facts.block is None: ... extract items ...

The sha256 is of the body as received (after content decoding), so equal
digests in two regions mean the regions got byte-identical pages. The body
itself travels only when the site keeps bodies (`keep_bodies: true`), for the
WARC export; it is already bounded by limits.max_bytes.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from regions.site import ResolvedSite
from scraper.blocks import Page, match


@dataclass(frozen=True)
class Facts:
    sha256: str
    block: str | None  # the name of the signature the page matched
    body: str | None = None  # base64, only with keep_bodies
    headers: list[tuple[str, str]] | None = None

    def fields(self) -> dict[str, Any]:
        """Keyword arguments for regions.messages.Fetch."""
        return {
            "sha256": self.sha256,
            "block": self.block,
            "body": self.body,
            "headers": self.headers,
        }


def inspect(
    site: ResolvedSite,
    url: str,
    final_url: str,
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
) -> Facts:
    sig = match(Page(url, final_url, status, headers, body), site.access.signatures)
    kept = site.keep_bodies
    return Facts(
        sha256=hashlib.sha256(body).hexdigest(),
        block=sig.name if sig is not None else None,
        body=base64.b64encode(body).decode("ascii") if kept else None,
        headers=[(str(k), str(v)) for k, v in headers] if kept else None,
    )
