"""The coordinator refuses to publish what a site would refuse, and a failed publish leaves nothing behind.

Each case runs a real merge against a real atlas, checks the error class, that
the atlas directory is byte for byte what it was, and that real sites (one
that already trusted version 1, one brand new) still fetch version 1 over
loopback HTTP. A full disk is simulated twice: ``os.fsync`` failing with
ENOSPC on one chosen file (in process), and ``RLIMIT_FSIZE`` on a real
``fedarches atlas merge`` subprocess (what ``ulimit -f`` does).
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from fedarches.client import AtlasClient
from fedarches.errors import AtlasKeyError, RepositoryError
from fedarches.format.signing import generate_key, write_private_key
from fedarches.server import Atlas
from fedarches.server.publish_checks import CHECK_URL, DirectoryFetcher, verify_as_fresh_site
from test_atlas_support import CLI, Served, bundle_for, enrolled_key, new_atlas, tree_digest


class Case:
    """An atlas at version 1, a signed bundle for version 2, and a site that already trusts version 1."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.atlas = new_atlas(tmp_path)
        key = enrolled_key(self.atlas, "site-a")
        self.bundle = bundle_for(self.atlas, key, "site-a", ["qa"])
        self.metadata = self.atlas.repository_dir / "metadata"
        self.cache = tmp_path / "site-cache"
        self.fetch(1, self.cache)

    def fetch(self, number: int, cache) -> None:
        server = Served(self.atlas.repository_dir)
        try:
            got = AtlasClient(server.url, self.atlas.root_json, cache_dir=cache).fetch(self.tmp / "model")
            assert got.number == number
        finally:
            server.close()

    def refused(self, error: type[Exception], match: str, *, restore=None) -> Exception:
        """Merge is refused with ``error``; nothing changed; sites get version 1 (once ``restore`` ran)."""
        before = tree_digest(self.atlas.path)
        with pytest.raises(error, match=match) as info:
            Atlas(self.atlas.path).merge([self.bundle])
        assert tree_digest(self.atlas.path) == before, "a refused publish changed the atlas directory"
        if restore is not None:
            restore()
        self.assert_still_v1()
        return info.value

    def assert_still_v1(self) -> None:
        assert [e.number for e in Atlas(self.atlas.path).log()] == [1]
        self.fetch(1, self.cache)
        self.fetch(1, self.tmp / f"fresh-{len(list(self.tmp.iterdir()))}")

    def publishes(self) -> None:
        result = Atlas(self.atlas.path).merge([self.bundle])
        assert [o.status for o in result.outcomes] == ["accepted"]
        self.fetch(2, self.cache)
        self.fetch(2, self.tmp / "fresh-after")


@pytest.fixture
def case(tmp_path) -> Case:
    return Case(tmp_path)


def test_a_normal_merge_passes_the_fresh_site_check_and_publishes(case):
    case.publishes()
    assert sorted(p.name for p in case.metadata.iterdir()) == [
        "1.root.json", "1.snapshot.json", "1.targets.json", "2.snapshot.json", "2.targets.json",
        "3.snapshot.json", "3.targets.json", "4.snapshot.json", "4.targets.json", "timestamp.json",
    ]


def test_a_stray_copy_of_root_v1_as_2_root_json_is_refused_before_signing(case):
    # the stray breaks every site by itself ("rollback check failed"); the coordinator must not add to it
    stray = case.metadata / "2.root.json"
    shutil.copy(case.metadata / "1.root.json", stray)
    err = case.refused(RepositoryError, "2.root.json holds root version 1, not 2", restore=stray.unlink)
    assert "move it out of" in str(err) and "\n" not in str(err)
    case.publishes()


def test_a_root_v2_signed_by_someone_else_is_refused(case):
    md = Metadata.from_bytes((case.metadata / "1.root.json").read_bytes())
    md.signed.version = 2
    md.sign(CryptoSigner(generate_key().key), append=False)
    stray = case.metadata / "2.root.json"
    stray.write_bytes(md.to_bytes())
    case.refused(RepositoryError, "2.root.json is not signed by the atlas's root keys", restore=stray.unlink)


@pytest.mark.parametrize("name", ["notes.txt", "9.targets.json", "7.snapshot.json", "01.targets.json", "sub"])
def test_a_foreign_file_in_metadata_is_refused_naming_it(case, name):
    stray = case.metadata / name
    stray.mkdir() if name == "sub" else stray.write_bytes(b"{}")
    case.refused(RepositoryError, f"metadata/{name} .*move it out of")


def test_a_version_a_fresh_site_would_refuse_is_never_committed(case):
    # a wrong timestamp key: the committed files still verify, the new timestamp would not
    (case.atlas.path / "keys" / "timestamp.pem").unlink()
    write_private_key(case.atlas.path / "keys" / "timestamp.pem", generate_key())
    err = case.refused(RepositoryError, "fresh-site TUF check .* refused the new version")
    assert "previous version is still served" in str(err)


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_a_missing_role_key_is_refused_before_anything_is_written(case, role):
    (case.atlas.path / "keys" / f"{role}.pem").unlink()
    case.refused(AtlasKeyError, f"keys/{role}.pem is missing")


@pytest.mark.parametrize("victim", [".blobs.", ".lineage.json.", ".targets.json.", ".snapshot.json.", ".timestamp.json."])
def test_a_full_disk_during_publish_is_one_line_and_leaves_no_files(case, monkeypatch, victim):
    real_fsync = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if victim in name or (victim == ".blobs." and "/targets/blobs/" in name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    err = case.refused(RepositoryError, "no space left")
    assert "\n" not in str(err)
    monkeypatch.undo()
    case.publishes()


def test_ulimit_f_during_cli_merge_is_a_one_line_refusal(case):
    bundle = case.tmp / "contribution.safetensors"
    bundle.write_bytes(case.bundle)
    before = tree_digest(case.atlas.path)
    limit = 2048  # below the new targets metadata, above anything merge writes before publishing

    def ulimit_f():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [*CLI, "atlas", "merge", str(case.atlas.path), str(bundle)],
        preexec_fn=ulimit_f, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no space left" in lines[0] and "internal error" not in lines[0], proc.stderr
    assert tree_digest(case.atlas.path) == before
    case.assert_still_v1()


def test_the_fresh_site_check_itself(case):
    repo = case.atlas.repository_dir
    root = (case.metadata / "1.root.json").read_bytes()
    timestamp = (case.metadata / "timestamp.json").read_bytes()
    verify_as_fresh_site(repo, root, timestamp, ["lineage.json"])
    with pytest.raises(RepositoryError, match="fresh-site TUF check"):
        verify_as_fresh_site(repo, root, timestamp, ["versions/none.json"])
    forged = Metadata.from_bytes(timestamp)
    forged.sign(CryptoSigner(generate_key().key), append=False)
    with pytest.raises(RepositoryError, match="fresh-site TUF check"):
        verify_as_fresh_site(repo, root, forged.to_bytes(), [])
    # the fetcher serves the repository and nothing outside it (the keys sit next to it)
    fetcher = DirectoryFetcher(repo, {})
    assert fetcher.download_bytes(f"{CHECK_URL}/metadata/1.root.json", 10**6) == root
    for url in (f"{CHECK_URL}/metadata/../../keys/root.pem", f"{CHECK_URL}/metadata/%2e%2e/%2e%2e/keys/root.pem",
                f"{CHECK_URL}/../atlas.json", "file:///etc/passwd"):
        with pytest.raises(Exception, match="not in the repository"):
            fetcher.download_bytes(url, 10**6)
