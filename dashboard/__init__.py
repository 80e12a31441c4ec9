"""The web dashboard and /metrics, mounted into the read API's FastAPI app.

Server-rendered Jinja2 pages with htmx for live parts and uPlot for charts;
every asset is a file of this package (vendored from npm, see
static/VENDORED.md), so the pages work offline. docs/DASHBOARD.md has the tour.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount(app: FastAPI, *, broker_url: str | None = None, config: Path | None = None) -> None:
    """Add the dashboard (at /, /ui/...) and /metrics to `app` (storage.api's).

    Needs `app.state.sessions` and `app.state.token` (the read token). The
    write token comes from GEOSCRAPE_API_WRITE_TOKEN, the sites file from
    GEOSCRAPE_CONFIG (for schedules), the broker from GEOSCRAPE_BROKER_URL.
    """
    from dashboard import metrics, pages
    from regions.bus import broker_url as default_broker
    from regions.settings import settings

    env = settings()
    app.state.broker_url = broker_url or default_broker()
    app.state.config_path = config or env.config
    write_token = env.api_write_token
    app.state.write_token = write_token.get_secret_value() if write_token else None

    @app.exception_handler(pages.DashboardDenied)
    async def _denied(_: Request, __: pages.DashboardDenied) -> JSONResponse:
        return JSONResponse(
            {"error": "missing or wrong token (open the dashboard once with ?token=...)"},
            status_code=401,
        )

    app.include_router(pages.router)
    app.include_router(metrics.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="dashboard-static")
