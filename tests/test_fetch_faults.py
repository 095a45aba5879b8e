"""Slow, stalled, broken and absent atlas servers, as a site meets them.

Each server is a real HTTP server on loopback serving a real published atlas
repository, misbehaving only on the requests a test picks. Every fault must
end as one line of ``DownloadError`` naming the problem, within the deadline
plus a small margin, with the site's cache and output folder unchanged and no
work folder left behind.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fedarches.client import AtlasClient
from fedarches.errors import DownloadError
from test_atlas_support import free_port, new_atlas, tree_digest

MARGIN_S = 1.5


class _Faulty(BaseHTTPRequestHandler):
    """Serves the repository; requests whose path contains ``trigger`` get ``fault``."""

    root: Path
    fault: str = "none"
    trigger: str = "/targets/"
    released: threading.Event

    def do_GET(self):  # noqa: N802
        f = self.root / self.path.lstrip("/")
        if not f.is_file():
            self.send_error(404)
            return
        data = f.read_bytes()
        if self.trigger in self.path and self.fault == "no-reply":
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.trigger not in self.path or self.fault == "none":
            self.wfile.write(data)
        elif self.fault == "drip":
            for b in data:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                if self.released.wait(0.3):
                    return
        elif self.fault == "stall":
            self.wfile.write(data[:10])
            self.wfile.flush()
            self.released.wait(30)
        elif self.fault == "early-close":
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True

    def log_message(self, *args):
        pass


class FaultyServer:
    def __init__(self, root: Path):
        self.released = threading.Event()
        handler = type("Handler", (_Faulty,), {"root": root, "released": self.released})
        self.handler = handler
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def atlas(tmp_path):
    return new_atlas(tmp_path)


@pytest.fixture
def server(atlas):
    s = FaultyServer(atlas.repository_dir)
    yield s
    s.close()


def _client(atlas, url: str, tmp_path: Path, **kw) -> AtlasClient:
    return AtlasClient(url, atlas.root_json, cache_dir=tmp_path / "site" / "cache", **kw)


def _leftovers(*targets: Path) -> list[str]:
    return sorted(
        p.name for t in targets for p in t.parent.iterdir()
        if p.name.startswith(f".{t.name}.") and not p.name.endswith(".lock")
    )


def _refused(client: AtlasClient, out: Path, match: str, within_s: float) -> str:
    cache_before, out_before = tree_digest(client.cache_dir), tree_digest(out)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=match) as info:
        client.fetch(out)
    took = time.monotonic() - start
    assert took < within_s + MARGIN_S, f"refused only after {took:.1f} s"
    message = str(info.value)
    assert "\n" not in message and message.startswith("download check failed")
    assert tree_digest(client.cache_dir) == cache_before
    assert tree_digest(out) == out_before
    assert _leftovers(client.cache_dir, out) == []
    return message


@pytest.fixture
def fetched(atlas, server, tmp_path):
    """A site that fetched once from the healthy server: cache and out folder hold state."""
    out = tmp_path / "site" / "model"
    _client(atlas, server.url, tmp_path).fetch(out)
    return out


def test_a_dripping_server_is_cut_at_the_deadline(atlas, server, fetched, tmp_path):
    server.handler.fault = "drip"
    client = _client(atlas, server.url, tmp_path, deadline_s=2, stall_s=5)
    msg = _refused(client, fetched, "did not finish within 2 s", within_s=2)
    assert server.url in msg


def test_a_stalled_server_is_cut_after_the_stall_timeout(atlas, server, fetched, tmp_path):
    server.handler.fault = "stall"
    client = _client(atlas, server.url, tmp_path, deadline_s=30, stall_s=1)
    _refused(client, fetched, "stalled for 1 s", within_s=1)


def test_a_stall_before_the_reply_is_cut_too(atlas, server, fetched, tmp_path):
    server.handler.fault, server.handler.trigger = "stall", "timestamp.json"
    client = _client(atlas, server.url, tmp_path, deadline_s=30, stall_s=1)
    _refused(client, fetched, "stalled for 1 s", within_s=1)


def test_an_early_close_is_named(atlas, server, fetched, tmp_path):
    server.handler.fault = "early-close"
    _refused(_client(atlas, server.url, tmp_path, stall_s=5), fetched, "closed the connection early", within_s=5)


def test_a_close_without_reply_is_named(atlas, server, fetched, tmp_path):
    server.handler.fault, server.handler.trigger = "no-reply", "timestamp.json"
    _refused(_client(atlas, server.url, tmp_path, stall_s=5), fetched, "closed the connection without a reply", within_s=5)


def test_a_refused_connection_is_named(atlas, server, fetched, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    msg = _refused(_client(atlas, url, tmp_path), fetched, "could not connect to .*: connection refused", within_s=2)
    assert "fedarches atlas serve" in msg
    with pytest.raises(DownloadError, match="connection refused"):
        _client(atlas, url, tmp_path).lineage()


def test_leftovers_of_a_killed_run_are_cleaned_on_the_next_fetch(atlas, server, fetched, tmp_path):
    client = _client(atlas, server.url, tmp_path)
    stale = [
        client.cache_dir.with_name(f".{client.cache_dir.name}.k1ll3d_x"),
        client.cache_dir.with_name(f".{client.cache_dir.name}.old"),
        fetched.with_name(f".{fetched.name}.abc_1234"),
        fetched.with_name(f".{fetched.name}.old"),
    ]
    for d in stale:
        (d / "metadata").mkdir(parents=True)
        (d / "metadata" / "junk.json").write_bytes(b"{}")
    unrelated = fetched.with_name(f".{fetched.name}.keep-me")
    unrelated.mkdir()
    client.fetch(fetched)
    assert _leftovers(client.cache_dir) == []
    assert _leftovers(fetched) == [unrelated.name]


def test_a_swap_cut_between_its_renames_is_undone(atlas, server, fetched, tmp_path):
    """Killed after moving the old output aside: the next fetch puts it back before replacing it."""
    before = tree_digest(fetched)
    fetched.rename(fetched.with_name(f".{fetched.name}.old"))
    server.handler.fault = "early-close"
    with pytest.raises(DownloadError):
        _client(atlas, server.url, tmp_path, stall_s=5).fetch(fetched)
    server.handler.fault = "none"
    _client(atlas, server.url, tmp_path).fetch(fetched)
    assert tree_digest(fetched) == before
    assert _leftovers(fetched) == []


def test_an_unusable_trust_cache_is_a_one_line_error(tmp_path):
    from fedarches.client import AtlasClient
    from fedarches.errors import TrustCacheError

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should go")
    client = AtlasClient("http://127.0.0.1:9", b"{}", cache_dir=blocker / "tuf")
    with pytest.raises(TrustCacheError, match="trust cache check failed"):
        client.lineage()


def test_site_fetch_takes_the_download_deadline_as_a_setting(atlas, server, fetched, tmp_path, capsys):
    from fedarches.cli import main

    server.handler.fault = "drip"
    start = time.monotonic()
    code = main(["site", "fetch", "--atlas", server.url, "--trust", str(atlas.root_json),
                 "--cache", str(tmp_path / "site" / "cache"), "--out", str(fetched), "--download-deadline", "2"])
    took = time.monotonic() - start
    assert code != 0 and took < 2 + MARGIN_S + 3, took
    assert "did not finish within 2 s" in capsys.readouterr().err
