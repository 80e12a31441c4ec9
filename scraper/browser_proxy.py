"""The browser's only way out: a forward proxy inside the crawl child that applies the SSRF guard.

Chromium is started with `--proxy-server` pointing here (and
`--proxy-bypass-list=<-loopback>`, so loopback is proxied too). Request
interception (scraper.browser_engine) sees most of what a page asks for, but
Chromium follows redirects and resolves names itself; this proxy sees every
connection, redirect hops and WebSockets included, resolves the host itself
and connects only to an address the guard allows, so a DNS answer that
changes between check and connect gets nowhere either.

    CONNECT host:port          (https, wss)   -> check, connect, then a byte pipe
    GET http://host:port/path  (http, ws)     -> check, connect, origin-form request,
                                                 `Connection: close`, then a byte pipe

A refused connection gets a 403 and is recorded through `on_refused(url, reason)`;
one that cannot be made (no address, nothing answers) gets a 502.
One client connection carries one request: plain-HTTP keep-alive is turned off,
so the next request (maybe to another host) comes on a new, checked connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from scraper.ssrf import Guard, SSRFRefused, resolve_host

log = logging.getLogger(__name__)

HEAD_MAX = 64 * 1024  # request line + headers
CONNECT_TIMEOUT = 30.0
PIPE_CHUNK = 64 * 1024
_HOP_HEADERS = {b"proxy-connection", b"connection", b"keep-alive", b"proxy-authorization"}

OnRefused = Callable[[str, str], None]


def listen() -> socket.socket:
    """A listening loopback socket, bound before Chromium starts (its port goes on the
    command line); `serve` accepts on it once the event loop runs."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    sock.setblocking(False)
    return sock


async def serve(sock: socket.socket, guard: Guard, on_refused: OnRefused) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _handle(reader, writer, guard, on_refused)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, sock=sock, limit=HEAD_MAX)


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    guard: Guard,
    on_refused: OnRefused,
) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    request_line, _, header_block = head.partition(b"\r\n")
    method, target, version = request_line.decode("latin-1").split(" ", 2)
    if method.upper() == "CONNECT":
        host, _, port_text = target.rpartition(":")
        port = int(port_text)
        url = f"https://{target}/"
    else:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            await _refuse(writer, 400, "absolute http URL expected")
            return
        host, port, url = parts.hostname, parts.port or 80, target
    upstream = await _connect(host.strip("[]"), port, url, guard, on_refused)
    if isinstance(upstream, int):
        reason = "refused by geoscrape's SSRF guard" if upstream == 403 else "cannot connect"
        await _refuse(writer, upstream, reason)
        return
    up_reader, up_writer = upstream
    try:
        if method.upper() == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            parts = urlsplit(target)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            up_writer.write(f"{method} {path} {version}\r\n".encode("latin-1"))
            up_writer.write(_forward_headers(header_block))
        await writer.drain()
        await up_writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    finally:
        up_writer.close()


def _forward_headers(block: bytes) -> bytes:
    """The client's headers without hop-by-hop ones, plus `Connection: close`."""
    kept = [
        line
        for line in block.split(b"\r\n")
        if line and line.split(b":", 1)[0].strip().lower() not in _HOP_HEADERS
    ]
    upgrade = any(line.lower().startswith(b"upgrade:") for line in kept)
    kept.append(b"Connection: upgrade" if upgrade else b"Connection: close")
    return b"\r\n".join(kept) + b"\r\n\r\n"


async def _connect(
    host: str, port: int, url: str, guard: Guard, on_refused: OnRefused
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | int:
    """Connect to the first address of `host` the guard allows; else 403 (refused, and
    recorded) or 502 (no address, or none answered)."""
    addresses = await asyncio.get_running_loop().run_in_executor(None, resolve_host, host, port)
    allowed = [a for a in addresses if guard.address_allowed(a, port, host)]
    if addresses and not allowed:
        try:
            guard.check_address(addresses[0], port, host)
        except SSRFRefused as exc:
            on_refused(url, str(exc))
        return 403
    addresses = allowed
    for address in addresses:
        with contextlib.suppress(OSError, TimeoutError):
            return await asyncio.wait_for(
                asyncio.open_connection(address, port, limit=PIPE_CHUNK), CONNECT_TIMEOUT
            )
    return 502


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(PIPE_CHUNK):
            writer.write(chunk)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


async def _refuse(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    body = reason.encode()
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(OSError):
        await writer.drain()
