"""Serving the published repository over HTTP.

Why a plain static server is enough: everything a site trusts is verified by
TUF signatures and hashes on the site, so the server needs no authentication,
no TLS for integrity (TLS still helps confidentiality of *which* atlas a site
reads) and no write access. Any static server (nginx, S3, GitHub pages) works;
this one is the stdlib threading server, rooted at ``ATLAS_DIR/repository`` so
the private keys next to it can never be requested.
"""

from __future__ import annotations

import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    """Static files only; directory listings off; quiet unless asked."""

    verbose = False

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        self.send_error(404, "no directory listings")
        return None

    def end_headers(self) -> None:
        # metadata changes in place (timestamp.json); never let a proxy cache it
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if self.verbose:
            super().log_message(format, *args)


class AtlasHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread (tests, the demo); stop with ``shutdown()``."""
        t = threading.Thread(target=self.serve_forever, name="fedarches-atlas-http", daemon=True)
        t.start()
        return t


def make_server(
    directory: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8000, *, verbose: bool = False
) -> AtlasHTTPServer:
    """An HTTP server for ``directory`` (an atlas's ``repository/``), bound but not yet serving."""
    root = Path(directory)
    if not (root / "metadata").is_dir():
        raise FileNotFoundError(f"{root} is not a published atlas repository (no metadata/)")
    handler = type("AtlasHandler", (_Handler,), {"verbose": verbose})
    return AtlasHTTPServer((host, port), functools.partial(handler, directory=str(root)))
