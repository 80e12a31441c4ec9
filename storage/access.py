"""Access verdicts: did each region get the site, and if not, why?

Per site, per round of runs (a tick, or one `geoscrape crawl`), each region's
run gets one verdict from what it fetched:

- ``ok``: pages came back (2xx/3xx on the site), nothing refused or unreachable.
- ``geo-blocked``: every response refused (403/451, a block page the worker
  recognised by its signature, a captcha page, or a redirect off the site)
  while another region got the real page for the same URLs.
- ``bot-blocked``: every response was a recognised block page (signature) and
  no region got those URLs: bot protection, not geography.
- ``redirected``: every response was a redirect to another host (a country site)
  and no region got the real page either.
- ``blocked-everywhere``: every response refused without a known signature
  (403/451) and no region got those URLs.
- ``unreachable``: no HTTP response at all (network errors).
- ``partial``: some pages came back, others were refused or unreachable.
- ``pending``: the run has not finished and fetched nothing yet.

A verdict cites its cause in ``signature``: the block signature's name
(``geo-blocked (cloudflare-country-ban)``), or ``→ host`` for a redirect.
``label`` is the verdict with its cause. A round is ``identical`` when every
region got byte-identical pages (equal sha256 digests for every URL).

``classify`` is a pure function of the fetch outcomes; ``access`` reads them
from the store.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, computed_field
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import fetches
from storage.snapshots import RunRef, site_runs
from storage.validate import check_region

Verdict = Literal[
    "ok",
    "geo-blocked",
    "bot-blocked",
    "redirected",
    "blocked-everywhere",
    "unreachable",
    "partial",
    "pending",
]
REFUSAL_STATUSES = frozenset({403, 451})
CAPTCHA = re.compile(r"captcha|challenge|are-you-human|bot-check", re.IGNORECASE)
MAX_EVIDENCE = 5


@dataclass(frozen=True, slots=True)
class Outcome:
    """One fetch, as the classification sees it."""

    url: str
    status: int | None
    final_url: str | None = None
    error: str | None = None
    block: str | None = None  # the block signature the worker matched
    sha256: str | None = None


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def refusal(o: Outcome) -> str | None:
    """Why this fetch counts as refused (None: it does not)."""
    if o.status is None:
        return None
    if o.block is not None:
        return o.block
    if o.status in REFUSAL_STATUSES:
        return f"HTTP {o.status}"
    if o.final_url and CAPTCHA.search(urlsplit(o.final_url).path):
        return "captcha page"
    if o.final_url and _host(o.final_url) != _host(o.url):
        return f"redirect off the site to {_host(o.final_url)}"
    return None


def _offsite(o: Outcome) -> str | None:
    """The other host a redirect ended on (None: not a redirect off the site)."""
    if o.final_url and _host(o.final_url).removeprefix("www.") != _host(o.url).removeprefix("www."):
        return _host(o.final_url)
    return None


def _good(o: Outcome) -> bool:
    return o.status is not None and 200 <= o.status < 400 and refusal(o) is None


class Evidence(BaseModel):
    model_config = ConfigDict(frozen=True)
    url: str
    status: int | None
    final_url: str | None
    error: str | None
    why: str  # "HTTP 451", "captcha page", "network error", ...


class Cell(BaseModel):
    """One region's verdict in one round."""

    model_config = ConfigDict(frozen=True)
    region: str
    verdict: Verdict
    reason: str
    signature: str | None = None  # the cause: a block signature's name, or "→ host"
    run_id: str | None = None
    run_status: str | None = None
    statuses: dict[str, int] = {}  # "200" -> n, "error" -> n (network errors)
    evidence: list[Evidence] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def label(self) -> str:
        """The verdict with its cause, e.g. "geo-blocked (cloudflare-country-ban)"."""
        return f"{self.verdict} ({self.signature})" if self.signature else self.verdict


def classify(
    outcomes: Mapping[str, Sequence[Outcome]], finished: Mapping[str, bool] | None = None
) -> dict[str, Cell]:
    """The verdict of every region of one round from its fetch outcomes (pure)."""
    good_urls = {region: {o.url for o in outs if _good(o)} for region, outs in outcomes.items()}
    cells: dict[str, Cell] = {}
    for region, outs in outcomes.items():
        statuses = Counter("error" if o.status is None else str(o.status) for o in outs)
        refused = [(o, why) for o in outs if (why := refusal(o))]
        errors = [o for o in outs if o.status is None]
        good = [o for o in outs if _good(o)]
        evidence = [
            Evidence(url=o.url, status=o.status, final_url=o.final_url, error=o.error, why=why)
            for o, why in refused[:MAX_EVIDENCE]
        ] + [
            Evidence(url=o.url, status=None, final_url=None, error=o.error, why="network error")
            for o in errors[: max(0, MAX_EVIDENCE - len(refused))]
        ]
        # Other HTTP errors (404, 500...) are not refusals, but name their URLs too.
        failed = [o for o in outs if o.status is not None and o.status >= 400 and not refusal(o)]
        evidence += [
            Evidence(
                url=o.url,
                status=o.status,
                final_url=o.final_url,
                error=o.error,
                why=f"HTTP {o.status}",
            )
            for o in failed[: max(0, MAX_EVIDENCE - len(evidence))]
        ]
        verdict: Verdict
        signature: str | None = None
        if not outs:
            done = finished.get(region, True) if finished else True
            verdict, reason = (
                ("unreachable", "the run finished without fetching anything")
                if done
                else ("pending", "the run has not fetched anything yet")
            )
        elif len(errors) == len(outs):
            verdict, reason = "unreachable", f"no HTTP response for {len(outs)} URL(s)"
        elif refused and not good:
            urls = {o.url for o, _ in refused}
            elsewhere = sorted(
                other for other, ok in good_urls.items() if other != region and ok & urls
            )
            whys = ", ".join(sorted({why for _, why in refused}))
            signed = Counter(o.block for o, _ in refused if o.block is not None)
            hosts = sorted({h for o, _ in refused if (h := _offsite(o))})
            if all(_offsite(o) for o, _ in refused):
                verdict, signature = "redirected", "→ " + ", ".join(hosts)
                reason = f"every page redirected to {', '.join(hosts)}"
                if elsewhere:
                    reason += f"; {', '.join(elsewhere)} got the same URLs"
            elif elsewhere:
                verdict = "geo-blocked"
                signature = signed.most_common(1)[0][0] if signed else None
                reason = f"{whys} here; {', '.join(elsewhere)} got the same URLs"
            elif signed:
                verdict, signature = "bot-blocked", signed.most_common(1)[0][0]
                reason = f"{whys}; no region got these URLs"
            else:
                verdict = "blocked-everywhere"
                reason = f"{whys}; no region got these URLs"
        elif refused or errors:
            verdict = "partial"
            reason = f"{len(good)} ok, {len(refused)} refused, {len(errors)} unreachable"
        else:
            verdict, reason = "ok", f"{len(good)} of {len(outs)} URL(s) ok"
        cells[region] = Cell(
            region=region,
            verdict=verdict,
            reason=reason,
            signature=signature,
            statuses=dict(sorted(statuses.items())),
            evidence=evidence,
        )
    return cells


class Round(BaseModel):
    model_config = ConfigDict(frozen=True)
    round: str  # the tick, or the dispatch time of a manual crawl
    at: datetime | None
    cells: list[Cell]  # one per region of the site, in region order
    # Every region got byte-identical pages (equal digests); None: no digests to compare.
    identical: bool | None = None


class AccessResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    site: str
    regions: list[str]
    rounds: list[Round]  # newest first
    verified_only: bool = False  # runs with unverified egress were left out
    unverified: list[str] = []  # shown regions with verdicts from runs with unverified egress


def fetch_outcomes(session: Session, run_id: str) -> list[Outcome]:
    stmt = (
        select(
            fetches.c.url,
            fetches.c.status,
            fetches.c.final_url,
            fetches.c.error,
            fetches.c.block,
            fetches.c.sha256,
        )
        .where(fetches.c.run_id == run_id)
        .order_by(fetches.c.id)
    )
    return [
        Outcome(url=u, status=s, final_url=f, error=e, block=b, sha256=h)
        for u, s, f, e, b, h in session.execute(stmt)
    ]


def identical(outcomes: Mapping[str, Sequence[Outcome]]) -> bool | None:
    """Whether every region got the same bytes for every URL (None: nothing to say)."""
    digests = {region: {o.url: o.sha256 for o in outs} for region, outs in outcomes.items()}
    if len(digests) < 2 or any(not d or None in d.values() for d in digests.values()):
        return None
    first, *others = digests.values()
    return all(d == first for d in others)


def access(
    session: Session,
    site: str,
    rounds: int = 5,
    region: str | None = None,
    verified_only: bool = False,
) -> AccessResult:
    """Verdicts of the ``rounds`` newest rounds of ``site``, every region compared.

    `verified_only` leaves out runs whose egress was not verified.
    """
    all_runs = [r for r in site_runs(session, site) if r.verified or not verified_only]
    check_region(session, region, site)
    by_round: dict[str, dict[str, RunRef]] = {}
    for ref in all_runs:  # oldest first: a later run of a region in a round wins
        by_round.setdefault(ref.round, {})[ref.region] = ref
    regions = sorted({ref.region for ref in all_runs})
    shown = [region] if region else regions

    ordered = sorted(by_round.items(), key=lambda kv: _sort_key(kv[1]), reverse=True)[:rounds]
    out: list[Round] = []
    unverified: set[str] = set()
    for name, refs in ordered:
        unverified |= {r for r, ref in refs.items() if not ref.verified and r in shown}
        outcomes = {r: fetch_outcomes(session, ref.id) for r, ref in refs.items()}
        finished = {r: ref.status not in ("queued", "running") for r, ref in refs.items()}
        cells = classify(outcomes, finished)
        row = []
        for r in shown:
            run = refs.get(r)
            if run is None:
                row.append(Cell(region=r, verdict="pending", reason="no run of this region"))
                continue
            cell = cells[r]
            if cell.verdict == "unreachable" and not outcomes[r] and run.error:
                cell = cell.model_copy(update={"reason": f"run {run.status}: {run.error}"})
            row.append(cell.model_copy(update={"run_id": run.id, "run_status": run.status}))
        out.append(Round(round=name, at=_began(refs), cells=row, identical=identical(outcomes)))
    return AccessResult(
        site=site,
        regions=shown,
        rounds=out,
        verified_only=verified_only,
        unverified=sorted(unverified),
    )


def _began(refs: dict[str, RunRef]) -> datetime | None:
    times = [t for t in (r.queued_at or r.started_at or r.finished_at for r in refs.values()) if t]
    return min(times) if times else None


def _sort_key(refs: dict[str, RunRef]) -> tuple[str, str]:
    began = _began(refs)
    return (began.isoformat() if began else "", min(r.id for r in refs.values()))
