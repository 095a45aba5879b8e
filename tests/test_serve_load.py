"""`atlas serve` under load and under hostile clients, on loopback only.

Bounded in count and time: 300 half-open connections, 500 GETs from 50
workers, a dozen malformed requests; every socket is closed by the test.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedarches.client import AtlasClient
from fedarches.format.version import read_atlas_version
from fedarches.server import http as atlas_http
from fedarches.server import make_server
from test_atlas_support import new_atlas

HALF_OPEN = 300
GETS = 500
WORKERS = 50
ANSWER_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    return new_atlas(tmp_path_factory.mktemp("serve"))


@pytest.fixture
def server(atlas):
    s = make_server(atlas.repository_dir, "127.0.0.1", 0)
    s.start_background()
    yield s
    s.shutdown()
    s.server_close()


def _files(atlas) -> list[str]:
    root = Path(atlas.repository_dir)
    return ["/" + p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]


def _get(server, path: str) -> tuple[int, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=ANSWER_WITHIN_S)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        reply.read()
        return reply.status, time.monotonic() - t0
    finally:
        conn.close()


def _half_open(server, n: int, partial: bytes = b"GET /metadata/timestamp.json HTT") -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(server.server_address[:2], timeout=ANSWER_WITHIN_S)
        s.sendall(partial)
        socks.append(s)
    return socks


def _raw(server, data: bytes) -> bytes:
    """Send raw bytes, then read until the server closes (what a hostile client sees)."""
    with socket.create_connection(server.server_address[:2], timeout=ANSWER_WITHIN_S) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_concurrent_gets_are_all_answered_while_half_open_connections_idle(atlas, server):
    idle = _half_open(server, HALF_OPEN)
    try:
        paths = _files(atlas)
        t0 = time.monotonic()
        with ThreadPoolExecutor(WORKERS) as pool:
            results = list(pool.map(lambda i: _get(server, paths[i % len(paths)]), range(GETS)))
        overall = time.monotonic() - t0
    finally:
        for s in idle:
            s.close()
    assert [status for status, _ in results] == [200] * GETS
    assert max(seconds for _, seconds in results) < ANSWER_WITHIN_S
    assert overall < ANSWER_WITHIN_S, f"{GETS} GETs took {overall:.1f} s"


MALFORMED = {
    "NUL byte": (b"GET /%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "raw DEL": (b"GET /metadata/\x7f HTTP/1.1\r\n\r\n", 400),
    "dot-dot": (b"GET /../atlas.json HTTP/1.1\r\n\r\n", 404),  # as if missing: nothing above the root
    "encoded dot-dot": (b"GET /%2e%2e/keys/root.pem HTTP/1.1\r\n\r\n", 404),
    "backslash": (b"GET /metadata%5c..%5c..%5catlas.json HTTP/1.1\r\n\r\n", 404),
    "bad UTF-8": (b"GET /%ff%fe HTTP/1.1\r\n\r\n", 400),
    "absolute form": (b"GET http://elsewhere/metadata/1.root.json HTTP/1.1\r\n\r\n", 400),
    "no leading slash": (b"GET metadata/1.root.json HTTP/1.1\r\n\r\n", 400),
    "name too long": (b"GET /metadata/" + b"a" * 1000 + b" HTTP/1.1\r\n\r\n", 404),
    "10 kB request line": (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n", 414),
    "HTTP/0.9": (b"GET /metadata/1.root.json\r\n", 400),
    "garbage": (b"\x00\xff\xfe\x80 \x16\x03\x01\r\n\r\n", 400),
    "too many headers": (b"GET /metadata/1.root.json HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
    "directory": (b"GET /metadata/ HTTP/1.1\r\n\r\n", 404),
    "double slash": (b"GET //etc/passwd HTTP/1.1\r\n\r\n", 404),
    "missing file": (b"GET /metadata/99.root.json HTTP/1.1\r\n\r\n", 404),
    "POST": (b"POST /metadata/1.root.json HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
}


def test_every_malformed_request_gets_an_http_error_and_no_traceback(server, capfd):
    statuses = {name: _status(_raw(server, data)) for name, (data, _) in MALFORMED.items()}
    assert statuses == {name: want for name, (_, want) in MALFORMED.items()}
    assert _raw(server, b"\r\n") == b""  # an empty request line: a clean close
    assert _get(server, "/metadata/1.root.json")[0] == 200  # still serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and err == ""


def test_half_open_and_dripping_connections_are_dropped(atlas, monkeypatch):
    monkeypatch.setattr(atlas_http._Handler, "timeout", 1.0)
    server = make_server(atlas.repository_dir, "127.0.0.1", 0)
    server.start_background()
    idle = _half_open(server, 20)
    try:
        drip = socket.create_connection(server.server_address[:2], timeout=ANSWER_WITHIN_S)
        t0 = time.monotonic()
        with pytest.raises(OSError):  # one byte every 0.3 s never completes a request head
            for byte in b"GET /metadata/1.root.json HTTP/1.1\r\n":
                drip.sendall(bytes([byte]))
                time.sleep(0.3)
                assert time.monotonic() - t0 < ANSWER_WITHIN_S, "a dripping client held its connection"
        drip.close()
        for s in idle:
            assert s.recv(1024) == b""  # closed by the server after its timeout
        deadline = time.monotonic() + ANSWER_WITHIN_S
        while any(t.name.startswith("Thread-") and "process_request" in t.name for t in threading.enumerate()):
            assert time.monotonic() < deadline, "handler threads outlived their connections"
            time.sleep(0.1)
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def test_connections_beyond_the_cap_are_answered_busy(atlas, monkeypatch):
    monkeypatch.setattr(atlas_http, "MAX_CONNECTIONS", 3)
    server = make_server(atlas.repository_dir, "127.0.0.1", 0)
    server.start_background()
    idle = _half_open(server, 3)
    try:
        time.sleep(0.2)  # let the server accept them
        assert _status(_raw(server, b"GET /metadata/1.root.json HTTP/1.1\r\n\r\n")) == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + ANSWER_WITHIN_S
    while True:  # slots come back once the idle clients leave
        try:
            if _get(server, "/metadata/1.root.json")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "connection slots were not given back"
        time.sleep(0.1)
    server.shutdown()
    server.server_close()


def test_a_site_fetch_works_against_the_hardened_server(atlas, server, tmp_path):
    client = AtlasClient(server.url, atlas.root_json, cache_dir=tmp_path / "cache")
    client.fetch(tmp_path / "model")
    assert read_atlas_version(tmp_path / "model").number == 1
