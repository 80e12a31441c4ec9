"""Cross-region compare: one row per item key, one value per region per field.

    result = compare(session, "shop")                 # each region's latest succeeded run
    result = compare(session, "shop", tick="t1")      # the runs of one tick
    for row in Comparison(session, "shop").rows():    # streaming, for exports

A field *differs* for a key when the regions that have the key disagree on
its value; a region is *missing* a key it did not observe (for the summary: or
whose value is null). Numeric fields (declared ``price``/``int``/``float`` in
the site's config snapshot, else every value a number) get a spread: min, max
and max/min.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from datetime import datetime
from itertools import groupby
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from storage.errors import QueryError
from storage.snapshots import (
    RunRef,
    declared_fields,
    latest_succeeded,
    site_config,
    site_regions,
    stream_snapshot,
    tick_runs,
)
from storage.validate import check_fields

NUMERIC_TYPES = frozenset({"price", "int", "float"})


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Spread(_Model):
    min: float
    max: float
    ratio: float | None  # max/min; None when min <= 0
    currency: str | None = None  # the unit of these values (an item's `currency` field)


# An item's field of this name gives the unit of its price fields: spreads are
# computed only between regions that quote the same currency.
CURRENCY_FIELD = "currency"


def spreads_of(
    values: dict[str, Any], currencies: dict[str, Any]
) -> tuple[Spread | None, list[Spread]]:
    """(spread over every region, []) when all regions share a unit (or none is
    known); else (None, one spread per currency, sorted by currency)."""
    groups: dict[str | None, list[float]] = {}
    for region, value in values.items():
        unit = currencies.get(region)
        groups.setdefault(unit if isinstance(unit, str) else None, []).append(value)

    def spread(numbers: list[float], unit: str | None) -> Spread:
        low, high = min(numbers), max(numbers)
        return Spread(min=low, max=high, ratio=round(high / low, 6) if low > 0 else None,
                      currency=unit)  # fmt: skip

    if len(groups) <= 1:
        [(unit, numbers)] = groups.items() or [(None, [])]
        return (spread(numbers, unit) if numbers else None), []
    return None, [spread(groups[u], u) for u in sorted(groups, key=lambda u: u or "")]


class CompareRow(_Model):
    key: str
    values: dict[str, dict[str, Any]]  # field -> region -> value (None: missing)
    differs: list[str]  # fields whose values differ between the regions that have the key
    missing: list[str]  # regions that did not observe the key
    spread: dict[str, Spread] = {}  # numeric fields with at least one value, one unit
    # Numeric fields whose regions quote different currencies: one spread per currency.
    spread_by_currency: dict[str, list[Spread]] = {}


class FieldSummary(_Model):
    field: str
    type: str  # declared type, or "number"/"str" when inferred
    numeric: bool
    differing: int  # keys whose value differs between regions
    missing: dict[str, int]  # region -> keys missing there (not observed, or null)


class CompareRun(_Model):
    region: str
    run_id: str | None
    status: str | None
    tick: str | None
    finished_at: datetime | None = None


class CompareResult(_Model):
    site: str
    mode: str  # "latest" or "tick"
    tick: str | None
    regions: list[str]
    fields: list[str]
    runs: list[CompareRun]
    summary: list[FieldSummary]
    total: int  # rows (after only_diff)
    offset: int = 0
    rows: list[CompareRow]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Comparison:
    """A compare of one site, streamed row by row (rows come by key, code-point order)."""

    def __init__(
        self,
        session: Session,
        site: str,
        fields: Sequence[str] | None = None,
        tick: str | None = None,
        only_diff: bool = False,
        regions: Sequence[str] | None = None,
    ) -> None:
        self.session = session
        self.site = site
        self.tick = tick
        self.only_diff = only_diff
        all_regions = site_regions(session, site)
        if regions:
            unknown = [r for r in regions if r not in all_regions]
            if unknown:
                raise QueryError(
                    f"site {site!r} has no runs in region(s) {', '.join(unknown)} "
                    f"(regions: {', '.join(all_regions)})"
                )
            all_regions = list(regions)
        self.runs: dict[str, RunRef] = (
            {r: ref for r, ref in tick_runs(session, site, tick).items() if r in all_regions}
            if tick is not None
            else latest_succeeded(session, site, all_regions)
        )
        self.regions = sorted(set(all_regions) | set(self.runs))
        declared, key_field = declared_fields(site_config(session, site))
        self.declared = declared
        if fields:
            check_fields(site, fields, list(declared))
            self.fields = list(dict.fromkeys(fields))
        elif declared:
            self.fields = [f for f in declared if f != key_field]
        else:
            self.fields = self._observed_fields()
        self._numeric_seen = dict.fromkeys(self.fields, True)
        self._any_value = dict.fromkeys(self.fields, False)
        self._differing = dict.fromkeys(self.fields, 0)
        self._missing = {f: dict.fromkeys(self.regions, 0) for f in self.fields}
        self.total = 0

    def _observed_fields(self) -> list[str]:
        names: dict[str, None] = {}
        for ref in self.runs.values():
            for _, _, data in stream_snapshot(self.session, ref.id):
                names.update(dict.fromkeys(data))
        return list(names)

    def is_numeric(self, field: str) -> bool:
        declared = self.declared.get(field)
        if declared is not None:
            return declared in NUMERIC_TYPES
        return self._numeric_seen[field] and self._any_value[field]

    def _keyed(self, region: str, run_id: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for key, _, data in stream_snapshot(self.session, run_id):
            yield key, region, data

    def rows(self) -> Iterator[CompareRow]:
        """Every row, merging the regions' key-ordered snapshots; updates the summary."""
        streams = [self._keyed(region, ref.id) for region, ref in sorted(self.runs.items())]
        for key, group in groupby(heapq.merge(*streams, key=lambda t: t[0]), key=lambda t: t[0]):
            seen = {region: data for _, region, data in group}
            row = self._row(key, seen)
            if self.only_diff and not (row.differs or row.missing):
                continue
            self._count(row)
            yield row

    def _row(self, key: str, seen: dict[str, dict[str, Any]]) -> CompareRow:
        values: dict[str, dict[str, Any]] = {}
        differs: list[str] = []
        spread: dict[str, Spread] = {}
        by_currency: dict[str, list[Spread]] = {}
        currencies = {r: seen[r].get(CURRENCY_FIELD) for r in self.regions if r in seen}
        for field in self.fields:
            per_region = {r: (seen[r].get(field) if r in seen else None) for r in self.regions}
            values[field] = per_region
            present = [seen[r].get(field) for r in self.regions if r in seen]
            if any(v != present[0] for v in present[1:]):
                differs.append(field)
            numbers = [v for v in present if v is not None]
            if numbers:
                self._any_value[field] = True
                if not all(_is_number(v) for v in numbers):
                    self._numeric_seen[field] = False
                elif self.declared.get(field, "number") in NUMERIC_TYPES | {"number"}:
                    present_values = {
                        r: seen[r].get(field)
                        for r in self.regions
                        if r in seen and seen[r].get(field) is not None
                    }
                    one, several = spreads_of(present_values, currencies)
                    if one is not None:
                        spread[field] = one
                    if several:
                        by_currency[field] = several
        missing = [r for r in self.regions if r not in seen]
        return CompareRow(
            key=key,
            values=values,
            differs=differs,
            missing=missing,
            spread=spread,
            spread_by_currency=by_currency,
        )

    def _count(self, row: CompareRow) -> None:
        self.total += 1
        for field in self.fields:
            if field in row.differs:
                self._differing[field] += 1
            for region, value in row.values[field].items():
                if value is None:
                    self._missing[field][region] += 1

    def summary(self) -> list[FieldSummary]:
        """Per field, over the rows produced so far (call after consuming rows())."""
        return [
            FieldSummary(
                field=f,
                type=self.declared.get(f) or ("number" if self.is_numeric(f) else "str"),
                numeric=self.is_numeric(f),
                differing=self._differing[f],
                missing=self._missing[f],
            )
            for f in self.fields
        ]

    def compare_runs(self) -> list[CompareRun]:
        out = []
        for region in self.regions:
            ref = self.runs.get(region)
            out.append(
                CompareRun(
                    region=region,
                    run_id=ref.id if ref else None,
                    status=ref.status if ref else None,
                    tick=ref.tick if ref else None,
                    finished_at=ref.finished_at if ref else None,
                )
            )
        return out


def compare(
    session: Session,
    site: str,
    fields: Sequence[str] | None = None,
    tick: str | None = None,
    only_diff: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> CompareResult:
    """The whole compare (summary over every row); ``limit``/``offset`` page the rows."""
    cmp = Comparison(session, site, fields=fields, tick=tick, only_diff=only_diff)
    rows: list[CompareRow] = []
    for i, row in enumerate(cmp.rows()):
        if i >= offset and (limit is None or len(rows) < limit):
            rows.append(row)
    return CompareResult(
        site=site,
        mode="tick" if tick is not None else "latest",
        tick=tick,
        regions=cmp.regions,
        fields=cmp.fields,
        runs=cmp.compare_runs(),
        summary=cmp.summary(),
        total=cmp.total,
        offset=offset,
        rows=rows,
    )
