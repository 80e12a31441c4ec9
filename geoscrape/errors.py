"""The CLI's own errors; GeoscrapeError is their root.

The packages keep their own roots (RegionsError, SchedulerError, ScraperError,
StorageError); the CLI turns all of them into one line on stderr and exit 2.
"""

from __future__ import annotations


class GeoscrapeError(Exception):
    """Root of the errors the `geoscrape` CLI raises itself (bad option values...)."""


class BadInput(GeoscrapeError):
    """A command-line value that names nothing or cannot be used."""
