"""Evidence of what a run fetched: its bodies as WARC (its fetches with digests:
storage.runinfo.run_fetches).

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

from sqlalchemy import select
from sqlalchemy.orm import Session
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from storage.errors import NotFoundError, QueryError
from storage.models import bodies, runs

DROPPED_HEADERS = frozenset({"content-encoding", "transfer-encoding", "content-length"})


def _run(session: Session, run_id: str) -> tuple[str, str]:
    found = session.execute(select(runs.c.site, runs.c.region).where(runs.c.id == run_id)).first()
    if found is None:
        raise NotFoundError(f"no run {run_id!r} in the store")
    return found.site, found.region


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
