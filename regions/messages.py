"""The wire format between dispatcher, regional workers and central ingest.

This module is the only thing `scraper` and `storage` share. Every message is
JSON with a ``v`` (schema version) and a ``kind``. Bump SCHEMA_VERSION and keep
reading the old shape when a change is not backwards compatible.

Idempotency lives in the identifiers, not in the transport: a run id is fixed
at dispatch; an item is identified by (run_id, key); a fetch by (run_id, url).
Ingest can therefore apply any message any number of times, in any order.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1

RunStatus = Literal["queued", "running", "succeeded", "failed"]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed"})


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    v: int = SCHEMA_VERSION


class Job(_Message):
    """One crawl of one site from one region: the body of a scrape task."""

    kind: Literal["job"] = "job"
    run_id: str
    site: str
    region: str
    trigger: str = "manual"
    tick: str | None = None
    dispatched_at: datetime = Field(default_factory=utcnow)
    # The validated site config (scheduler.config.Site.model_dump(mode="json")),
    # frozen at dispatch so a config edit never changes a job in flight.
    config: dict[str, Any]


class ScrapedItem(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    key: str
    url: str
    data: dict[str, Any]


class Fetch(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    url: str
    status: int | None = None  # None: no HTTP response (DNS, refused, timeout...)
    bytes: int = 0
    error: str | None = None
    final_url: str | None = None  # after redirects, when it differs


class RunQueued(_Message):
    kind: Literal["run_queued"] = "run_queued"
    run_id: str
    site: str
    region: str
    trigger: str = "manual"
    tick: str | None = None
    queued_at: datetime


class RunStarted(_Message):
    kind: Literal["run_started"] = "run_started"
    run_id: str
    site: str
    region: str
    worker: str
    started_at: datetime


class ItemBatch(_Message):
    kind: Literal["items"] = "items"
    run_id: str
    site: str
    region: str
    seq: int
    observed_at: datetime
    items: list[ScrapedItem] = []
    fetches: list[Fetch] = []


class RunStats(BaseModel):
    model_config = ConfigDict(extra="ignore")
    pages: int = 0
    items: int = 0
    errors: int = 0
    bytes: int = 0
    duration: float = 0.0
    status_codes: dict[str, int] = {}


class RunProgress(_Message):
    kind: Literal["run_progress"] = "run_progress"
    run_id: str
    site: str
    region: str
    stats: RunStats


class RunFinished(_Message):
    kind: Literal["run_finished"] = "run_finished"
    run_id: str
    site: str
    region: str
    status: Literal["succeeded", "failed"]
    finished_at: datetime
    stats: RunStats
    error: str | None = None


IngestMessage = Annotated[
    RunQueued | RunStarted | ItemBatch | RunProgress | RunFinished,
    Field(discriminator="kind"),
]
_ingest_adapter: TypeAdapter[IngestMessage] = TypeAdapter(IngestMessage)


class MessageError(ValueError):
    """A message on the bus that does not match this schema."""


def parse_ingest(body: Any) -> IngestMessage:
    """Parse a decoded JSON body (dict) or raw JSON (str/bytes) into a message."""
    try:
        if isinstance(body, str | bytes):
            return _ingest_adapter.validate_json(body)
        return _ingest_adapter.validate_python(body)
    except Exception as exc:  # pydantic.ValidationError or JSON errors
        raise MessageError(f"not a valid ingest message: {exc}") from exc


def dump(message: BaseModel) -> dict[str, Any]:
    """A message as a JSON-ready dict."""
    return message.model_dump(mode="json")
