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

from geoscrape import cli_query, cli_regions, cli_reliability, cli_schedule, cli_trust, output
from geoscrape.clikit import DEFAULT_CONFIG, ConfigOption, database_url, err, out, sessions
from regions.errors import RegionsError
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


@app.command()
def check(file: Annotated[Path, typer.Argument(help="The sites file to validate.")]) -> None:
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
    from scheduler.config import DEPLOYED_PREFIX
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
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Run a regional worker: consume only `scrape.<region>` and crawl its jobs."""
    from regions.bus import check_broker
    from regions.worker import check_region, run_worker
    from scheduler.loader import load_config
    from scraper.chromium import check_browser_sites
    from scraper.code import CodeCache
    from scraper.runner import run_job
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
    )


@app.command()
def ingest() -> None:
    """Consume the `ingest` queue and write results to the store (idempotently)."""
    import logging

    from regions.app import job_publisher
    from regions.bus import broker_url, check_broker
    from storage.ingest import run_ingest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
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
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Dispatch one crawl of SITE per region now."""
    from regions.bus import check_broker
    from scheduler.dispatch import plan_jobs, publish_jobs
    from scheduler.loader import load_config
    from storage.code import code_pinner

    # The store is opened only for a site that runs deployed code.
    jobs = plan_jobs(load_config(config), site, region, pin_code=code_pinner(database_url()))
    check_broker()
    publish_jobs(jobs)
    for job in jobs:
        out.print(f"queued run {job.run_id} for {job.site} in {job.region}", highlight=False)
    if wait:
        from geoscrape.progress import wait_for_runs

        runs = wait_for_runs(database_url(), [j.run_id for j in jobs], timeout=timeout)
        output.print_runs(out, runs)
        if any(r.status != "succeeded" for r in runs):
            raise typer.Exit(1)


@app.command()
def runs(
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    region: Annotated[str | None, typer.Option(help="Only this region.")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    format: Annotated[output.Format, typer.Option("--format", "-f")] = output.Format.table,
) -> None:
    """List recent runs, newest first (json: with each run's egress attestation)."""
    from storage.queries import list_runs

    with sessions()() as session:
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

    with sessions()() as session:
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


for area in (cli_schedule, cli_regions, cli_query, cli_reliability, cli_trust):
    area.register(app)

ERRORS = (SchedulerError, RegionsError, ScraperError, StorageError)


def main() -> None:
    """Console entry point: package errors become one clear line, not a traceback."""
    try:
        app()
    except ERRORS as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, style="red")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
