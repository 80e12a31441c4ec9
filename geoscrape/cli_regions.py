"""Region and broker commands (issue 4): broker provision, status, dev regions up|down."""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from geoscrape.clikit import DEFAULT_CONFIG, ConfigOption, err, out, sessions

broker_app = typer.Typer(help="RabbitMQ users and topology for the regions.", no_args_is_help=True)
regions_app = typer.Typer(
    help="Region network namespaces on this machine (root).", no_args_is_help=True
)


def _vhost(url: str) -> str:
    from kombu import Connection

    return str(Connection(url).virtual_host or "/")


@broker_app.command("provision")
def provision(
    config: ConfigOption = DEFAULT_CONFIG,
    apply: Annotated[
        bool, typer.Option("--apply", help="Create/update users with the local rabbitmqctl.")
    ] = False,
    export: Annotated[
        Path | None,
        typer.Option("--export", help="Write RabbitMQ definitions JSON to this file (- stdout)."),
    ] = None,
    vhost: Annotated[
        str | None, typer.Option(help="Virtual host (default: GEOSCRAPE_BROKER_URL's).")
    ] = None,
    user_prefix: Annotated[str, typer.Option(help="User name = PREFIX + region.")] = "geoscrape-",
) -> None:
    """One least-privilege broker user per region in the sites file (idempotent).

    Each may read only `scrape.<region>` and write only to the `ingest` exchange;
    the topology is declared with them, so workers never declare. Passwords come
    from GEOSCRAPE_BROKER_PASSWORD_<REGION>, or are generated for new users and
    printed once.
    """
    from regions import provision as prov
    from regions.bus import broker_url
    from scheduler.loader import load_config

    if apply and export is not None:
        raise prov.ProvisionError("give --apply or --export, not both")
    regions = list(load_config(config).regions)
    vhost = vhost or _vhost(broker_url())
    if not apply and export is None:
        table = Table("region", "user", "configure", "write", "read", title=f"vhost {vhost!r}")
        for user in prov.plan_users(regions, prefix=user_prefix, environ={}, existing=[]):
            p = user.permissions
            table.add_row(user.region, user.name, p.configure, p.write, p.read)
        out.print(table)
        out.print("nothing changed: --apply to create them, --export FILE for definitions JSON")
        return
    existing = prov.existing_users() if apply else []
    users = prov.plan_users(regions, prefix=user_prefix, existing=existing)
    if apply:
        prov.apply(users, regions, vhost)
        for user in users:
            state = (
                "created"
                if user.name not in existing
                else "password set from " + prov.password_env(user.region)
                if user.password
                else "exists, password unchanged"
            )
            out.print(f"{user.name}: {state}; permissions in force on {vhost!r}", highlight=False)
    else:
        import json

        assert export is not None
        text = json.dumps(prov.definitions(users, regions, vhost), indent=2)
        if str(export) == "-":  # for piping into `rabbitmqctl import_definitions`
            print(text)
        else:
            fd = os.open(export, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as sink:
                sink.write(text)
            err.print(
                f"wrote {export}: import it with "
                f"'rabbitmqctl import_definitions --format json < {export}'",
                highlight=False,
            )
    generated = [u for u in users if u.generated]
    if generated:
        # Shown once; with --export - they go to stderr, stdout being the JSON.
        stream = sys.stderr if str(export) == "-" else sys.stdout
        print(
            "generated passwords (shown once; keep them in each region's broker URL):", file=stream
        )
        for user in generated:
            print(f"{user.name}\t{user.password}", file=stream)


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    seconds = max(0, int((now - when).total_seconds()))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"


def _queue_depths(regions: list[str]) -> dict[str, tuple[int, int] | None] | None:
    """Per region (waiting, consumers), None for a missing queue; None if no broker."""
    from regions.bus import connect, queue_depth, scrape_queue_name

    try:
        with connect() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            return {r: queue_depth(conn, scrape_queue_name(r)) for r in regions}
    except Exception as exc:  # status still shows the store when the broker is down
        err.print(f"warning: broker unreachable, queue depths unknown ({exc})", highlight=False)
        return None


def _print_exits(workers: list[Any], now: Any) -> None:
    """Per worker and egress exit: address, country per geoip database, verified, why not."""
    rows = [(w, exit_) for w in workers for exit_ in w.exits or []]
    if not rows:
        return
    table = Table(
        "region", "worker", "exit", "address", "countries", "verified", "since", "why not",
        title="Egress exits",
    )  # fmt: skip
    for w, e in rows:
        countries = ", ".join(f"{db}={c or '?'}" for db, c in (e.get("countries") or {}).items())
        since = e.get("since")
        table.add_row(
            w.region,
            w.name,
            e.get("proxy", "?"),
            e.get("address") or "-",
            countries or "-",
            "yes" if e.get("verified") else "NO",
            _ago(datetime.fromisoformat(since), now) if since else "-",
            e.get("reason") or "",
        )
    out.print(table)


def status(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Per region: live workers (host, egress), queue depth, last run per site."""
    from regions.heartbeat import LIVE_WITHIN
    from regions.messages import utcnow
    from scheduler.loader import load_config
    from storage.queries import last_runs, live_workers

    now = utcnow()
    with sessions()() as session:
        workers = live_workers(session, seen_since=now - LIVE_WITHIN)
        runs = last_runs(session)
    declared = list(load_config(config).regions) if config.exists() else []
    regions = list(dict.fromkeys([*declared, *(w.region for w in workers)]))
    regions += sorted({r.region for r in runs} - set(regions))
    depths = _queue_depths(regions)

    table = Table("region", "live workers", "waiting jobs", "consumers", title="Regions")
    for region in regions:
        depth = None if depths is None else depths.get(region)
        waiting, consumers = (
            ("?", "?") if depths is None else ("no queue", "-") if depth is None else depth
        )
        live = sum(1 for w in workers if w.region == region)
        table.add_row(region, str(live), str(waiting), str(consumers))
    out.print(table)

    table = Table("region", "worker", "host", "egress", "up since", "last seen", title="Workers")
    for w in workers:
        table.add_row(
            w.region,
            w.name,
            w.host,
            w.egress or "-",
            _ago(w.started_at, now),
            _ago(w.last_seen_at, now),
        )
    out.print(table if workers else f"no live worker (none heard from in {LIVE_WITHIN.seconds}s)")
    _print_exits(workers, now)

    table = Table("region", "site", "status", "when", "pages", "items", "error", title="Last runs")
    for run in runs:
        when = run.finished_at or run.started_at or run.queued_at
        table.add_row(
            run.region,
            run.site,
            run.status,
            _ago(when, now),
            str(run.stats.get("pages", 0)),
            str(run.stats.get("items", 0)),
            (run.error or "")[:60],
        )
    out.print(table if runs else "no runs yet")


def _worker_url(address: str) -> str:
    """GEOSCRAPE_BROKER_URL for a worker inside a namespace: this shell's broker
    credentials and vhost (the forwarder makes the broker see a local client, so
    even guest may log in), the host replaced by the service address."""
    from urllib.parse import urlsplit, urlunsplit

    from regions.bus import broker_url

    parts = urlsplit(broker_url())
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{address}:5672" if auth else f"{address}:5672"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


@regions_app.command("up")
def regions_up(
    region: Annotated[
        list[str] | None, typer.Option("--region", "-r", help="Regions (default: the config's).")
    ] = None,
    config: ConfigOption = DEFAULT_CONFIG,
    tag: Annotated[
        str, typer.Option(help="Name tag of the namespaces (gs<TAG>-<region>).")
    ] = "dev",
    site_port: Annotated[int, typer.Option(help="Port of the geo-aware shop.")] = 8801,
    broker: Annotated[str, typer.Option(help="host:port the broker forwarder targets.")] = (
        "127.0.0.1:5672"
    ),
    refuse: Annotated[
        list[str] | None, typer.Option(help="Regions the shop answers 451 on /product/ pages.")
    ] = None,
    subnet: Annotated[
        str | None,
        typer.Option(help="The service /24 (e.g. 10.77.40.0/24); default: derived from the tag."),
    ] = None,
) -> None:
    """Namespaces per region, the geo shop and a broker forwarder; Ctrl-C removes all."""
    from geoscrape import netns
    from geoscrape.forwarder import Forwarder
    from geoscrape.testsite import GeoCatalog, Locale, serve
    from geoscrape.testsite.geo import EXAMPLE_LOCALES
    from scheduler.loader import load_config

    names = region or list(load_config(config).regions)
    service_octet = netns.parse_subnet(subnet) if subnet is not None else None
    net = netns.create(names, tag=tag, persistent=True, service_octet=service_octet)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        locales = {
            r: Locale(h.subnet, *EXAMPLE_LOCALES.get(r, ("EUR", 1.0 + 0.05 * i)))
            for i, (r, h) in enumerate(net.hosts.items())
        }
        catalog = GeoCatalog(locales, blocked={r: ["/product/"] for r in refuse or []})
        host, _, port = broker.rpartition(":")
        with (
            serve(host=net.service_address, port=site_port, catalog=catalog) as shop,
            Forwarder((net.service_address, 5672), (host, int(port))),
        ):
            table = Table("region", "namespace", "source address", "prices")
            for r, h in net.hosts.items():
                table.add_row(r, h.netns, h.address, f"{locales[r].currency} x{locales[r].rate}")
            out.print(table)
            out.print(
                f"geo shop:  {shop.url}/  (sites need allow_networks: ['{net.service_subnet}'])\n"
                f"broker:    {net.service_address}:5672 -> {broker}\n"
                f"a worker:  ip netns exec {net.hosts[names[0]].netns} env "
                f"GEOSCRAPE_BROKER_URL={_worker_url(net.service_address)} "
                f"geoscrape worker --region {names[0]}\n"
                "Ctrl-C removes everything.",
                highlight=False,
            )
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        netns.destroy(net)
        err.print(f"removed region network {tag!r}", highlight=False)


@regions_app.command("down")
def regions_down(
    tag: Annotated[str, typer.Option(help="The tag given to 'up'.")] = "dev",
) -> None:
    """Remove a region network left behind (and any whose creator died)."""
    from geoscrape import netns

    removed = netns.remove_stale()
    net = netns.find(tag)
    if net is not None:
        netns.destroy(net)
        removed.append(tag)
    out.print(f"removed: {', '.join(removed)}" if removed else "nothing to remove")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `geoscrape` app."""
    app.add_typer(broker_app, name="broker")
    app.command("status")(status)
    dev = next(g.typer_instance for g in app.registered_groups if g.name == "dev")
    assert dev is not None
    dev.add_typer(regions_app, name="regions")
