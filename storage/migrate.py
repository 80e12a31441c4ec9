"""Schema migrations (Alembic, configured in code: no alembic.ini needed).

    ensure_schema(url)      # upgrade to head; call it at every start
    upgrade(url, "0001")    # a given revision
    downgrade(url, "base")  # back down (drops the tables at base)
    current_revision(url)   # None on an empty database

The migration scripts live in storage/migrations inside the installed package.
Upgrades take a lock first (PostgreSQL advisory lock, SQLite write lock), so
two processes starting at once do not both try to create the schema: the
second waits, then finds the schema at head and does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, text

from storage.db import make_engine, normalize_url
from storage.errors import SchemaError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# pg_advisory_xact_lock key serialising schema upgrades ("geoscrap" as int64).
_PG_MIGRATION_LOCK = 0x67656F7363726170


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal '%' (e.g. in a password) is '%%'.
        cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision this version of geoscrape knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise SchemaError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def _current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def current_revision(url: str) -> str | None:
    """The database's Alembic revision, or None if it has no schema yet."""
    engine = make_engine(url)
    try:
        return _current(engine)
    finally:
        engine.dispose()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that holds the migration lock.

    The whole upgrade runs in this one transaction (both backends have
    transactional DDL), committed at the end; the lock goes with it.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        else:
            # Take SQLite's write lock now (waiting up to busy_timeout), not at the first DDL.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn
        conn.commit()


def _run(url: str, action: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        with _migration_lock(engine) as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            getattr(command, action)(cfg, revision)
    except (CommandError, RevisionError) as exc:
        raise SchemaError(f"cannot {action} the database schema to {revision!r}: {exc}") from exc
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest)."""
    _run(url, "upgrade", revision)


def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` ("base": drop everything)."""
    _run(url, "downgrade", revision)


def ensure_schema(url: str) -> str:
    """Bring the schema to head (a no-op when it is there already); returns the revision.

    Safe to call at every start, and from several processes at once. A
    database migrated by a newer geoscrape (unknown revision) raises
    SchemaError rather than being touched.
    """
    head = head_revision()
    engine = make_engine(url)
    try:
        current = _current(engine)
    finally:
        engine.dispose()
    if current == head:
        return head
    script = ScriptDirectory.from_config(alembic_config())
    if current is not None:
        try:
            script.get_revision(current)
        except (CommandError, RevisionError) as exc:
            raise SchemaError(
                f"the database is at schema revision {current!r}, which this version of "
                f"geoscrape does not know (newest known: {head!r}); upgrade geoscrape"
            ) from exc
    upgrade(url, "head")
    return head
