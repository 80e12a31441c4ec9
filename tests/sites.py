"""A resolved site (what a Job carries) for tests that need a job but no sites.yaml."""

from __future__ import annotations

from typing import Any

from regions.site import Limits, Politeness, ResolvedSite


def resolved_site(name: str = "shop", **fields: Any) -> ResolvedSite:
    """A valid ResolvedSite: the defaults a resolved requests-engine site has, plus `fields`."""
    base: dict[str, Any] = {
        "name": name,
        "start_urls": ["http://127.0.0.1:9/"],
        "engine": "requests",
        "spider": None,
        "follow": None,
        "extract": {"fields": {"title": {"css": "title::text"}}},
        "politeness": Politeness(),
        "limits": Limits(),
    }
    return ResolvedSite.model_validate(base | fields)
