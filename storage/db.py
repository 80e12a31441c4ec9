"""Database URLs, engines and sessions (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from regions.settings import settings
from storage.errors import UnsupportedDatabaseError

SUPPORTED_BACKENDS = frozenset({"sqlite", "postgresql"})

# How long a SQLite connection waits for another writer's lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str) -> str:
    """Pick the psycopg (v3) driver for bare ``postgresql://`` / ``postgres://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def store_home() -> Path:
    """Where relative SQLite paths point: ``GEOSCRAPE_HOME``, else the directory of
    the sites file (``GEOSCRAPE_CONFIG``), else the current directory."""
    env = settings()
    if env.home is not None:
        return env.home.expanduser().resolve()
    if env.config is not None:
        return env.config.expanduser().resolve().parent
    return Path.cwd()


def absolute_sqlite(url: str, home: Path | None = None) -> str:
    """``url`` with a relative SQLite path made absolute against `home` (store_home()).

    So every command finds the same store whatever directory it runs from,
    and messages name the file for real.
    """
    if not url.startswith("sqlite:///") or url.startswith("sqlite:////"):
        return url
    rest = url[len("sqlite:///") :]
    path, sep, query = rest.partition("?")
    if not path or path == ":memory:" or path.startswith("file:"):
        return url
    return f"sqlite:///{(home or store_home()) / path}{sep}{query}"


def database_url() -> str:
    """The store's URL: ``GEOSCRAPE_DATABASE_URL``, else ``sqlite:///geoscrape.db``;
    a relative SQLite path is resolved against store_home()."""
    url = settings().database_url
    return absolute_sqlite(normalize_url(url))


def backend_name(url: str) -> str:
    """``sqlite`` or ``postgresql``; anything else raises UnsupportedDatabaseError."""
    try:
        backend = make_url(normalize_url(url)).get_backend_name()
    except Exception as exc:  # sqlalchemy.exc.ArgumentError on a malformed URL
        raise UnsupportedDatabaseError(f"not a database URL: {url!r} ({exc})") from exc
    if backend not in SUPPORTED_BACKENDS:
        raise UnsupportedDatabaseError(
            f"unsupported database {backend!r} in {url!r}: use sqlite:/// or postgresql://"
        )
    return backend


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL itself needs a lock.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url`` (default: database_url()) with geoscrape's settings.

    SQLite: WAL journal (readers never block the ingest writer), a busy
    timeout instead of immediate "database is locked", foreign keys enforced.
    PostgreSQL: pool_pre_ping, so a restarted server costs one failed ping,
    not one failed transaction per pooled connection.
    """
    from sqlalchemy import create_engine

    url = normalize_url(url or database_url())
    backend = backend_name(url)
    if backend == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)
