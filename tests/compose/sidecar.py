"""Test services run from the geoscrape image by tests/compose/central.yml.

    python /compose/sidecar.py geosite --port 8080 --locale eu=172.29.1.0/24:EUR:1.0 ...
    python /compose/sidecar.py forward --listen 5671 --to rabbitmq:5671

`geosite` serves the geo-aware shop (prices by the client's source subnet) and
prints one `ACCESS <client> <path>` line per request, so `docker logs` is its
access log. `forward` pipes one TCP port to another host: the central broker's
TLS port, and nothing else, on the network a region in another cloud sees.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from geoscrape.forwarder import Forwarder
from geoscrape.testsite.geo import GeoCatalog, Locale
from geoscrape.testsite.server import ShopServer


class LoggedShop(ShopServer):
    _print_lock = threading.Lock()  # one whole line per request, never interleaved

    def _record(self, client: str, path: str) -> None:
        super()._record(client, path)
        with self._print_lock:
            print(f"ACCESS {client} {path}", flush=True)


def locale(text: str) -> tuple[str, Locale]:
    """eu=172.29.1.0/24:EUR:1.0 -> ("eu", Locale(...))."""
    region, _, rest = text.partition("=")
    network, currency, rate = rest.split(":")
    return region, Locale(network, currency, float(rate))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar.py")
    commands = parser.add_subparsers(dest="command", required=True)
    site = commands.add_parser("geosite")
    site.add_argument("--port", type=int, default=8080)
    site.add_argument("--products", type=int, default=24)
    site.add_argument("--locale", type=locale, action="append", required=True)
    forward = commands.add_parser("forward")
    forward.add_argument("--listen", type=int, required=True)
    forward.add_argument("--to", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.command == "geosite":
        catalog = GeoCatalog(dict(args.locale), products=args.products)
        with LoggedShop("0.0.0.0", args.port, catalog).start():
            print(f"geosite: {len(catalog.products)} products on :{args.port}", flush=True)
            stop.wait()
    else:
        host, _, port = args.to.rpartition(":")
        with Forwarder(("0.0.0.0", args.listen), (host, int(port))):
            print(f"forward: :{args.listen} -> {args.to}", flush=True)
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
