"""The `geoscrape` command line: one front for scheduler, regions, scraper and storage."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from geoscrape import (
    cli_cancel,
    cli_query,
    cli_regions,
    cli_reliability,
    cli_schedule,
    cli_story,
    output,
)
from geoscrape.clikit import DEFAULT_CONFIG, ConfigOption, database_url, err, out, sessions
from geoscrape.errors import BadInput, GeoscrapeError
from geoscrape.logs import LogFormat, LogLevel, setup_logging
from regions.errors import RegionsError
from regions.settings import settings
from scheduler.errors import SchedulerError
from scraper.errors import ScraperError
from storage.errors import StorageError

app = typer.Typer(
    name="geoscrape",
    help="Geo-distributed web scraping: crawl sites from pinned regions, compare centrally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The central store's schema.", no_args_is_help=True)
dev_app = typer.Typer(help="Development and test tooling.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(dev_app, name="dev")


def _version(value: bool) -> None:
    if value:
        from geoscrape import __version__

        print(f"geoscrape {__version__}")
        raise typer.Exit(0)


@app.callback()
def _global(
    log_level: Annotated[
        LogLevel,
        typer.Option(envvar="GEOSCRAPE_LOG_LEVEL", help="Log level (env GEOSCRAPE_LOG_LEVEL)."),
    ] = LogLevel.info,
    log_file: Annotated[
        Path | None,
        typer.Option(envvar="GEOSCRAPE_LOG_FILE", help="Append logs to this file, not stderr."),
    ] = None,
    log_format: Annotated[
        LogFormat,
        typer.Option(envvar="GEOSCRAPE_LOG_FORMAT", help="text, or json: one object per line."),
    ] = LogFormat.text,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Geo-distributed web scraping: crawl sites from pinned regions, compare centrally."""
    if log_file is not None and not log_file.parent.is_dir():
        raise BadInput(f"--log-file {log_file}: directory {log_file.parent} does not exist")
    settings()  # every command: a bad GEOSCRAPE_* value is one line and exit 2, up front
    setup_logging(log_level, log_file, log_format)


@app.command()
def check(
    file: Annotated[
        Path,
        typer.Argument(
            envvar="GEOSCRAPE_CONFIG", help="The sites file to validate (env GEOSCRAPE_CONFIG)."
        ),
    ] = DEFAULT_CONFIG,
) -> None:
    """Validate a sites file: `ok` and a summary, or every error as FILE:LINE."""
    from scheduler.check import check as run_check

    code, text = run_check(file)
    # Plain print: one problem per line, never re-wrapped (editors jump to FILE:LINE).
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    if code == 0:
        for warning in _project_warnings(file):
            print(f"warning: {warning}", file=sys.stderr)
    raise typer.Exit(code)


def _project_warnings(file: Path) -> list[str]:
    """The Scrapy project settings geoscrape overrides, per site with a local `project`."""
    from regions.site import DEPLOYED_PREFIX
    from scheduler.loader import load_config

    config = load_config(file)
    sites = [s for s in config.sites if s.project and not s.project.startswith(DEPLOYED_PREFIX)]
    if not sites:
        return []
    from scraper.project import override_warnings

    warnings = []
    for site in sites:
        try:
            found = override_warnings(config.resolved_site(site.name))
        except ScraperError as exc:  # a worker may have what this machine lacks
            found = [f"cannot load its project here ({exc}); it is loaded at run time"]
        warnings += [f"site {site.name!r}: {text}" for text in found]
    return warnings


@app.command()
def deploy(
    project_dir: Annotated[
        Path, typer.Argument(help="A Scrapy project: the directory holding its scrapy.cfg.")
    ],
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="Bundle name (default: scrapy.cfg's project)."),
    ] = None,
) -> None:
    """Ship a Scrapy project to every region: sites run it as `project: deployed:NAME`."""
    from scraper.bundle import BundleError, check_name, make_bundle, project_name, sha256_hex
    from storage.code import save_bundle

    if not project_dir.is_dir():
        raise BundleError(f"{project_dir}: no such directory")
    bundle = check_name(name or project_name(project_dir))
    data = make_bundle(project_dir)
    with sessions()() as session:
        ref = save_bundle(session, bundle, sha256_hex(data), data)
        session.commit()
    out.print(
        f"deployed {ref.version} ({len(data)} bytes, sha256 {ref.sha256}); "
        f"next runs of sites with 'project: deployed:{bundle}' use it",
        highlight=False,
    )


@app.command()
def worker(
    region: Annotated[str, typer.Option("--region", "-r", help="The region to serve.")],
    concurrency: Annotated[int, typer.Option(min=1, help="Crawls run at once.")] = 1,
    events: Annotated[
        bool, typer.Option("--events", help="Send Celery task events (Flower, celery events).")
    ] = False,
    stop_timeout: Annotated[
        float,
        typer.Option(
            min=0, help="After a stop signal, seconds before crawls are aborted and handed back."
        ),
    ] = 30.0,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Run a regional worker: consume only `scrape.<region>` and crawl its jobs.

    Ctrl-C / SIGTERM finishes the crawl in progress; a second one (or
    --stop-timeout) aborts it and hands the run back to the region's queue.
    """
    from regions.bus import check_broker
    from regions.worker import CrawlPool, check_region, run_worker
    from scheduler.cancel import CancelMarks
    from scheduler.loader import load_config
    from scraper.chromium import check_browser_sites
    from scraper.code import CodeCache
    from scraper.distributed import Joiner
    from scraper.runner import run_job, start_warm_children, stop_warm_children
    from scraper.verify import RegionEgress

    loaded = load_config(config)
    check_region(region, list(loaded.regions))
    check_browser_sites(loaded, region)  # a missing Chromium: one line now, not failed crawls
    check_broker()
    # Deployed code bundles, fetched once from the central API (docs/PROJECTS.md).
    code = CodeCache.from_env(region)
    # Worker-local: proxy credentials and the source address come from this
    # machine's config, never a job.
    egress = RegionEgress(loaded.egress(region), loaded.geoip)
    source = loaded.region(region).egress.source_address
    # The crawl runner is handed down: regions sits below scraper and never imports it.
    runner = functools.partial(run_job, code=code.path)
    run_worker(
        region,
        runner,
        concurrency=concurrency,
        egress=egress,
        source_address=source,
        events=events,
        stop_timeout=stop_timeout,
        pool=CrawlPool(start_warm=start_warm_children, stop_warm=stop_warm_children, joiner=Joiner),
        cancelled=CancelMarks(),
    )


@app.command()
def ingest() -> None:
    """Consume the `ingest` queue and write results to the store (idempotently)."""
    import logging

    from regions.app import job_publisher
    from regions.bus import broker_url, check_broker
    from storage.ingest import run_ingest, tune_gc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tune_gc()
    check_broker()
    url = database_url()
    err.print(f"ingest: writing to {output.redact_db(url)}", highlight=False)
    # SIGTERM (docker stop, the demo) finishes the message in hand, then exits.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    broker = broker_url()
    run_ingest(broker, url, publish_job=job_publisher(broker), should_stop=stopping.is_set)


@app.command()
def crawl(
    site: Annotated[str, typer.Argument(help="The site's name in the sites file.")],
    region: Annotated[
        list[str] | None,
        typer.Option("--region", "-r", help="Only these regions (repeatable)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Show progress until the runs finish.")] = False,
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many s.")] = 3600,
    expires: Annotated[
        str | None,
        typer.Option(
            help="A job no worker started within this expires (30s, 10m; "
            "default: defaults.expires in the sites file, 1h)."
        ),
    ] = None,
    keep_waiting: Annotated[
        bool,
        typer.Option(help="--wait: keep waiting even when a region has no worker consuming."),
    ] = False,
    distributed: Annotated[
        bool,
        typer.Option(help="One run per region shared by its free workers (docs/SCALE.md)."),
    ] = False,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Dispatch one crawl of SITE per region now."""
    from datetime import timedelta

    from regions.bus import check_broker
    from regions.messages import utcnow
    from regions.units import parse_duration
    from scheduler.dispatch import plan_jobs, publish_jobs
    from scheduler.loader import load_config
    from storage.code import code_pinner

    loaded = load_config(config)
    try:
        ttl = float(parse_duration(expires)) if expires is not None else loaded.defaults.expires
    except ValueError as exc:
        raise BadInput(f"--expires: {exc}") from None
    if ttl <= 0:
        raise BadInput(f"--expires: {expires!r} must be above 0")
    deadline = utcnow() + timedelta(seconds=ttl)
    # The store is opened only for a site that runs deployed code.
    planned = plan_jobs(
        loaded, site, region, pin_code=code_pinner(database_url()), distributed=distributed
    )
    jobs = [j.model_copy(update={"expires_at": deadline}) for j in planned]
    check_broker()
    publish_jobs(jobs)
    for job in jobs:
        out.print(
            f"queued run {job.run_id} for {job.site} in {job.region} (expires in {ttl:g}s)",
            highlight=False,
        )
    if wait:
        from geoscrape.progress import UNSERVED_GRACE_SECONDS, unserved_regions, wait_for_runs

        # A job unstarted at `ttl` has expired: no worker can take it after that.
        idle = unserved_regions(
            [(j.run_id, j.region) for j in jobs],
            database_url(),
            grace=min(UNSERVED_GRACE_SECONDS, ttl),
        )
        if idle and not keep_waiting:
            raise BadInput(
                f"no worker is consuming {', '.join(idle)}: start 'geoscrape worker --region "
                f"{idle[0].removeprefix('scrape.')}' (the run stays queued until it expires "
                f"in {ttl:g}s), or pass --keep-waiting"
            )
        runs = wait_for_runs(database_url(), [j.run_id for j in jobs], timeout=timeout)
        output.print_runs(out, runs)
        if any(r.status != "succeeded" for r in runs):
            raise typer.Exit(1)


runs_app = typer.Typer(
    help="Recent runs (newest first); `runs show RUN` for the whole story of one.",
    invoke_without_command=True,
)
app.add_typer(runs_app, name="runs")


@runs_app.callback()
def runs(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    region: Annotated[str | None, typer.Option(help="Only this region.")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    format: Annotated[output.Format, typer.Option("--format", "-f")] = output.Format.table,
) -> None:
    """List recent runs, newest first (json: with each run's egress attestation;
    `runs show RUN`: one run in full)."""
    if ctx.invoked_subcommand is not None:
        return
    from storage.queries import list_runs
    from storage.validate import check_run_filters, check_status

    check_status(status)  # before the store: a typo needs no database
    with sessions()() as session:
        check_run_filters(session, site, region, status)
        rows = list_runs(session, site=site, region=region, status=status, limit=limit)
    output.print_runs(out, rows, format)


@app.command()
def items(
    site: Annotated[str, typer.Argument(help="The site's name.")],
    region: Annotated[str | None, typer.Option(help="Only this region.")] = None,
    format: Annotated[output.Format, typer.Option("--format", "-f")] = output.Format.table,
) -> None:
    """The latest items of SITE, per region."""
    from storage.queries import list_items
    from storage.validate import check_region, check_site

    with sessions()() as session:
        check_site(session, site)
        check_region(session, region, site)
        rows = list_items(session, site, region=region)
    output.print_items(out, rows, format)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply schema migrations (env GEOSCRAPE_DATABASE_URL)."""
    from storage.migrate import current_revision, upgrade

    url = database_url()
    upgrade(url, revision)
    out.print(f"{output.redact_db(url)} at revision {current_revision(url)}", highlight=False)


@app.command()
def demo(
    products: Annotated[int, typer.Option(min=1, help="Products in the demo shop.")] = 24,
    keep: Annotated[
        Path | None, typer.Option(help="Keep the demo's config and store in this folder.")
    ] = None,
    ui: Annotated[
        bool, typer.Option("--ui/--no-ui", help="Serve the dashboard until Ctrl-C at the end.")
    ] = True,
    ui_port: Annotated[
        int, typer.Option(min=0, max=65535, help="The dashboard's port (0: a free one).")
    ] = 0,
) -> None:
    """Run the whole pipeline on this machine: a geo shop, ingest, one worker per region."""
    from geoscrape.demo import run_demo

    raise typer.Exit(run_demo(out, products=products, keep=keep, ui=ui, ui_port=ui_port))


@dev_app.command("shop")
def dev_shop(
    host: str = "127.0.0.1",
    port: int = 8801,
    products: Annotated[int, typer.Option(min=1)] = 60,
) -> None:
    """Serve the bundled test shop in the foreground (Ctrl-C stops)."""
    from geoscrape.testsite.__main__ import main as serve_main

    serve_main(["--host", host, "--port", str(port), "--products", str(products)])


for area in (cli_schedule, cli_regions, cli_query, cli_reliability):
    area.register(app)
cli_story.register(app, runs_app)
cli_cancel.register(app)

ERRORS = (GeoscrapeError, SchedulerError, RegionsError, ScraperError, StorageError)


def _boundary_error(exc: BaseException) -> Exception | None:
    """A database or broker error that escaped its package, mapped as the package would."""
    import sqlite3

    import psycopg
    from amqp.exceptions import AMQPError
    from kombu.exceptions import KombuError
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(exc, SQLAlchemyError | sqlite3.Error | psycopg.Error):
        from storage.boundary import translate

        return translate(database_url(), exc)
    if isinstance(exc, KombuError | AMQPError | ConnectionError):
        from regions.bus import broker_url, classify_broker_error

        return classify_broker_error(broker_url(), exc)
    return None


def main() -> None:
    """Console entry point: every error becomes one clear line and exit 2, not a traceback."""
    try:
        app()
    except ERRORS as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, style="red")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        mapped = _boundary_error(exc)
        if mapped is None:
            raise
        err.print(f"error: {mapped}", markup=False, highlight=False, style="red")
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
