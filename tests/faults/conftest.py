"""Fixtures of the fault-injection suite: private services, the test shop, the ledger.

`pytest tests/faults --report` also writes the table of docs/RELIABILITY.md
from this run's figures (between its `fault-table` markers).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from geoscrape.testsite import Catalog, ShopServer, serve
from tests.faults.services import PgCluster, RabbitNode, ServiceError

RELIABILITY = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"
START, END = "<!-- fault-table:start -->", "<!-- fault-table:end -->"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--report",
        action="store_true",
        default=False,
        help="write the fault table of docs/RELIABILITY.md from this run",
    )


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitNode]:
    """A RabbitMQ node of our own, which the tests may stop and restart at will."""
    node = RabbitNode()
    try:
        node.start()
    except ServiceError as exc:
        node.destroy()
        pytest.fail(str(exc))
    try:
        yield node
    finally:
        node.destroy()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of our own, which the tests may stop at will."""
    try:
        cluster = PgCluster()
        cluster.init()
        cluster.start()
    except ServiceError as exc:
        pytest.fail(str(exc))
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def shop() -> Iterator[ShopServer]:
    """A shop of a few hundred pages with known content (150 products)."""
    with serve(catalog=Catalog(products=150)) as server:
        yield server


@dataclass
class FaultRow:
    fault: str
    trials: int = 0
    expected: int = 0
    lost: int = 0
    duplicated: int = 0
    recovery: list[float] = field(default_factory=list)
    redelivery: list[float] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"| {self.fault} | {self.trials} | {self.expected} | {self.lost} | "
            f"{self.duplicated} | {_median(self.redelivery)} | {_median(self.recovery)} |"
        )


def _median(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    return f"{statistics.median(seconds):.1f} s (max {max(seconds):.1f} s)"


class Ledger:
    """What each fault test measured, for the report."""

    def __init__(self) -> None:
        self.rows: dict[str, FaultRow] = {}

    def trial(
        self,
        fault: str,
        *,
        expected: int,
        lost: int,
        duplicated: int,
        recovery: float | None,
        redelivery: float | None = None,
    ) -> None:
        row = self.rows.setdefault(fault, FaultRow(fault))
        if redelivery is not None:  # the job ran again elsewhere this long after the fault
            row.redelivery.append(redelivery)
        row.trials += 1
        row.expected += expected
        row.lost += lost
        row.duplicated += duplicated
        if recovery is not None:  # None: nothing to recover from (shown as "-")
            row.recovery.append(recovery)

    def table(self) -> str:
        head = (
            "| fault | trials | items expected | lost | duplicated | redelivered after (median) "
            "| recovery time (median) |\n"
            "|---|---|---|---|---|---|---|"
        )
        return "\n".join([head, *(row.line() for row in self.rows.values())])


@pytest.fixture(scope="session")
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    book = Ledger()
    yield book
    print("\n" + book.table())
    if request.config.getoption("--report", default=False) and book.rows:
        write_report(book)


def write_report(book: Ledger) -> None:
    text = RELIABILITY.read_text()
    if START not in text or END not in text:
        raise RuntimeError(f"{RELIABILITY} lacks the {START} ... {END} markers")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"{START}\n_Last run: {stamp}, `pytest tests/faults --report`._\n\n{book.table()}\n{END}"
    )
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    RELIABILITY.write_text(before + block + after)
