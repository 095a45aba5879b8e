"""Serving the published repository over HTTP.

Why a plain static server is enough: everything a site trusts is verified by
TUF signatures and hashes on the site, so the server needs no authentication,
no TLS for integrity (TLS still helps confidentiality of *which* atlas a site
reads) and no write access. Any static server (nginx, S3, GitHub pages) works;
this one is the stdlib threading server, rooted at ``ATLAS_DIR/repository`` so
the private keys next to it can never be requested.

Why the stdlib server, hardened, rather than an ASGI server: it needs no new
dependency, and the load it must hold (hundreds of concurrent fetches next to
hundreds of idle or half-open connections) is met by a real listen backlog, a
deadline for each request head, a bounded number of handler threads and a 4xx
for every malformed request; a site's fetch is a handful of small files.
"""

from __future__ import annotations

import functools
import io
import os
import socket
import sys
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fedarches.errors import FedarchesError, RepositoryError

if TYPE_CHECKING:
    from fedarches.server.atlas import Atlas

RESIGN_CHECK_SECONDS = 3600.0
#: a client has this long to send a whole request head, and each later send or receive this long
CONNECTION_TIMEOUT_SECONDS = 10.0
#: handler threads at most; a connection beyond them is answered 503 at once
MAX_CONNECTIONS = 1024
#: the kernel's queue of connections not yet accepted (capped by net.core.somaxconn)
LISTEN_BACKLOG = 2048
MAX_REQUEST_LINE = 8192

_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"


class _HeadReader(io.RawIOBase):
    """The socket as the handler reads it, with one deadline for a whole request head.

    Why: a per-receive timeout alone lets a client that drips one byte every
    few seconds hold a handler thread forever.
    """

    def __init__(self, sock: socket.socket, timeout: float):
        self._sock, self._timeout = sock, timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request head not received in time")
            self._sock.settimeout(min(left, self._timeout))
        return self._sock.recv_into(buffer)


def _decoded_url_path(target: str) -> str | None:
    """The path a request target names, or None where it is malformed (no leading slash, controls, bad UTF-8)."""
    if not target.startswith("/"):
        return None
    try:
        path = urllib.parse.unquote(target.split("?", 1)[0].split("#", 1)[0], errors="strict")
    except UnicodeDecodeError:
        return None
    return None if any(ord(c) < 32 or ord(c) == 127 for c in path) else path


def _escapes(path: str) -> bool:
    """Whether a decoded path tries to climb or to use a Windows separator (answered like a missing file)."""
    return "\\" in path or any(part in (".", "..") for part in path.split("/"))


class _Handler(SimpleHTTPRequestHandler):
    """Static files only; directory listings off; quiet unless asked; every bad request a 4xx."""

    verbose = False
    timeout = CONNECTION_TIMEOUT_SECONDS
    # so every error reply carries a status line, even for a request that names no version
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib reader; leaving it open would keep the socket's fd alive
        self._head = _HeadReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._head)

    def handle_one_request(self) -> None:
        self._head.deadline = time.monotonic() + self.timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        refusal = self._refuse_request_line()
        if refusal is not None:
            self._head.deadline = None
            self.requestline, self.command, self.request_version = "", None, self.default_request_version
            self.close_connection = True
            self.send_error(*refusal)
            return False
        try:
            return super().parse_request()  # reads the headers, still under the head deadline
        finally:
            self._head.deadline = None
            self.connection.settimeout(self.timeout)

    def _refuse_request_line(self) -> tuple[int, str] | None:
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            return 414, "request line too long"
        if len(str(self.raw_requestline, "iso-8859-1").split()) == 2:
            # HTTP/0.9: its reply has no status line, so it could never carry a refusal
            return 400, "HTTP/0.9 requests are not served"
        return None

    def send_head(self):  # type: ignore[no-untyped-def]
        path = _decoded_url_path(self.path)
        if path is None:
            self.send_error(400, "bad request path")
            return None
        if _escapes(path) or not self._is_served_file():
            self.send_error(404, "File not found")  # directories too: no listings, no index pages
            return None
        return super().send_head()

    def _is_served_file(self) -> bool:
        root = Path(self.directory).resolve()
        try:  # a name too long for the file system is simply not there
            target = Path(self.translate_path(self.path)).resolve()
            return target.is_relative_to(root) and target.is_file()
        except (OSError, ValueError):
            return False

    def _refuse_method(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def end_headers(self) -> None:
        # metadata changes in place (timestamp.json); never let a proxy cache it
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if self.verbose:
            super().log_message(format, *args)


class AtlasHTTPServer(ThreadingHTTPServer):
    """The stdlib threading server with a real backlog, bounded threads and timeouts."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    verbose = False
    _stop_refresh: threading.Event | None = None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        try:
            request.settimeout(1.0)
            request.sendall(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """One line, never a traceback: a client that vanishes mid-reply is routine, not a server fault."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) and not self.verbose:
            return
        print(f"fedarches: http: {client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread (tests, the demo); stop with ``shutdown()``."""
        t = threading.Thread(target=self.serve_forever, name="fedarches-atlas-http", daemon=True)
        t.start()
        return t

    def keep_fresh(self, atlas: "Atlas", every: float = RESIGN_CHECK_SECONDS) -> threading.Thread:
        """Re-sign the atlas metadata before it expires for as long as this server runs.

        Why here and not in one command: any long-running server of the
        repository (``atlas serve``, the Flower ServerApp) would otherwise
        serve timestamp metadata past its expiry, which every site refuses.
        """
        stop = self._stop_refresh = threading.Event()

        def loop() -> None:
            while not stop.wait(every):
                try:
                    if atlas.refresh():
                        print("re-signed metadata that was past half its lifetime", flush=True)
                except FedarchesError as exc:
                    print(f"fedarches: could not re-sign metadata: {exc}", file=sys.stderr, flush=True)

        t = threading.Thread(target=loop, name="fedarches-resign", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        """Stop serving (if serving in the background) and stop re-signing."""
        if self._stop_refresh is not None:
            self._stop_refresh.set()
        if getattr(self, "_bg", False):
            self.shutdown()
        self.server_close()


def make_server(
    directory: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8000, *, verbose: bool = False
) -> AtlasHTTPServer:
    """An HTTP server for ``directory`` (an atlas's ``repository/``), bound but not yet serving."""
    root = Path(directory)
    if not (root / "metadata").is_dir():
        raise RepositoryError(f"atlas repository check failed: {root} is not a published atlas repository (no metadata/)")
    handler = type("AtlasHandler", (_Handler,), {"verbose": verbose})
    server = AtlasHTTPServer((host, port), functools.partial(handler, directory=str(root)))
    server.verbose = verbose
    return server


def serve_atlas(
    atlas: "Atlas", host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False,
    resign_every: float = RESIGN_CHECK_SECONDS,
) -> AtlasHTTPServer:
    """Serve ``atlas``'s repository in the background and keep its metadata fresh.

    Re-signs at once if the metadata is past half its life, then every
    ``resign_every`` seconds. Stop with ``close()``.
    """
    atlas.refresh()
    server = make_server(atlas.repository_dir, host, port, verbose=verbose)
    server.keep_fresh(atlas, resign_every)
    server.start_background()
    server._bg = True  # type: ignore[attr-defined]
    return server
