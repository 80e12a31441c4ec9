"""A small TCP forwarder (optionally TLS-terminating) for tests and dev tooling.

The machine's RabbitMQ listens on 127.0.0.1 only and is shared, so it is never
reconfigured: region namespaces reach it through a forwarder listening on the
bridge's service address, and the TLS tests put a TLS-terminating forwarder in
front of it.

    with Forwarder(("10.77.5.1", 0), ("127.0.0.1", 5672)) as fwd:
        fwd.port  # the listening port
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from types import TracebackType

BUFFER = 65536


class Forwarder:
    """Accepts on `listen` and pipes every connection to `target`, byte for byte."""

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        *,
        server_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.target = target
        self.server_ssl = server_ssl
        self._listener = socket.create_server(listen, reuse_port=False)
        self._listener.settimeout(0.2)
        self.host, self.port = self._listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name=f"fwd-{self.port}", daemon=True)
        self.connections = 0  # accepted so far
        self.errors: list[str] = []  # handshake or upstream failures, for test output

    def start(self) -> Forwarder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()

    def __enter__(self) -> Forwarder:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(None)
        self._track(client)
        try:
            if self.server_ssl is not None:
                client.settimeout(10)
                client = self.server_ssl.wrap_socket(client, server_side=True)
                client.settimeout(None)
                self._track(client)
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
            self._track(upstream)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError):
                client.close()
            return
        back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
        back.start()
        self._pipe(client, upstream)
        back.join()
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.close()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(BUFFER):
                sink.sendall(chunk)
        except OSError:
            pass
        # Pass the end of stream on, so the other direction finishes too.
        with contextlib.suppress(OSError):
            if isinstance(sink, ssl.SSLSocket):
                sink.close()
            else:
                sink.shutdown(socket.SHUT_WR)
