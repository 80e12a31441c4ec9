"""The worker's publishing connection (regions.worker.publishing), on a real RabbitMQ.

A pool thread reuses it from crawl to crawl while it is fresh; a block that
raises, a connection idle too long, or one the broker dropped never costs a
message.
"""

from __future__ import annotations

import socket
import threading

import pytest

from regions import worker
from regions.bus import INGEST_QUEUE, connect, declare_topology, publish_ingest, queue_depth


@pytest.fixture
def url(vhost_url: str) -> str:
    with connect(vhost_url) as conn:
        declare_topology(conn, ["eu"])
    return vhost_url


@pytest.fixture(autouse=True)
def no_held_connection() -> None:
    worker._publisher.held = None


def waiting(url: str) -> int:
    with connect(url) as conn:
        depth = queue_depth(conn, INGEST_QUEUE.name)
    assert depth is not None
    return depth[0]


def test_a_pool_thread_reuses_its_connection(url: str) -> None:
    with worker.publishing(url) as first:
        publish_ingest(first, {"n": 1})
    with worker.publishing(url) as second:
        publish_ingest(second, {"n": 2})
    assert second is first
    seen: list[object] = []

    def other_thread() -> None:
        with worker.publishing(url) as conn:
            seen.append(conn)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen and seen[0] is not first  # each pool thread has its own
    assert waiting(url) == 2


def test_a_block_that_raises_closes_the_connection(url: str) -> None:
    with pytest.raises(RuntimeError), worker.publishing(url) as first:
        publish_ingest(first, {"n": 1})
        raise RuntimeError("the crawl failed")
    assert not first.connected  # closed, not left open
    with worker.publishing(url) as second:
        publish_ingest(second, {"n": 2})
    assert second is not first
    assert waiting(url) == 2


def test_an_idle_connection_is_replaced(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "PUBLISHER_IDLE_SECONDS", 0.0)
    with worker.publishing(url) as first:
        publish_ingest(first, {"n": 1})
    with worker.publishing(url) as second:
        publish_ingest(second, {"n": 2})
    assert second is not first
    assert waiting(url) == 2


def test_a_dropped_connection_loses_no_message(url: str) -> None:
    with worker.publishing(url) as first:
        publish_ingest(first, {"n": 1})
    first.connection.sock.shutdown(socket.SHUT_RDWR)  # the broker side went away meanwhile
    with worker.publishing(url) as second:
        publish_ingest(second, {"n": 2})
    assert waiting(url) == 2
