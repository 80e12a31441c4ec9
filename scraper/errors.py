"""Exceptions of the scraper package; ScraperError is the root."""

from __future__ import annotations


class ScraperError(Exception):
    """Root of every error raised by the scraper package."""


# The worker/runner contract: defined beside the worker (regions sits below scraper).
from regions.errors import CrawlAborted  # noqa: E402

__all__ = ["CrawlAborted", "ScraperError"]
