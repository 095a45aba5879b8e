"""The HTTP fetcher a site's TUF client downloads through: bounded in time, one-line failures.

Why not ngclient's default ``Urllib3Fetcher``: its one ``socket_timeout``
bounds each socket read but not a whole download, so a server dripping a byte
every few seconds keeps a fetch alive forever; urllib3's default retries turn
one 30 s stall into four; a refused connection surfaces as a
``SlowRetrievalError`` (urllib3's ``NewConnectionError`` is a timeout
subclass); and an early close raised while streaming escapes ngclient as a
bare ``ProtocolError``. This fetcher enforces a per-read stall timeout and an
overall deadline for everything one fetcher instance downloads (one site
fetch), retries nothing, and raises only ``FetchFault`` (a tuf
``DownloadError``) whose text names the problem in one line.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

CHUNK = 65536
# No retries (each would restart the stall clock), but redirects are still followed.
_NO_RETRY = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5)


class FetchFault(tuf_exc.DownloadError):
    """A download that could not complete: refused, stalled, too slow overall, or cut short."""


def _server(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is ``exc`` or anything it wraps (urllib3 ``reason``, ``__cause__``, ``__context__``)."""
    todo, seen = [exc], set()
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        if isinstance(cur, kind):
            return True
        seen.add(id(cur))
        reason = getattr(cur, "reason", None)
        todo += [reason if isinstance(reason, BaseException) else None, cur.__cause__, cur.__context__]
    return False


class TimedFetcher(Urllib3Fetcher):
    """``FetcherInterface`` with a per-read ``stall_s`` and an overall ``deadline_s``.

    The deadline clock starts when the fetcher is made: make one per site fetch.
    """

    def __init__(self, *, stall_s: float, deadline_s: float, app_user_agent: str | None = None):
        super().__init__(socket_timeout=max(1, int(stall_s)), chunk_size=CHUNK, app_user_agent=app_user_agent)
        self.stall_s = float(stall_s)
        self.deadline_s = float(deadline_s)
        self._ends_at = time.monotonic() + self.deadline_s

    # ----------------------------------------------------------- clocks
    def _timeout(self, url: str) -> float:
        """Seconds the next blocking step may take: the stall timeout, cut to the deadline."""
        left = self._ends_at - time.monotonic()
        if left <= 0:
            raise self._late(url)
        return min(self.stall_s, left)

    def _late(self, url: str) -> FetchFault:
        return FetchFault(f"the atlas server at {_server(url)} did not finish within {self.deadline_s:g} s "
                          f"(the download deadline) while sending {url}")

    def _timed_out(self, url: str, limit: float) -> FetchFault:
        if limit < self.stall_s:
            return self._late(url)
        return FetchFault(f"the atlas server at {_server(url)} stalled for {self.stall_s:g} s "
                          f"(the stall timeout) while sending {url}")

    # --------------------------------------------------------- requests
    def _fetch(self, url: str) -> Iterator[bytes]:
        limit = self._timeout(url)
        try:
            response = self._proxy_env.request(
                "GET", url, preload_content=False, retries=_NO_RETRY,
                timeout=urllib3.Timeout(connect=limit, read=limit),
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes one named FetchFault
            raise self._connect_fault(url, exc, limit) from exc
        if response.status >= 400:
            response.release_conn()
            raise tuf_exc.DownloadHTTPError(f"HTTP error occurred with status {response.status}", response.status)
        return self._chunks(url, response)

    def _connect_fault(self, url: str, exc: Exception, limit: float) -> FetchFault:
        server = _server(url)
        if _caused_by(exc, ConnectionRefusedError) or "refused" in str(exc).lower():
            return FetchFault(f"could not connect to {server}: connection refused; "
                              "is `fedarches atlas serve` running and --atlas right?")
        if _caused_by(exc, urllib3.exceptions.NewConnectionError):
            reason = getattr(exc, "reason", exc)
            return FetchFault(f"could not connect to {server}: {reason}; "
                              "is `fedarches atlas serve` running and --atlas right?")
        if _caused_by(exc, urllib3.exceptions.TimeoutError) or _caused_by(exc, socket.timeout):
            return self._timed_out(url, limit)
        if _caused_by(exc, http.client.RemoteDisconnected) or _caused_by(exc, urllib3.exceptions.ProtocolError):
            return FetchFault(f"the atlas server at {server} closed the connection without a reply to {url}")
        return FetchFault(f"could not download {url}: {type(exc).__name__}: {exc}")

    def _chunks(self, url: str, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        sock = getattr(getattr(response, "connection", None), "sock", None)
        got = 0
        try:
            while True:
                limit = self._timeout(url)
                if sock is not None:
                    sock.settimeout(limit)
                try:
                    chunk = response.read1(self.chunk_size)
                except (urllib3.exceptions.TimeoutError, socket.timeout) as exc:
                    raise self._timed_out(url, limit) from exc
                except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                    raise self._cut_short(url, got, response) from exc
                if not chunk:
                    break
                got += len(chunk)
                yield chunk
        finally:
            response.release_conn()

    @staticmethod
    def _cut_short(url: str, got: int, response: urllib3.BaseHTTPResponse) -> FetchFault:
        expected = response.headers.get("Content-Length")
        of = f" of {expected}" if expected else ""
        return FetchFault(f"the atlas server at {_server(url)} closed the connection early "
                          f"({got}{of} bytes of {url} received)")
