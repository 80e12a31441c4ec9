"""The dashboard's routes: HTML pages, htmx fragments, and the one write action.

    /                     overview: regions, sites, runs in progress (live)
    /ui/sites/{site}      runs per region, access verdicts, compare, price chart
    /ui/runs/{run_id}     one run: stats, status codes, failed fetches, config
    /ui/dead              dead jobs; requeue with the write token
    /ui/fragments/...     the parts htmx reloads
    /ui/static/...        htmx, uPlot and our CSS/JS, all shipped in the package

Read access follows the API: with GEOSCRAPE_API_TOKEN set a page needs the
token (bearer header, or `?token=` once, which sets a cookie). Requeue needs
GEOSCRAPE_API_WRITE_TOKEN: without it the button is not shown and the
endpoint answers 403.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from dashboard import data
from regions.settings import env_name

HERE = Path(__file__).parent
READ_COOKIE = "geoscrape_token"
WRITE_TOKEN_ENV = env_name("api_write_token")
PROGRESS_POLL = "2s"  # how often the overview's "in progress" part refreshes

templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True)


class DashboardDenied(Exception):
    """A page asked for without the read token."""


def _same(given: str | None, secret: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


def _readable(request: Request) -> None:
    secret: str | None = request.app.state.token
    if secret is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _same(value, secret):
        return
    if _same(request.query_params.get("token"), secret):
        return
    if _same(request.cookies.get(READ_COOKIE), secret):
        return
    raise DashboardDenied()


def _session(request: Request) -> Any:
    with request.app.state.sessions() as session:
        yield session


Db = Annotated[Session, Depends(_session)]
router = APIRouter(dependencies=[Depends(_readable)], include_in_schema=False)


def _render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    context["write_enabled"] = request.app.state.write_token is not None
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    token = request.query_params.get("token")
    if token and request.app.state.token is not None and _same(token, request.app.state.token):
        response.set_cookie(READ_COOKIE, token, httponly=True, samesite="strict")
    return response


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request, db: Db) -> Response:
    state = request.app.state
    view = data.overview(db, state.broker_url, state.config_path)
    return _render(request, "overview.html", view=view, poll=PROGRESS_POLL)


@router.get("/ui/fragments/progress", response_class=HTMLResponse)
def progress_fragment(request: Request, db: Db) -> Response:
    return _render(request, "_progress.html", runs=data.in_progress(db), poll=PROGRESS_POLL)


@router.get("/ui/sites/{site}", response_class=HTMLResponse)
def site_page(
    request: Request,
    db: Db,
    site: str,
    field: Annotated[list[str] | None, Query()] = None,
    key: str | None = None,
    chart: str | None = None,
) -> Response:
    from storage.access import access
    from storage.compare import compare
    from storage.snapshots import require_site

    require_site(db, site)
    every = compare(db, site, limit=1)
    all_fields = every.fields
    chosen = [f for f in (field or []) if f in all_fields] or all_fields
    result = compare(db, site, fields=chosen, limit=200)
    numeric = [s.field for s in every.summary if s.numeric]
    chart_field = chart if chart in numeric else (numeric[0] if numeric else None)
    chart_key = key or (result.rows[0].key if result.rows else None)
    runs = data.site_runs(db, site)
    by_region: dict[str, list[Any]] = {}
    for run in runs:
        by_region.setdefault(run.region, []).append(run)
    return _render(
        request,
        "site.html",
        site=site,
        runs_by_region=by_region,
        access=access(db, site, rounds=5),
        compare=result,
        all_fields=all_fields,
        chosen=chosen,
        numeric=numeric,
        chart_field=chart_field,
        chart_key=chart_key,
    )


@router.get("/ui/sites/{site}/history.json")
def history_json(
    db: Db,
    site: str,
    key: str,
    field: str,
    days: Annotated[int, Query(ge=1, le=3650)] = 30,
) -> dict[str, Any]:
    """One item's numeric field per region over time, shaped for uPlot."""
    return data.history_series(db, site, key, field, days=days)


@router.get("/ui/sites/{site}/runs.json")
def runs_json(db: Db, site: str) -> dict[str, Any]:
    """Items per finished run, per region over time, shaped for uPlot."""
    return data.runs_series(db, site)


@router.get("/ui/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, db: Db, run_id: str) -> Response:
    detail = data.run_detail(db, run_id)
    if detail is None:
        return _render(request, "missing.html", status_code=404, what=f"run {run_id}")
    return _render(request, "run.html", d=detail)


@router.get("/ui/dead", response_class=HTMLResponse)
def dead_page(request: Request, db: Db) -> Response:
    return _render(request, "dead.html", jobs=data.dead_jobs(db))


@router.post("/ui/dead/{run_id}/requeue")
def requeue_dead(
    request: Request,
    run_id: str,
    write_token: Annotated[str, Form()] = "",
) -> Response:
    """Publish a dead job again (same run id); needs GEOSCRAPE_API_WRITE_TOKEN."""
    secret: str | None = request.app.state.write_token
    if secret is None:
        return JSONResponse(
            {"error": f"requeue is disabled: the server has no {WRITE_TOKEN_ENV}"},
            status_code=403,
        )
    bearer = request.headers.get("authorization", "").partition(" ")[2]
    if not (_same(write_token, secret) or _same(bearer, secret)):
        return JSONResponse({"error": f"wrong write token ({WRITE_TOKEN_ENV})"}, status_code=403)
    from scheduler.dispatch import publish_jobs
    from storage.deadletter import requeue

    broker = request.app.state.broker_url
    with request.app.state.sessions() as session, session.begin():
        job = requeue(session, run_id, lambda job: publish_jobs([job], broker))
    return HTMLResponse(
        f'<td colspan="7" role="status">requeued run {job.run_id} to {job.region}</td>'
    )
