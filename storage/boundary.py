"""The store's error boundary: database failures become StorageError, naming the store.

SQLAlchemy and driver errors (sqlite3, psycopg) never leave storage when a
front (CLI, API) opens the store through `open_store`: every error says which
store it is about (the URL, password redacted) and what kind of failure it is.

    StorageError
     ├─ StoreUnavailable   cannot connect, file or directory missing, not a database
     └─ SchemaMissing      reachable, but without geoscrape's tables (run `db upgrade`)

`guard_engine` maps the errors of every statement an engine runs (SQLAlchemy's
`handle_error` event); `map_db_errors` maps those of a block of code, for the
driver errors raised while connecting. Ingest does not use either: it retries
transient database errors itself (storage/ingest.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import Engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, normalize_url, session_factory
from storage.errors import StorageError


class StoreUnavailable(StorageError):
    """The store cannot be reached or read (connection refused, missing file, corrupt file)."""


class SchemaMissing(StorageError):
    """The store is there but holds no geoscrape schema."""


SCHEMA_HINT = "run 'geoscrape db upgrade' (or start 'geoscrape ingest') to create it"
_NO_TABLE = re.compile(r"no such table|undefinedtable|relation \S+ does not exist")


def store_name(url: str) -> str:
    """The store's URL for messages: password hidden."""
    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except Exception:  # a malformed URL: say it as given, minus nothing we could parse
        return url.split("@")[-1]


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return (lines[0] if lines else type(orig).__name__)[:300]


def translate(url: str, exc: BaseException) -> StorageError:
    """The StorageError that says what `exc` means for the store at `url`."""
    reason = _first_line(exc)
    if _NO_TABLE.search(f"{type(getattr(exc, 'orig', exc)).__name__} {reason}".lower()):
        return SchemaMissing(
            f"store {store_name(url)} has no geoscrape schema ({reason}): {SCHEMA_HINT}"
        )
    return StoreUnavailable(f"store {store_name(url)} is unavailable: {reason}")


def _driver_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    import psycopg

    return (sa_exc.SQLAlchemyError, sqlite3.Error, psycopg.Error)


@contextmanager
def map_db_errors(url: str) -> Iterator[None]:
    """Any database error inside the block becomes a StorageError naming the store."""
    try:
        yield
    except StorageError:
        raise
    except _driver_errors() as exc:
        raise translate(url, exc) from exc


def guard_engine(engine: Engine, url: str) -> Engine:
    """Make every statement `engine` runs raise StorageError instead of SQLAlchemy errors."""

    def on_error(context: Any) -> NoReturn:
        raise translate(url, context.sqlalchemy_exception or context.original_exception)

    event.listen(engine, "handle_error", on_error)
    return engine


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for PostgreSQL and in-memory SQLite)."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def check_sqlite_file(url: str) -> None:
    """StoreUnavailable if a SQLite store's file (or its directory) is missing.

    Reading a store must never create an empty one by accident (a relative
    path run from the wrong directory would otherwise look like an empty store).
    """
    path = sqlite_path(url)
    if path is None or path.is_file():
        return
    if not path.parent.is_dir():
        raise StoreUnavailable(
            f"store {store_name(url)} is unavailable: directory {path.parent} does not exist"
        )
    if path.exists():
        raise StoreUnavailable(f"store {store_name(url)} is unavailable: {path} is not a file")
    raise StoreUnavailable(f"store {store_name(url)} does not exist yet: {SCHEMA_HINT}")


def open_store(url: str) -> sessionmaker[Session]:
    """Sessions on an existing store, its schema brought up to date, errors mapped.

    A missing SQLite file or a database without geoscrape's tables is an
    error, not a new empty store.
    """
    from storage.migrate import current_revision, ensure_schema

    check_sqlite_file(url)
    with map_db_errors(url):
        if current_revision(url) is None:
            raise SchemaMissing(f"store {store_name(url)} has no geoscrape schema: {SCHEMA_HINT}")
        ensure_schema(url)  # an older schema is upgraded, as ingest would
        return session_factory(guard_engine(make_engine(url), url))


def probe(url: str) -> None:
    """Connect once and run a trivial query; StorageError if the store is unusable."""
    from sqlalchemy import text

    check_sqlite_file(url)
    engine = guard_engine(make_engine(url), url)
    try:
        with map_db_errors(url), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
