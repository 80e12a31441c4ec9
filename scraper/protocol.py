"""The event protocol between a crawl child (`python -m scraper.child`) and its parent.

The parent writes one Job as JSON to the child's stdin. The child writes
newline-delimited JSON events to its protocol stream (the original stdout; the
child points fd 1 at stderr so nothing else can write there):

    {"event": "item",  "item":  {ScrapedItem}}
    {"event": "fetch", "fetch": {Fetch}}
    {"event": "release", "entry": str}   # distributed runs: a page is handled
    {"event": "done",  "status": "succeeded" | "failed", "error": str | null,
                       "stats": {RunStats}}            # exactly one, last

`release` (scraper/frontier.py) comes after the page's fetch and items: the
parent ends the page's lease once those are published.

This module is shared by both sides and must not import Scrapy or Twisted.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from regions.messages import Fetch, RunStats, ScrapedItem

Status = Literal["succeeded", "failed"]

ITEM = "item"
FETCH = "fetch"
RELEASE = "release"
DONE = "done"


class ProtocolError(ValueError):
    """A line on the protocol stream that is not a valid event."""


@dataclass(frozen=True)
class Done:
    status: Status
    error: str | None
    stats: RunStats


@dataclass(frozen=True)
class Release:
    """A distributed run's page is handled: its lease may end once its items are out."""

    entry: str


Event = ScrapedItem | Fetch | Release | Done


def encode_item(item: ScrapedItem) -> str:
    return json.dumps({"event": ITEM, "item": item.model_dump(mode="json")})


def encode_fetch(fetch: Fetch) -> str:
    return json.dumps({"event": FETCH, "fetch": fetch.model_dump(mode="json")})


def encode_done(status: Status, error: str | None, stats: RunStats) -> str:
    return json.dumps(
        {"event": DONE, "status": status, "error": error, "stats": stats.model_dump(mode="json")}
    )


def decode_event(line: str | bytes) -> Event:
    """One protocol line -> ScrapedItem | Fetch | Done; ProtocolError otherwise."""
    try:
        body = json.loads(line)
        kind = body["event"]
        if kind == ITEM:
            return ScrapedItem.model_validate(body["item"])
        if kind == FETCH:
            return Fetch.model_validate(body["fetch"])
        if kind == RELEASE:
            return Release(str(body["entry"]))
        if kind == DONE:
            status = body["status"]
            if status not in ("succeeded", "failed"):
                raise ValueError(f"bad status {status!r}")
            return Done(status, body.get("error"), RunStats.model_validate(body["stats"]))
    except Exception as exc:
        raise ProtocolError(f"bad protocol line {_preview(line)}: {exc}") from exc
    raise ProtocolError(f"unknown event {kind!r}")


def _preview(line: str | bytes, limit: int = 200) -> str:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


@dataclass
class StatsTracker:
    """Counts what a run produced; the same rules on both sides of the pipe."""

    pages: int = 0
    items: int = 0
    errors: int = 0
    bytes: int = 0
    dropped: int = 0
    status_codes: dict[str, int] = field(default_factory=dict)
    rate_wait: float = 0.0
    rate_pauses: int = 0
    rate_strikes: int = 0
    started: float = field(default_factory=time.monotonic)

    def add_fetch(self, fetch: Fetch) -> None:
        if fetch.status is not None:
            self.pages += 1
            code = str(fetch.status)
            self.status_codes[code] = self.status_codes.get(code, 0) + 1
        if fetch.error is not None:
            self.errors += 1
        self.bytes += fetch.bytes

    def add_item(self, item: ScrapedItem) -> None:
        if item.sample == 0:  # extra samples are the same items again, not more of them
            self.items += 1

    def add_error(self) -> None:
        self.errors += 1

    def add_dropped(self) -> None:
        self.dropped += 1

    def snapshot(self) -> RunStats:
        return RunStats(
            pages=self.pages,
            items=self.items,
            errors=self.errors,
            bytes=self.bytes,
            duration=round(time.monotonic() - self.started, 3),
            status_codes=dict(sorted(self.status_codes.items())),
            dropped=self.dropped,
            rate_wait=round(self.rate_wait, 3),
            rate_pauses=self.rate_pauses,
            rate_strikes=self.rate_strikes,
        )


class Recorder:
    """The child's side: writes events and keeps the run's stats.

    Thread-safe. Items are deduplicated by (sample, key) (an item is identified
    by (run_id, sample, key), so a repeat would only overwrite the first).
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.stats = StatsTracker()
        self._keys: set[tuple[int, str]] = set()
        self.duplicates = 0
        self.first_error: Fetch | None = None
        self.limits_hit: list[str] = []  # crawl-wide limits that cut the run short
        self.notes: list[str] = []  # warnings kept on the run (e.g. overridden settings)
        self.tree_peak_rss = 0  # set by an engine that runs helper processes (browser)
        self._done = False

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()

    def fetch(self, fetch: Fetch) -> None:
        with self._lock:
            self.stats.add_fetch(fetch)
            if fetch.error is not None and self.first_error is None:
                self.first_error = fetch
            self._write(encode_fetch(fetch))

    def item(self, item: ScrapedItem) -> bool:
        """Record an item; False (and nothing written) for a repeated key."""
        with self._lock:
            if (item.sample, item.key) in self._keys:
                self.duplicates += 1
                return False
            self._keys.add((item.sample, item.key))
            self.stats.add_item(item)
            self._write(encode_item(item))
            return True

    def release(self, entry: str) -> None:
        """A frontier entry is handled (after its fetch and items were written)."""
        with self._lock:
            self._write(json.dumps({"event": RELEASE, "entry": entry}))

    def error(self) -> None:
        """Count an error that is not a fetch (an exception in a spider callback)."""
        with self._lock:
            self.stats.add_error()

    def dropped(self) -> None:
        """Count an item a pipeline dropped (Scrapy's DropItem)."""
        with self._lock:
            self.stats.add_dropped()

    def note(self, text: str) -> None:
        """A warning kept as the run's note (its error field) even when it succeeds."""
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)

    def limit(self, what: str) -> None:
        """Note a crawl-wide limit that stopped part of the crawl (kept as the run's error)."""
        with self._lock:
            if what not in self.limits_hit:
                self.limits_hit.append(what)

    def rate_budget(self, waited: float, pauses: int, strikes: int) -> None:
        """The shared rate budget's part of the stats (scraper.ratelimit.Budget)."""
        with self._lock:
            self.stats.rate_wait = waited
            self.stats.rate_pauses = pauses
            self.stats.rate_strikes = strikes

    def outcome(
        self, crash: str | None = None, note: str | None = None
    ) -> tuple[Status, str | None]:
        """The run's status: failed on a crash or when no request got an HTTP response."""
        if crash is not None:
            return "failed", crash
        if self.stats.pages == 0:
            if self.first_error is not None:
                first = self.first_error
                return "failed", f"{first.error} ({first.url})"
            return "failed", note or "no page was fetched"
        notes = list(self.notes)
        if self.limits_hit:  # a successful run that did not see everything says so
            notes.insert(0, "limit reached: " + "; ".join(self.limits_hit))
        return "succeeded", "; ".join(notes) or None

    def done(self, status: Status, error: str | None) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            rss = max(peak_rss(), self.tree_peak_rss)
            stats = self.stats.snapshot().model_copy(update={"peak_rss": rss})
            self._write(encode_done(status, error, stats))


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def payload(event: Event) -> dict[str, Any]:
    """An event as the JSON object it travels as (for tests and debugging)."""
    if isinstance(event, ScrapedItem):
        return json.loads(encode_item(event))
    if isinstance(event, Fetch):
        return json.loads(encode_fetch(event))
    if isinstance(event, Release):
        return {"event": RELEASE, "entry": event.entry}
    return json.loads(encode_done(event.status, event.error, event.stats))
