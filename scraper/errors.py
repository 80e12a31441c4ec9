"""Exceptions of the scraper package; ScraperError is the root."""

from __future__ import annotations


class ScraperError(Exception):
    """Root of every error raised by the scraper package."""
