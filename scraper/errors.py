"""Exceptions of the scraper package; ScraperError is the root."""

from __future__ import annotations


class ScraperError(Exception):
    """Root of every error raised by the scraper package."""


class CrawlAborted(ScraperError):
    """The worker aborted a crawl before it finished (a second stop signal, a cancel).

    Everything the crawl sent so far (items, fetches) was published; no
    RunFinished was: the caller decides what becomes of the run.
    """

    def __init__(self, run_id: str, pages: int, items: int) -> None:
        super().__init__(f"run {run_id}: crawl aborted after {pages} pages, {items} items")
        self.run_id = run_id
        self.pages = pages
        self.items = items
