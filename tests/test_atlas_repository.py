"""The published TUF repository, served over real HTTP on loopback, and what a site refuses.

Every attack runs against a *mirror* (a copy of the published repository that
an attacker controls) or a hostile server, so the coordinator's own files stay
untouched; each test also checks that the site's cache and output directory
are exactly as they were before the refused fetch.
"""

from __future__ import annotations

import json
import stat
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from fedarches.cli import main
from fedarches.client import AtlasClient
from fedarches.errors import AtlasDirError, HashError, VerificationError
from fedarches.server import Atlas, ExpiryPolicy
from fedarches.format.version import read_atlas_version
from fedarches.format.model_dir import load_model_dir
from test_atlas_support import Served, bundle_for, enrolled_key, free_port, mirror, new_atlas, tree_digest


@pytest.fixture
def atlas(tmp_path) -> Atlas:
    return new_atlas(tmp_path)


@pytest.fixture
def served(atlas):
    s = Served(atlas.repository_dir)
    yield s
    s.close()


def _publish_v2(atlas: Atlas) -> None:
    key = enrolled_key(atlas, "site-a")
    atlas.merge([bundle_for(atlas, key, "site-a", ["q1"])])


def _assert_refused(client: AtlasClient, out: Path, match: str) -> VerificationError:
    cache_before, out_before = tree_digest(client.cache_dir), tree_digest(out)
    with pytest.raises(VerificationError, match=match) as info:
        client.fetch(out)
    assert tree_digest(client.cache_dir) == cache_before, "a refused fetch changed the site's trusted metadata"
    assert tree_digest(out) == out_before, "a refused fetch changed the output directory"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary output left behind"
    return info.value


def test_init_keeps_private_keys_out_of_the_served_directory(tmp_path, capsys):
    assert main(["atlas", "init", str(tmp_path / "a"), "--name", "lung"]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "a" / "root.json"
    assert str(root.resolve()) in out
    keys = tmp_path / "a" / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    pems = sorted(keys.glob("*.pem"))
    assert [p.name for p in pems] == ["root.pem", "snapshot.pem", "targets.pem", "timestamp.pem"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in pems)
    repo = tmp_path / "a" / "repository"
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in repo.rglob("*") if p.is_file())
    assert root.read_bytes() == (repo / "metadata" / "1.root.json").read_bytes()
    assert json.loads(root.read_bytes())["signed"]["_type"] == "root"
    with pytest.raises(AtlasDirError, match="not empty"):
        Atlas.init(tmp_path / "a", "again")


def test_fetch_over_http_writes_a_verified_model_dir(atlas, served, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["site", "fetch", "--atlas", served.url, "--trust", str(atlas.root_json), "--cache", str(cache)]
    assert main([*args, "--out", str(tmp_path / "m1")]) == 0
    assert "verified version 1" in capsys.readouterr().out
    manifest, blobs = load_model_dir(tmp_path / "m1")
    version = read_atlas_version(tmp_path / "m1")
    assert version.id == atlas.head().id and manifest.conditions == ["s0", "s1"]

    _publish_v2(atlas)
    assert main([*args, "--out", str(tmp_path / "m2")]) == 0
    assert read_atlas_version(tmp_path / "m2").number == 2
    assert main([*args, "--out", str(tmp_path / "m1b"), "--version", "1"]) == 0  # older on purpose: not a rollback
    assert read_atlas_version(tmp_path / "m1b").id == version.id
    assert main([*args, "--out", str(tmp_path / "m9"), "--version", "9"]) == 2
    assert "no version 9" in capsys.readouterr().err
    assert not (tmp_path / "m9").exists()


def test_served_directory_has_no_listing_and_no_way_to_the_keys(atlas, served):
    for path in ("/metadata/", "/../keys/root.pem", "/%2e%2e/keys/root.pem", "/../atlas.json"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(served.url + path, timeout=5)
        assert err.value.code == 404


@pytest.mark.parametrize("what", ["blob", "version manifest", "targets metadata"])
def test_tampered_files_on_a_mirror_are_refused(atlas, tmp_path, what):
    cache = tmp_path / "cache"
    s = Served(atlas.repository_dir)
    try:
        AtlasClient(s.url, atlas.root_json, cache_dir=cache).fetch(tmp_path / "model")  # version 1, trusted
    finally:
        s.close()
    _publish_v2(atlas)
    atlas_before = tree_digest(atlas.path)
    repo = mirror(atlas, tmp_path / "mirror")
    if what == "blob":
        victim = max((repo / "targets" / "blobs").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    elif what == "version manifest":
        victim = max((repo / "targets" / "versions").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    else:
        victim = max((repo / "metadata").glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    s = Served(repo)
    try:
        _assert_refused(AtlasClient(s.url, atlas.root_json, cache_dir=cache), tmp_path / "model", "hash check failed")
    finally:
        s.close()
    assert read_atlas_version(tmp_path / "model").number == 1
    assert tree_digest(atlas.path) == atlas_before


def test_metadata_signed_by_another_key_is_refused(atlas, tmp_path):
    repo = mirror(atlas, tmp_path / "mirror")
    ts_path = repo / "metadata" / "timestamp.json"
    md = Metadata.from_bytes(ts_path.read_bytes())
    md.signed.version += 1
    md.sign(CryptoSigner.generate_ed25519())  # the attacker's key, not the atlas's timestamp key
    ts_path.write_bytes(md.to_bytes())
    s = Served(repo)
    try:
        client = AtlasClient(s.url, atlas.root_json, cache_dir=tmp_path / "cache")
        _assert_refused(client, tmp_path / "model", "signature check failed")
    finally:
        s.close()


def test_wrong_trust_root_is_refused(atlas, served, tmp_path):
    other = Atlas.init(tmp_path / "other", "other")
    client = AtlasClient(served.url, other.root_json, cache_dir=tmp_path / "cache")
    _assert_refused(client, tmp_path / "model", "signature check failed")


def test_rolled_back_repository_is_refused(atlas, tmp_path):
    old = mirror(atlas, tmp_path / "old")  # the repository as it was at version 1
    _publish_v2(atlas)
    s = Served(atlas.repository_dir)
    client = AtlasClient(s.url, atlas.root_json, cache_dir=tmp_path / "cache")
    try:
        assert client.fetch(tmp_path / "model").number == 2
    finally:
        s.close()
    s = Served(old)
    client = AtlasClient(s.url, atlas.root_json, cache_dir=tmp_path / "cache")
    try:
        err = _assert_refused(client, tmp_path / "model", "rollback check failed")
    finally:
        s.close()
    assert "older metadata than this site has already seen" in str(err)
    assert read_atlas_version(tmp_path / "model").number == 2


def test_expired_metadata_is_refused_until_the_coordinator_resigns(tmp_path):
    atlas = new_atlas(tmp_path, expiry=ExpiryPolicy(timestamp=2))
    s = Served(atlas.repository_dir)
    try:
        client = AtlasClient(s.url, atlas.root_json, cache_dir=tmp_path / "cache")
        client.fetch(tmp_path / "model")
        time.sleep(2.5)  # a frozen mirror keeps serving this timestamp forever
        _assert_refused(client, tmp_path / "model2", "expiry check failed")
        assert not (tmp_path / "model2").exists()
        assert atlas.refresh() is True
        assert client.fetch(tmp_path / "model2").number == 1
    finally:
        s.close()


class _EndlessHandler(BaseHTTPRequestHandler):
    """Serves real files, except that the chosen paths stream bytes forever."""

    root: Path
    endless: str

    def do_GET(self):  # noqa: N802
        if self.endless in self.path:
            self.send_response(200)
            self.end_headers()
            chunk = b"\0" * 65536
            try:
                for _ in range(100000):  # ~6.5 GB: "endless" for a client that does not stop
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        f = self.root / self.path.lstrip("/")
        if not f.is_file():
            self.send_error(404)
            return
        data = f.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("endless", ["timestamp.json", "/blobs/"])
def test_endless_data_is_cut_off(atlas, tmp_path, endless):
    handler = type("H", (_EndlessHandler,), {"root": atlas.repository_dir, "endless": endless})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = server.server_address[:2]
        client = AtlasClient(f"http://{host}:{port}", atlas.root_json, cache_dir=tmp_path / "cache")
        t0 = time.perf_counter()
        _assert_refused(client, tmp_path / "model", "length check failed")
        assert time.perf_counter() - t0 < 30
    finally:
        server.shutdown()
        server.server_close()


def test_coordinator_refuses_to_sign_on_top_of_a_tampered_repository(atlas, tmp_path):
    key = enrolled_key(atlas, "site-a")
    weights = atlas.version(1).blobs["weights.safetensors"].sha256
    (blob,) = (atlas.repository_dir / "targets" / "blobs").glob(f"{weights}.*")
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    before = tree_digest(atlas.repository_dir)
    with pytest.raises(HashError, match="atlas repository hash check failed"):
        atlas.merge([bundle_for(atlas, key, "site-a", ["q1"])])
    assert tree_digest(atlas.repository_dir) == before
