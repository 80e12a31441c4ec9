"""The `geoscrape` command line: one front for scheduler, regions, scraper and storage."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from geoscrape import cli_query, cli_regions, cli_reliability, cli_schedule, output
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
    raise typer.Exit(code)


@app.command()
def worker(
    region: Annotated[str, typer.Option("--region", "-r", help="The region to serve.")],
    concurrency: Annotated[int, typer.Option(min=1, help="Crawls run at once.")] = 1,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Run a regional worker: consume only `scrape.<region>` and crawl its jobs."""
    from regions.bus import check_broker
    from regions.worker import check_region, run_worker
    from scheduler.loader import load_config

    check_region(region, list(load_config(config).regions))
    check_broker()
    run_worker(region, concurrency=concurrency)


@app.command()
def ingest() -> None:
    """Consume the `ingest` queue and write results to the store (idempotently)."""
    import logging

    from regions.bus import broker_url, check_broker
    from storage.ingest import run_ingest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    check_broker()
    url = database_url()
    err.print(f"ingest: writing to {output.redact_db(url)}", highlight=False)
    # SIGTERM (docker stop, the demo) finishes the message in hand, then exits.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    run_ingest(broker_url(), url, should_stop=stopping.is_set)


@app.command()
def crawl(
    site: Annotated[str, typer.Argument(help="The site's name in the sites file.")],
    region: Annotated[
        list[str] | None,
        typer.Option("--region", "-r", help="Only these regions (repeatable)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Show progress until the runs finish.")] = False,
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many s.")] = 3600,
    distributed: Annotated[
        bool,
        typer.Option(help="One run per region shared by its free workers (docs/SCALE.md)."),
    ] = False,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Dispatch one crawl of SITE per region now."""
    from regions.bus import check_broker
    from scheduler.dispatch import plan_jobs, publish_jobs
    from scheduler.loader import load_config

    jobs = plan_jobs(load_config(config), site, region, distributed=distributed)
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
    limit: Annotated[int, typer.Option(min=1)] = 50,
) -> None:
    """List recent runs, newest first."""
    from storage.queries import list_runs

    with sessions()() as session:
        rows = list_runs(session, site=site, region=region, status=status, limit=limit)
    output.print_runs(out, rows)


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
) -> None:
    """Run the whole pipeline on this machine: a demo shop, ingest, one worker per region."""
    from geoscrape.demo import run_demo

    raise typer.Exit(run_demo(out, products=products, keep=keep))


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
