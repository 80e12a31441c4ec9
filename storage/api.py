"""The read-only HTTP API (FastAPI): the same queries as the CLI, as JSON.

    geoscrape api --host 127.0.0.1 --port 8080     # docs at /docs and /redoc (served
                                                   # offline), schema at /openapi.json

Every list is paged with ``limit`` (1..1000) and ``offset`` and answers
``{"data": [...], "limit", "offset", "next_offset"}``; compare and changes
page their rows the same way inside their result. Errors are JSON
``{"error": "message"}``: 400 for a bad filter, 401 without the token, 404
for an unknown site or key, 503 when the store is unavailable. When
GEOSCRAPE_API_TOKEN is set, every endpoint but /health, /code and the docs
needs ``Authorization: Bearer <token>``.

``GET /code/{sha256}`` serves deployed code bundles to regional workers
(docs/PROJECTS.md): it needs ``X-Geoscrape-Region: <region>`` and that
region's own token, ``GEOSCRAPE_CODE_TOKEN_<REGION>`` (upper case, ``-`` as
``_``); a region without one gets no code.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from regions.settings import CODE_TOKEN_PREFIX, env_name, per_region_env, per_region_value, settings
from storage.access import AccessResult, access
from storage.boundary import SchemaMissing, StoreUnavailable, guard_engine
from storage.compare import CompareResult, compare
from storage.errors import NotFoundError, StorageError
from storage.history import ChangesResult, HistoryResult, changes, history
from storage.queries import ItemRow, Page, RunRow, SiteRow, list_items, list_runs, list_sites, page
from storage.runinfo import FetchList, RunDetail, run_detail, run_fetches
from storage.since import TIME_PATTERN, parse_since
from storage.validate import check_region, check_run_filters, check_site

TOKEN_ENV = env_name("api_token")
REGION_HEADER = "X-Geoscrape-Region"
MAX_LIMIT = 1000
# Far past any real store, and small enough that offset + limit stays a 64-bit integer.
MAX_OFFSET = 10**15
MAX_FIELDS = 100  # `field` filters per request


class ErrorBody(BaseModel):
    error: str


def _session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def _authorised(request: Request) -> None:
    secret: str | None = request.app.state.token
    if secret is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), secret.encode()):
        raise _Unauthorised()


class _Unauthorised(Exception):
    pass


class _CodeUnauthorised(Exception):
    pass


def code_token_env(region: str) -> str:
    """The API-side variable holding `region`'s code token."""
    return per_region_env(CODE_TOKEN_PREFIX, region)


def _code_reader(request: Request) -> None:
    """A worker of a region with a code token, presenting that token."""
    region = request.headers.get(REGION_HEADER, "")
    secret = per_region_value(CODE_TOKEN_PREFIX, region) if region else None
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if (
        not secret
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(value.encode(), secret.encode())
    ):
        raise _CodeUnauthorised()


Db = Annotated[Session, Depends(_session)]
guarded = [Depends(_authorised)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="rows per page")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="rows to skip")]
# The time filters: storage.since parses them (and phrases the errors the CLI
# shares); the pattern is in the document only, so FastAPI does not answer first.
Time = Annotated[
    str | None,
    Query(
        description="30m, 12h, 1d, 2w ago, or ISO date/time",
        json_schema_extra={"pattern": TIME_PATTERN},
    ),
]
Fields = Annotated[list[str] | None, Query(max_length=MAX_FIELDS, description="only these fields")]


def _since(value: str | None, what: str) -> datetime | None:
    return None if value is None else parse_since(value, what=what)


def create_app(database_url: str | None = None, token: str | None = None) -> FastAPI:
    """The app on ``database_url`` (default: GEOSCRAPE_DATABASE_URL); token from the env."""
    from storage.db import database_url as default_url
    from storage.db import make_engine, session_factory
    from storage.migrate import ensure_schema

    url = database_url or default_url()
    ensure_schema(url)
    # Database failures while serving become StoreUnavailable: a 503 naming the store.
    factory: sessionmaker[Session] = session_factory(guard_engine(make_engine(url), url))
    if token is None and (configured := settings().api_token) is not None:
        token = configured.get_secret_value()
    secret = token

    # Swagger UI and ReDoc from assets in the fastapi-offline package, not a CDN:
    # /docs and /redoc work on a machine without internet.
    app = FastAPIOffline(
        title="geoscrape",
        version="1",
        description="Read-only queries of the geoscrape store: runs, items, cross-region "
        "compare, access verdicts, history and changes.",
        responses={
            400: {"model": ErrorBody},
            401: {"model": ErrorBody},
            404: {"model": ErrorBody},
            503: {"model": ErrorBody},
        },
    )

    app.state.sessions = factory
    app.state.token = secret

    @app.exception_handler(_Unauthorised)
    async def _unauthorised(_: Request, __: _Unauthorised) -> JSONResponse:
        return JSONResponse(
            {"error": f"missing or wrong bearer token (set by {TOKEN_ENV})"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(_CodeUnauthorised)
    async def _code_unauthorised(_: Request, __: _CodeUnauthorised) -> JSONResponse:
        return JSONResponse(
            {
                "error": f"code needs {REGION_HEADER} and that region's token "
                f"(set here as {CODE_TOKEN_PREFIX}<REGION>)"
            },
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(StoreUnavailable)
    @app.exception_handler(SchemaMissing)
    async def _store_down(_: Request, exc: StorageError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503)

    @app.exception_handler(StorageError)
    async def _bad_query(_: Request, exc: StorageError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
            for e in exc.errors()
        )
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Keep the exception's headers: a 405 carries `Allow`.
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    app.add_middleware(RefuseNul)
    app.add_middleware(HeadAsGet)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/sites", dependencies=guarded, response_model=Page[SiteRow])
    def sites(db: Db, limit: Limit = 100, offset: Offset = 0) -> Page[SiteRow]:
        """Every site with runs in the store, its regions and newest run time."""
        return page(list_sites(db, limit=limit + 1, offset=offset), limit, offset)

    @app.get("/runs", dependencies=guarded, response_model=Page[RunRow])
    def runs_(
        db: Db,
        site: str | None = None,
        region: str | None = None,
        status: str | None = None,
        since: Time = None,
        until: Time = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> Page[RunRow]:
        """Runs, newest first, filtered by site, region, status and time (finish/start/queue)."""
        check_run_filters(db, site, region, status)
        rows = list_runs(
            db,
            site=site,
            region=region,
            status=status,
            since=_since(since, "since"),
            until=_since(until, "until"),
            limit=limit + 1,
            offset=offset,
        )
        return page(rows, limit, offset)

    @app.get("/runs/{run_id}", dependencies=guarded, response_model=RunDetail)
    def run_(db: Db, run_id: str) -> RunDetail:
        """One run in full: complete error, stats, worker and egress, limits reached, config."""
        return run_detail(db, run_id)

    @app.get("/runs/{run_id}/fetches", dependencies=guarded, response_model=FetchList)
    def fetches_(
        db: Db,
        run_id: str,
        status: Annotated[str | None, Query(description="404, 4xx, 5xx...")] = None,
        errors: Annotated[bool, Query(description="only failed fetches")] = False,
    ) -> FetchList:
        """The URLs the run fetched, with status, size and error."""
        return run_fetches(db, run_id, status=status, errors=errors)

    @app.get("/sites/{site}/items", dependencies=guarded, response_model=Page[ItemRow])
    def items_(
        db: Db, site: str, region: str | None = None, limit: Limit = 100, offset: Offset = 0
    ) -> Page[ItemRow]:
        """The latest data of every item of the site, by region then key."""
        check_site(db, site)  # on every page: an unknown site is 404 at any offset
        check_region(db, region, site)
        rows = list_items(db, site, region=region, limit=limit + 1, offset=offset)
        return page(rows, limit, offset)

    @app.get("/sites/{site}/compare", dependencies=guarded, response_model=CompareResult)
    def compare_(
        db: Db,
        site: str,
        field: Fields = None,
        tick: Annotated[str | None, Query(description="the runs of this tick")] = None,
        only_diff: bool = False,
        limit: Limit = 100,
        offset: Offset = 0,
        verified_only: Annotated[
            bool, Query(description="leave out runs whose egress was not verified")
        ] = False,
    ) -> CompareResult:
        """One row per key, one value per region per field; summary over every row."""
        return compare(
            db,
            site,
            fields=field,
            tick=tick,
            only_diff=only_diff,
            limit=limit,
            offset=offset,
            verified_only=verified_only,
        )

    @app.get("/sites/{site}/access", dependencies=guarded, response_model=AccessResult)
    def access_(
        db: Db,
        site: str,
        rounds: Annotated[int, Query(ge=1, le=100)] = 5,
        region: str | None = None,
        verified_only: Annotated[
            bool, Query(description="leave out runs whose egress was not verified")
        ] = False,
    ) -> AccessResult:
        """Verdict per region for the newest rounds of runs, with the evidence."""
        return access(db, site, rounds=rounds, region=region, verified_only=verified_only)

    @app.get("/sites/{site}/history", dependencies=guarded, response_model=HistoryResult)
    def history_(
        db: Db,
        site: str,
        key: Annotated[str, Query(description="the item key")],
        region: str | None = None,
        field: Fields = None,
    ) -> HistoryResult:
        """The values of one item over time, per region."""
        return history(db, site, key, region=region, fields=field)

    @app.get("/sites/{site}/changes", dependencies=guarded, response_model=ChangesResult)
    def changes_(
        db: Db,
        site: str,
        since: Annotated[
            str,
            Query(
                description="30m, 12h, 1d, 2w ago, or ISO date/time",
                json_schema_extra={"pattern": TIME_PATTERN},
            ),
        ] = "1d",
        region: str | None = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> ChangesResult:
        """Items that appeared, changed or vanished since a time, per region."""
        when = parse_since(since, what="since")
        return changes(db, site, when, region=region, limit=limit, offset=offset)

    @app.get(
        "/code/{sha256}",
        dependencies=[Depends(_code_reader)],
        response_class=Response,
        responses={200: {"content": {"application/zip": {}}}},
    )
    def code_(db: Db, sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]) -> Response:
        """A deployed code bundle (zip), for regional workers; they verify its sha256."""
        from storage.code import bundle_content

        return Response(bundle_content(db, sha256), media_type="application/zip")

    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document as the API really answers: bad parameters are 400
    with ``{"error": ...}`` (FastAPI would document a 422 with its own shape)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


class HeadAsGet:
    """Answer HEAD wherever GET is answered: the same status and headers, no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


class RefuseNul:
    """A NUL character in the path or a parameter is a 400 before any handler runs
    (PostgreSQL cannot store or compare text containing one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = unquote_to_bytes(scope.get("raw_path") or b"") + unquote_to_bytes(
                scope.get("query_string", b"").replace(b"+", b" ")
            )
            if b"\x00" in raw or "\x00" in scope.get("path", ""):
                response = JSONResponse(
                    {"error": "bad request: NUL characters are not allowed in the URL"},
                    status_code=400,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run `app` (create_app's, perhaps with the dashboard mounted) with uvicorn
    until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
