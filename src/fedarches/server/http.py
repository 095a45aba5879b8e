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
import sys
import threading
from typing import TYPE_CHECKING
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fedarches.errors import FedarchesError, RepositoryError

if TYPE_CHECKING:
    from fedarches.server.atlas import Atlas

RESIGN_CHECK_SECONDS = 3600.0


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
    _stop_refresh: threading.Event | None = None

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
    return AtlasHTTPServer((host, port), functools.partial(handler, directory=str(root)))


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
