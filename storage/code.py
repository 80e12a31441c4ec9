"""Deployed code bundles in the store: written by `geoscrape deploy`, pinned at
dispatch, served to workers by the API (`GET /code/{sha256}`).

A bundle is identified by (sha256, name); deploying the same bytes again only
makes it the newest of its name again. Dispatch pins the newest bundle of a
name, so a job always names the exact bytes it runs.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from regions.messages import CodeRef, utcnow
from storage.errors import NotFoundError
from storage.models import CodeBundle


def save_bundle(session: Session, name: str, sha256: str, content: bytes) -> CodeRef:
    """Store a bundle (or re-date it) as the newest of `name`; the caller commits."""
    now = utcnow()
    existing = session.get(CodeBundle, (sha256, name))
    if existing is None:
        session.add(
            CodeBundle(
                sha256=sha256, name=name, size=len(content), content=content, deployed_at=now
            )
        )
    else:
        session.execute(
            update(CodeBundle)
            .where(CodeBundle.sha256 == sha256, CodeBundle.name == name)
            .values(deployed_at=now)
        )
    return CodeRef(name=name, sha256=sha256)


def latest_bundle(session: Session, name: str) -> CodeRef:
    """The newest bundle deployed as `name`; NotFoundError if none was."""
    row = session.execute(
        select(CodeBundle.sha256)
        .where(CodeBundle.name == name)
        .order_by(CodeBundle.deployed_at.desc())
        .limit(1)
    ).scalar_one_or_none()
    if row is None:
        raise NotFoundError(
            f"no code deployed as {name!r} (run: geoscrape deploy PROJECT_DIR --name {name})"
        )
    return CodeRef(name=name, sha256=row)


def bundle_content(session: Session, sha256: str) -> bytes:
    """The stored bytes of a bundle (as stored: the worker checks the hash)."""
    content = session.execute(
        select(CodeBundle.content).where(CodeBundle.sha256 == sha256).limit(1)
    ).scalar_one_or_none()
    if content is None:
        raise NotFoundError(f"no code bundle with sha256 {sha256}")
    return bytes(content)


def code_pinner(database_url: str) -> Callable[[str], CodeRef]:
    """`latest_bundle` for scheduler.dispatch.plan_jobs(pin_code=...); the store
    is opened (and its schema brought up to date) on the first call only."""
    from storage.db import make_engine, session_factory
    from storage.migrate import ensure_schema

    sessions: list[sessionmaker[Session]] = []

    def pin(name: str) -> CodeRef:
        if not sessions:
            ensure_schema(database_url)
            sessions.append(session_factory(make_engine(database_url)))
        with sessions[0]() as session:
            return latest_bundle(session, name)

    return pin
