"""Cross-region compare: one row per item key, one value per region per field.

    result = compare(session, "shop")                 # each region's latest succeeded run
    result = compare(session, "shop", tick="t1")      # the runs of one tick
    for row in Comparison(session, "shop").rows():    # streaming, for exports

Each field of each key gets a verdict (``verdicts``), from the value *sets*
of the regions: a region's set holds its run's value and, with
``compare: {samples: N}``, the values its extra samples saw (item_samples):

- ``differs``: two regions' sets do not overlap (numbers: their ranges, each
  widened by ``compare.tolerance``, do not touch), so the difference between
  regions is larger than the spread inside each;
- ``noisy``: the sets overlap, but some region saw more than one value (an A/B
  test or personalisation, not geography);
- ``missing``: the sets agree, but some region did not observe the key;
- ``same``: every region saw the one same value.

``differs`` (the fields whose verdict is differs) and ``missing`` (regions
that did not observe the key; for the summary: or whose value is null) keep
their meaning from one-sample compares. Numeric fields (declared
``price``/``int``/``float`` in the site's config snapshot, else every value a
number) get a spread: min, max and max/min.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterator, Sequence
from datetime import datetime
from itertools import groupby
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from regions.site import CompareSettings, Tolerance
from storage.access import fetch_outcomes, identical
from storage.errors import QueryError
from storage.models import contents, item_samples
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


Verdict = Literal["same", "differs", "noisy", "missing"]
VERDICTS: tuple[Verdict, ...] = ("same", "differs", "noisy", "missing")


class CompareRow(_Model):
    key: str
    values: dict[str, dict[str, Any]]  # field -> region -> value (None: missing)
    differs: list[str]  # fields whose values differ between the regions that have the key
    missing: list[str]  # regions that did not observe the key
    spread: dict[str, Spread] = {}  # numeric fields with at least one value, one unit
    # Numeric fields whose regions quote different currencies: one spread per currency.
    spread_by_currency: dict[str, list[Spread]] = {}
    verdicts: dict[str, Verdict] = {}  # field -> same | differs | noisy | missing
    noisy: list[str] = []  # fields that vary inside at least one region
    # With samples > 1: field -> region -> every distinct value its samples saw.
    samples: dict[str, dict[str, list[Any]]] = {}


def flat_cells(
    row: CompareRow,
    fields: Sequence[str],
    regions: Sequence[str],
    ranged: Container[str] | None = None,
) -> dict[str, Any]:
    """A compare row's cells as flat columns, per field: FIELD.REGION for each
    region, FIELD.min/.max/.ratio, FIELD.verdict (`compare --format csv` and
    `export --kind compare`). `ranged`: the fields that always get min/max/ratio
    (empty when the row has no spread); None: the fields this row has a spread of."""
    flat: dict[str, Any] = {}
    for field in fields:
        for region in regions:
            flat[f"{field}.{region}"] = row.values[field][region]
        spread = row.spread.get(field)
        if field in ranged if ranged is not None else spread is not None:
            flat[f"{field}.min"] = spread.min if spread else None
            flat[f"{field}.max"] = spread.max if spread else None
            flat[f"{field}.ratio"] = spread.ratio if spread else None
        flat[f"{field}.verdict"] = row.verdicts.get(field)
    return flat


def compare_record(
    row: CompareRow,
    fields: Sequence[str],
    regions: Sequence[str],
    ranged: Container[str] | None = None,
) -> dict[str, Any]:
    """A compare row as one flat record: its key, which regions miss it, which
    fields differ or are noisy, then flat_cells. The one flattening of
    `compare --format csv` and `export --kind compare`."""
    return {
        "key": row.key,
        "missing": ",".join(row.missing),
        "differs": ",".join(row.differs),
        "noisy": ",".join(row.noisy),
        **flat_cells(row, fields, regions, ranged),
    }


class FieldSummary(_Model):
    field: str
    type: str  # declared type, or "number"/"str" when inferred
    numeric: bool
    differing: int  # keys whose value differs between regions
    missing: dict[str, int]  # region -> keys missing there (not observed, or null)
    counts: dict[str, int] = {}  # verdict -> keys (same, differs, noisy, missing)


class CompareRun(_Model):
    region: str
    run_id: str | None
    status: str | None
    tick: str | None
    finished_at: datetime | None = None
    verified: bool = False  # the run's egress passed verification (scraper/verify.py)
    egress: dict[str, Any] | None = None  # regions.messages.EgressAttestation


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
    verified_only: bool = False  # runs with unverified egress were left out
    unverified: list[str] = []  # regions whose rows come from runs with unverified egress
    # Every region's run got byte-identical pages (equal sha256 for every URL): then
    # nothing can differ. None when a run has no digests (stored before issue 14).
    identical: bool | None = None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _distinct(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def _slack(low: float, high: float, tol: Tolerance) -> float:
    return tol.absolute + tol.relative * max(abs(low), abs(high))


def _same_values(values: list[Any], tol: Tolerance) -> bool:
    """One value, or numbers all within the tolerance of each other."""
    if len(values) <= 1:
        return True
    if all(_is_number(v) for v in values):
        return max(values) - min(values) <= _slack(min(values), max(values), tol)
    return False


def _overlap(a: list[Any], b: list[Any], tol: Tolerance) -> bool:
    """Whether two regions' value sets could be the same distribution."""
    if a and b and all(_is_number(v) for v in [*a, *b]):
        gap = max(min(a), min(b)) - min(max(a), max(b))  # > 0: the ranges are apart
        return gap <= _slack(min(*a, *b), max(*a, *b), tol)
    return any(v in b for v in a)


def _verdict(sets: dict[str, list[Any]], tol: Tolerance, missing: bool) -> Verdict:
    regions = list(sets)
    for i, first in enumerate(regions):
        for second in regions[i + 1 :]:
            if not _overlap(sets[first], sets[second], tol):
                return "differs"
    if any(not _same_values(values, tol) for values in sets.values()):
        return "noisy"
    return "missing" if missing else "same"


def extra_samples(session: Session, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """key -> the data of each extra sample (1..) of ``run_id``."""
    stmt = (
        select(item_samples.c.key, contents.c.data)
        .join(contents, contents.c.hash == item_samples.c.content_hash)
        .where(item_samples.c.run_id == run_id)
        .order_by(item_samples.c.sample)
    )
    found: dict[str, list[dict[str, Any]]] = {}
    for key, data in session.execute(stmt):
        found.setdefault(key, []).append(data)
    return found


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
        verified_only: bool = False,
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
            {
                r: ref
                for r, ref in tick_runs(session, site, tick).items()
                if r in all_regions and (ref.verified or not verified_only)
            }
            if tick is not None
            else latest_succeeded(session, site, all_regions, verified_only=verified_only)
        )
        self.unverified = sorted(r for r, ref in self.runs.items() if not ref.verified)
        self.regions = sorted(set(all_regions) | set(self.runs))
        config = site_config(session, site)
        declared, key_field = declared_fields(config)
        self.declared = declared
        self.settings = config.compare if config is not None else CompareSettings()
        self._extra = {region: extra_samples(session, ref.id) for region, ref in self.runs.items()}
        if fields:
            check_fields(site, fields, list(declared) if declared else self._observed_fields())
            self.fields = list(dict.fromkeys(fields))
        elif declared:
            self.fields = [f for f in declared if f != key_field]
        else:
            self.fields = self._observed_fields()
        self._numeric_seen = dict.fromkeys(self.fields, True)
        self._any_value = dict.fromkeys(self.fields, False)
        self._differing = dict.fromkeys(self.fields, 0)
        self._counts = {f: dict.fromkeys(VERDICTS, 0) for f in self.fields}
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
        noisy: list[str] = []
        verdicts: dict[str, Verdict] = {}
        sampled: dict[str, dict[str, list[Any]]] = {}
        spread: dict[str, Spread] = {}
        missing = [r for r in self.regions if r not in seen]
        extra = {r: self._extra.get(r, {}).get(key, []) for r in seen}
        by_currency: dict[str, list[Spread]] = {}
        currencies = {r: seen[r].get(CURRENCY_FIELD) for r in self.regions if r in seen}
        for field in self.fields:
            per_region = {r: (seen[r].get(field) if r in seen else None) for r in self.regions}
            values[field] = per_region
            sets = {
                r: _distinct([seen[r].get(field), *(d.get(field) for d in extra[r])])
                for r in sorted(seen)
            }
            if any(extra.values()):
                sampled[field] = sets
            verdict = _verdict(sets, self.settings.tolerance, bool(missing))
            verdicts[field] = verdict
            if verdict == "differs":
                differs.append(field)
            if any(not _same_values(vs, self.settings.tolerance) for vs in sets.values()):
                noisy.append(field)
            present = [seen[r].get(field) for r in self.regions if r in seen]
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
        return CompareRow(
            key=key,
            values=values,
            differs=differs,
            missing=missing,
            spread=spread,
            verdicts=verdicts,
            noisy=noisy,
            samples=sampled,
            spread_by_currency=by_currency,
        )

    def _count(self, row: CompareRow) -> None:
        self.total += 1
        for field in self.fields:
            if field in row.differs:
                self._differing[field] += 1
            self._counts[field][row.verdicts[field]] += 1
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
                counts=self._counts[f],
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
                    verified=ref.verified if ref else False,
                    egress=ref.egress if ref else None,
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
    verified_only: bool = False,
) -> CompareResult:
    """The whole compare (summary over every row); ``limit``/``offset`` page the rows.

    `verified_only` leaves out runs whose egress was not verified.
    """
    cmp = Comparison(
        session, site, fields=fields, tick=tick, only_diff=only_diff, verified_only=verified_only
    )
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
        verified_only=verified_only,
        unverified=cmp.unverified,
        identical=identical({r: fetch_outcomes(session, ref.id) for r, ref in cmp.runs.items()}),
    )
