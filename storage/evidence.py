"""Evidence of what a run fetched: its fetches with digests, and its bodies as WARC.

    rows = run_fetches(session, run_id)                  # `geoscrape fetches RUN`
    n = write_warc(session, site, run_id, "run.warc.gz")  # `export --kind warc --run RUN`

A WARC holds one ``response`` record per kept body (sites with
``keep_bodies: true``): WARC-Target-URI is the URL asked for, the HTTP
headers are those received (less Content-Encoding/Transfer-Encoding, since
the body is stored decoded), and ``WARC-Geoscrape-SHA256`` repeats the
fetch's digest so a reader can check the body against the store.
"""

from __future__ import annotations

import http
import os
from io import BytesIO
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Integer, literal, select, union_all
from sqlalchemy.orm import Session
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from storage.errors import NotFoundError, QueryError
from storage.models import bodies, fetch_samples, fetches, runs

DROPPED_HEADERS = frozenset({"content-encoding", "transfer-encoding", "content-length"})


class FetchRow(BaseModel):
    model_config = ConfigDict(frozen=True)
    url: str
    sample: int
    status: int | None
    bytes: int
    sha256: str | None
    block: str | None
    final_url: str | None
    error: str | None


def _run(session: Session, run_id: str) -> tuple[str, str]:
    found = session.execute(select(runs.c.site, runs.c.region).where(runs.c.id == run_id)).first()
    if found is None:
        raise NotFoundError(f"no run {run_id!r} in the store")
    return found.site, found.region


def run_fetches(session: Session, run_id: str) -> list[FetchRow]:
    """Every fetch of the run, each sample's, in the order they were stored."""
    _run(session, run_id)
    cols = ("url", "status", "bytes", "sha256", "block", "final_url", "error")
    first = select(
        *(fetches.c[c] for c in cols),
        fetches.c.id.label("n"),
        literal(0, Integer).label("sample"),
    ).where(fetches.c.run_id == run_id)
    more = select(
        *(fetch_samples.c[c] for c in cols),
        fetch_samples.c.id.label("n"),
        fetch_samples.c.sample,
    ).where(fetch_samples.c.run_id == run_id)
    both = union_all(first, more).subquery()
    stmt = select(both).order_by(both.c.sample, both.c.n)
    return [
        FetchRow(
            url=r.url,
            sample=r.sample,
            status=r.status,
            bytes=r.bytes,
            sha256=r.sha256,
            block=r.block,
            final_url=r.final_url,
            error=r.error,
        )
        for r in session.execute(stmt)
    ]


def _status_line(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def write_warc(session: Session, site: str, run_id: str, path: Path | str) -> int:
    """Write the run's kept responses to ``path`` as gzipped WARC (atomically)."""
    run_site, region = _run(session, run_id)
    if run_site != site:
        raise NotFoundError(f"run {run_id!r} is a run of {run_site!r}, not of {site!r}")
    stmt = select(bodies).where(bodies.c.run_id == run_id).order_by(bodies.c.sample, bodies.c.id)
    rows = session.execute(stmt).all()
    if not rows:
        raise QueryError(
            f"run {run_id!r} kept no response bodies (set keep_bodies: true on site {site!r})"
        )
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as fh:
            writer = WARCWriter(fh, gzip=True)
            for row in rows:
                headers = [(k, v) for k, v in row.headers if k.lower() not in DROPPED_HEADERS]
                headers.append(("Content-Length", str(len(row.body))))
                extra = {
                    "WARC-Date": row.fetched_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "WARC-Geoscrape-Run": run_id,
                    "WARC-Geoscrape-Region": region,
                    "WARC-Geoscrape-Sample": str(row.sample),
                    "WARC-Geoscrape-SHA256": row.sha256,
                }
                if row.final_url:
                    extra["WARC-Geoscrape-Final-URI"] = row.final_url
                record = writer.create_warc_record(
                    row.url,
                    "response",
                    payload=BytesIO(row.body),
                    warc_headers_dict=extra,
                    http_headers=StatusAndHeaders(
                        _status_line(row.status), headers, protocol="HTTP/1.1"
                    ),
                )
                writer.write_record(record)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return len(rows)
