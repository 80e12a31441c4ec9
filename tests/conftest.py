"""Session-wide real services, isolated per test session.

Each session gets its own RabbitMQ vhost and PostgreSQL database, removed at
the end. A missing service fails the session loudly: it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Test tooling (tests/spiders.py, tests/hostilesite.py) is in the `tests` package,
# which no install ships: the processes a test starts (workers, their crawl
# children, from any cwd) find it through the repository root on PYTHONPATH.
_ROOT = str(Path(__file__).resolve().parents[1])
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join(_paths if _ROOT in _paths else [*_paths, _ROOT])

# Every `geoscrape` a test starts prints its tables this wide, whatever terminal
# (or none, or an xdist worker) the suite runs under: a narrower one cuts cells.
os.environ["COLUMNS"] = "250"

PG_ADMIN_DSN = os.environ.get(
    "GEOSCRAPE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_HOST = os.environ.get("GEOSCRAPE_TEST_AMQP_HOST", "guest:guest@127.0.0.1:5672")


def _rabbitmqctl(*args: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl not found: the tests need a local RabbitMQ (see README)")
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(
            f"rabbitmqctl {' '.join(args)} failed (is RabbitMQ running? "
            f"start it with 'rabbitmq-server -detached'):\n{done.stdout}{done.stderr}"
        )


@pytest.fixture(scope="session")
def session_id() -> str:
    return uuid.uuid4().hex[:10]


@contextmanager
def fresh_vhost(name: str) -> Iterator[str]:
    """A RabbitMQ vhost that exists only inside the block; yields its AMQP URL."""
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://{AMQP_HOST}/{name}"
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="session")
def broker_url(session_id: str) -> Iterator[str]:
    """A fresh RabbitMQ vhost for this test session, deleted afterwards."""
    with fresh_vhost(f"geoscrape-test-{session_id}") as url:
        yield url


def _erlang_binaries(names: list[str]) -> str:
    return "[" + ", ".join(f'<<"{n}">>' for n in names) + "]"


class VhostPool:
    """Fresh vhosts for single tests, made and deleted a batch at a time.

    Each `rabbitmqctl` call boots an Erlang VM (about 0.6 s of CPU); three per
    test were some 90 s of the suite's CPU. One `eval` adds a batch (vhost and
    guest's permissions, synchronously); used vhosts are deleted a batch at a
    time (one a test deleted itself is no error) and the rest when the
    session ends.
    """

    BATCH = 6

    def __init__(self) -> None:
        self.fresh: list[str] = []
        self.used: list[str] = []

    def take(self) -> str:
        if not self.fresh:
            names = [f"geoscrape-test-{uuid.uuid4().hex[:10]}" for _ in range(self.BATCH)]
            perms = '<<".*">>, <<".*">>, <<".*">>'
            _rabbitmqctl(
                "eval",
                'lists:foreach(fun(V) -> ok = rabbit_vhost:add(V, <<"tests">>), '
                f'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, {perms}, '
                f'<<"tests">>) end, {_erlang_binaries(names)}).',
            )
            self.fresh = names
        return self.fresh.pop()

    def release(self, name: str) -> None:
        self.used.append(name)
        if len(self.used) >= self.BATCH:
            self.delete(self.used)
            self.used = []

    @staticmethod
    def delete(names: list[str]) -> None:
        if names:
            _rabbitmqctl(
                "eval",
                'lists:foreach(fun(V) -> catch rabbit_vhost:delete(V, <<"tests">>) end, '
                f"{_erlang_binaries(names)}).",
            )


@pytest.fixture(scope="session")
def vhost_pool() -> Iterator[VhostPool]:
    pool = VhostPool()
    try:
        yield pool
    finally:
        pool.delete(pool.used + pool.fresh)


@pytest.fixture
def vhost_url(vhost_pool: VhostPool) -> Iterator[str]:
    """A fresh RabbitMQ vhost for one test: its queues start empty, and it is
    deleted with the next batch (see VhostPool)."""
    name = vhost_pool.take()
    try:
        yield f"amqp://{AMQP_HOST}/{name}"
    finally:
        vhost_pool.release(name)


@pytest.fixture(scope="session")
def pg_url(session_id: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    import psycopg

    name = f"geoscrape_test_{session_id}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_DSN}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    return f"sqlite:///{tmp_path}/geoscrape.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[str]:
    """Each store-level test runs on SQLite and on PostgreSQL.

    The PostgreSQL variant gets a schema-fresh database per test by creating
    one from the session's database name plus a counter.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/geoscrape.db"
        return
    import psycopg

    session = request.getfixturevalue("pg_url")
    name = f"{session.rsplit('/', 1)[1]}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{session.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A key prefix of one's own in the shared Redis (also exported as
    GEOSCRAPE_REDIS_PREFIX to the processes a test starts); its keys are deleted after."""
    import redis

    url = os.environ.get("GEOSCRAPE_REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {url}: {exc} (start redis-server)")
    prefix = f"geoscrape-test-{uuid.uuid4().hex[:10]}:"
    monkeypatch.setenv("GEOSCRAPE_REDIS_PREFIX", prefix)
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
