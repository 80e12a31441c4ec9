"""Result batching: items and fetches of one run grouped into ItemBatch messages.

A batch is cut when it holds `max_entries` entries (items + fetches, so a
message stays bounded either way) or when its oldest entry has waited
`max_seconds`, or as soon as the response bodies it carries (keep_bodies)
reach MAX_BODY_CHARS, so a message stays well under the broker's size limit.
Batches are numbered from 0 (`seq`); empty batches are never
produced. Pure and clock-injectable: the runner drives it, tests use a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from regions.messages import Fetch, ItemBatch, ScrapedItem, utcnow

MAX_BODY_CHARS = 8 * 1024 * 1024  # base64 body text per batch (one body may exceed it)


class Batcher:
    def __init__(
        self,
        run_id: str,
        site: str,
        region: str,
        *,
        max_entries: int = 100,
        max_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if max_seconds <= 0:
            raise ValueError("max_seconds must be positive")
        self.run_id, self.site, self.region = run_id, site, region
        self.max_entries = max_entries
        self.max_seconds = max_seconds
        self._clock = clock
        self._items: list[ScrapedItem] = []
        self._fetches: list[Fetch] = []
        self._opened_at: float | None = None  # when the pending batch got its first entry
        self._body_chars = 0
        self.next_seq = 0

    def __len__(self) -> int:
        """Entries waiting in the pending batch."""
        return len(self._items) + len(self._fetches)

    def add_item(self, item: ScrapedItem) -> ItemBatch | None:
        """Add an item; returns the batch it completed, if any."""
        self._opened()
        self._items.append(item)
        return self._cut_if_full()

    def add_fetch(self, fetch: Fetch) -> ItemBatch | None:
        """Add a fetch; returns the batch it completed, if any."""
        self._opened()
        self._fetches.append(fetch)
        self._body_chars += len(fetch.body or "")
        return self._cut_if_full()

    def deadline(self) -> float | None:
        """Clock time at which the pending batch is due; None when it is empty."""
        return None if self._opened_at is None else self._opened_at + self.max_seconds

    def poll(self) -> ItemBatch | None:
        """The pending batch if it has waited max_seconds, else None."""
        deadline = self.deadline()
        if deadline is not None and self._clock() >= deadline:
            return self.flush()
        return None

    def flush(self) -> ItemBatch | None:
        """The pending batch now (None when empty)."""
        if not len(self):
            return None
        batch = ItemBatch(
            run_id=self.run_id,
            site=self.site,
            region=self.region,
            seq=self.next_seq,
            observed_at=utcnow(),
            items=self._items,
            fetches=self._fetches,
        )
        self.next_seq += 1
        self._items, self._fetches, self._opened_at = [], [], None
        self._body_chars = 0
        return batch

    def _opened(self) -> None:
        if self._opened_at is None:
            self._opened_at = self._clock()

    def _cut_if_full(self) -> ItemBatch | None:
        full = len(self) >= self.max_entries or self._body_chars >= MAX_BODY_CHARS
        return self.flush() if full else None
