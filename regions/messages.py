"""The wire format between dispatcher, regional workers and central ingest.

This module, with the site a job carries (regions/site.py), is the only thing
`scraper` and `storage` share. Every message is JSON with a ``v`` (schema
version) and a ``kind``. Bump SCHEMA_VERSION and keep
reading the old shape when a change is not backwards compatible.

Idempotency lives in the identifiers, not in the transport: a run id is fixed
at dispatch; an item is identified by (run_id, key); a fetch by (run_id, url).
Ingest can therefore apply any message any number of times, in any order.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from regions.site import ResolvedSite

SCHEMA_VERSION = 1
MAX_INT64 = 2**63 - 1
Count = Annotated[int, Field(ge=0, le=MAX_INT64)]

# skipped: the scheduler did not dispatch a tick (overlap); expired: no worker
# started the job in time; dead: the job was dead-lettered after failing repeatedly;
# degraded: the crawl succeeded but failed one of the site's `expect:` checks
# (set centrally by storage/monitors.py, never sent by a worker); cancelled:
# `geoscrape cancel` (scheduler/cancel.py).
FinalStatus = Literal["succeeded", "failed", "skipped", "expired", "dead", "degraded", "cancelled"]
RunStatus = Literal[
    "queued",
    "running",
    "succeeded",
    "failed",
    "skipped",
    "expired",
    "dead",
    "degraded",
    "cancelled",
]
FINAL_STATUSES: frozenset[str] = frozenset(
    {"succeeded", "failed", "skipped", "expired", "dead", "degraded", "cancelled"}
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    # A newer schema than this code knows is refused (kept as a bad message),
    # never misread as the current one.
    v: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)


class CodeRef(BaseModel):
    """A deployed code bundle (`geoscrape deploy`), pinned by its content hash."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def version(self) -> str:
        """How runs show it: name@first 12 hex digits of the hash."""
        return f"{self.name}@{self.sha256[:12]}"


class Job(_Message):
    """One crawl of one site from one region: the body of a scrape task."""

    kind: Literal["job"] = "job"
    run_id: str
    site: str
    region: str
    trigger: str = "manual"
    tick: str | None = None
    dispatched_at: AwareDatetime = Field(default_factory=utcnow)
    # The resolved site (scheduler.config.Config.resolved_site), frozen at
    # dispatch so a config edit never changes a job in flight. Validated on
    # receipt: a job whose config does not validate is refused as a whole.
    config: ResolvedSite
    # Scheduled jobs: a worker must not start the job after this (its site's
    # next tick); RabbitMQ drops it from the queue then too (message TTL).
    expires_at: AwareDatetime | None = None
    # Which delivery of this run this is: 1 at dispatch, +1 each time ingest's
    # reaper redelivers it after its lease lapsed (storage/reaper.py).
    attempt: int = Field(1, ge=1, le=1_000_000)
    # The exact code bundle a `project: deployed:NAME` site runs, pinned at dispatch.
    code: CodeRef | None = None


class ScrapedItem(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    key: str
    url: str
    data: dict[str, Any]
    # Which fetch of the page this came from (compare.samples): 0 is the run's
    # own observation, 1.. the extra samples kept for noise-controlled compare.
    sample: int = Field(0, ge=0, le=100)


class Fetch(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    url: str
    status: int | None = Field(None, ge=100, le=999)  # None: no HTTP response
    bytes: int = Field(0, ge=0, le=MAX_INT64)
    error: str | None = None
    final_url: str | None = None  # after redirects, when it differs
    exit: str | None = None  # the public address the request left from, when known
    sample: int = Field(0, ge=0, le=100)  # as ScrapedItem.sample
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # of the body as received
    block: str | None = None  # the block signature the response matched (scraper/blocks.py)
    # Only with keep_bodies: the body (base64) and response headers, for WARC export.
    body: str | None = None
    headers: list[tuple[str, str]] | None = None


class RunQueued(_Message):
    kind: Literal["run_queued"] = "run_queued"
    run_id: str
    site: str
    region: str
    trigger: str = "manual"
    tick: str | None = None
    queued_at: AwareDatetime
    # The Job as published, kept centrally (runs.job) so a lost job can be redelivered.
    job: Job | None = None
    code: CodeRef | None = None  # the job's pinned code bundle, recorded on the run

    @classmethod
    def for_job(cls, job: Job) -> RunQueued:
        """The queued record of a dispatched job, carrying the job itself."""
        return cls(
            run_id=job.run_id,
            site=job.site,
            region=job.region,
            trigger=job.trigger,
            tick=job.tick,
            queued_at=job.dispatched_at,
            job=job,
            code=job.code,
        )


class ExitAttestation(BaseModel):
    """One exit a run used, as verified by its worker (scraper/verify.py)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    proxy: str  # the redacted proxy URL, or "direct" (the worker's own network)
    address: str | None = None  # the public address the echo service saw
    country: str | None = None  # what every geoip database agreed on
    verified: bool = False
    verified_at: AwareDatetime | None = None


class EgressAttestation(BaseModel):
    """Where a run's traffic left from. `verified`: every exit passed verification."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    verified: bool = False
    rotate: str = "per-run"
    exits: list[ExitAttestation] = []


class RunStarted(_Message):
    kind: Literal["run_started"] = "run_started"
    run_id: str
    site: str
    region: str
    worker: str
    started_at: AwareDatetime
    attempt: int = Field(1, ge=1, le=1_000_000)  # the Job's attempt, echoed
    egress: EgressAttestation | None = None  # None: a worker from before attestation


class ItemBatch(_Message):
    kind: Literal["items"] = "items"
    run_id: str
    site: str
    region: str
    seq: Count
    observed_at: AwareDatetime
    items: list[ScrapedItem] = []
    fetches: list[Fetch] = []


class RunStats(BaseModel):
    model_config = ConfigDict(extra="ignore")
    pages: Count = 0
    items: Count = 0
    errors: Count = 0
    bytes: Count = 0
    duration: float = Field(0.0, ge=0)
    status_codes: dict[str, int] = {}
    peak_rss: Count = 0  # the crawl process's peak resident memory, bytes (0: unknown)
    dropped: Count = 0  # items a Scrapy project's pipeline dropped (DropItem)
    # The shared rate budget (scraper/ratelimit.py): seconds spent waiting for
    # it, pauses this run's 429/503 responses started, the highest 429 strike.
    rate_wait: float = Field(0.0, ge=0)
    rate_pauses: Count = 0
    rate_strikes: Count = 0


class RunProgress(_Message):
    kind: Literal["run_progress"] = "run_progress"
    run_id: str
    site: str
    region: str
    stats: RunStats
    # When the worker sent it: renews the run's lease (None from older workers).
    sent_at: AwareDatetime | None = None


class RunFinished(_Message):
    kind: Literal["run_finished"] = "run_finished"
    run_id: str
    site: str
    region: str
    status: FinalStatus
    finished_at: AwareDatetime
    stats: RunStats
    error: str | None = None


class ExitReport(BaseModel):
    """The verification state of one exit of a worker, for `geoscrape status`."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    proxy: str  # redacted proxy URL or "direct"
    address: str | None = None
    countries: dict[str, str | None] = {}  # geoip database file name -> country (None: unknown)
    verified: bool = False
    since: AwareDatetime | None = None  # when `verified` last changed
    reason: str | None = None  # why not verified
    latency: float | None = None  # seconds the last verification took


class RunReleased(_Message):
    """A worker stopping mid-crawl hands its run back (a second SIGINT/SIGTERM).

    Ingest moves the run from `running` back to `queued`, if this worker still
    holds it, and republishes its job to the region's queue under the same run
    id and attempt (a graceful hand-back is not a failed attempt). Items sent
    before stay: the next attempt rewrites nothing (same run id).
    """

    kind: Literal["run_released"] = "run_released"
    run_id: str
    site: str
    region: str
    worker: str
    released_at: AwareDatetime
    reason: str = "worker stopping"


class WorkerHeartbeat(_Message):
    """A regional worker saying it is alive (about every 10 s), and once more on shutdown."""

    kind: Literal["worker_heartbeat"] = "worker_heartbeat"
    name: str  # region@host:pid, unique per worker process
    region: str
    host: str
    pid: int = Field(ge=0)
    egress: str | None = None  # local address of the worker's route to the broker
    exits: list[ExitReport] | None = None  # verified egress exits (None: direct, unverified)
    started_at: AwareDatetime
    sent_at: AwareDatetime
    stopping: bool = False  # the last heartbeat of a worker shutting down


IngestMessage = Annotated[
    RunQueued | RunStarted | ItemBatch | RunProgress | RunFinished | RunReleased | WorkerHeartbeat,
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


def stored_job(body: Any) -> Job | None:
    """A job kept in the store (runs.job, dead_jobs.job) as a Job; None when it
    does not validate (a job from an older schema): readers treat it as unknown."""
    try:
        return Job.model_validate(body)
    except ValidationError:
        return None


def dump(message: BaseModel) -> dict[str, Any]:
    """A message as a JSON-ready dict."""
    return message.model_dump(mode="json")


def verdict(
    run_id: str,
    site: str,
    region: str,
    status: FinalStatus,
    error: str | None,
    stats: RunStats | None = None,
    at: datetime | None = None,
) -> RunFinished:
    """A run's final verdict given by someone other than its crawl (the beat's
    `skipped`, ingest's `expired`/`dead`, a cancel): no stats unless given."""
    return RunFinished(
        run_id=run_id,
        site=site,
        region=region,
        status=status,
        finished_at=at or utcnow(),
        stats=stats or RunStats(),
        error=error,
    )


def expired_run(job: Job, at: datetime | None = None) -> RunFinished:
    """The verdict on a job nobody started before its deadline."""
    deadline = (
        job.expires_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        if job.expires_at
        else "its deadline"
    )
    error = f"expired: no worker in region {job.region!r} started it before {deadline}"
    return verdict(job.run_id, job.site, job.region, "expired", error, at=at)


def cancelled_run(
    run_id: str,
    site: str,
    region: str,
    reason: str,
    stats: RunStats | None = None,
    at: datetime | None = None,
) -> RunFinished:
    """The verdict on a cancelled run, from the CLI or from the worker that dropped
    or aborted its job (`stats`: what the crawl did before it was aborted)."""
    return verdict(run_id, site, region, "cancelled", f"cancelled: {reason}", stats, at)
