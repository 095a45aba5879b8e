"""SIGKILL of the coordinator in the middle of publishing.

The merge runs as a real `fedarches atlas merge` subprocess that stops at a
chosen publish step (``FEDARCHES_PUBLISH_PAUSE``); the test kills it with
SIGKILL there, then checks over HTTP that sites still get the previous version,
fully verified, and that rerunning the merge publishes cleanly.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest

from fedarches.cli import main
from fedarches.client import AtlasClient
from fedarches.server import Atlas
from fedarches.server.repository import CHECKPOINTS, PAUSE_ENV, TMP_GLOB
from fedarches.format.version import read_atlas_version
from test_atlas_support import CLI, Served, bundle_for, enrolled_key, new_atlas


def _run_until_paused(args: list[str], step: str) -> subprocess.Popen:
    env = {**os.environ, PAUSE_ENV: step, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            seen += line
            if f"paused at publish step {step}".encode() in line:
                return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"publisher never reached step {step}: {seen.decode(errors='replace')}")


@pytest.mark.parametrize("step", CHECKPOINTS)
def test_sigkill_mid_publish_leaves_previous_version_served(tmp_path, step, capsys):
    atlas = new_atlas(tmp_path)
    key = enrolled_key(atlas, "site-a")
    bundle = tmp_path / "contribution.safetensors"
    bundle.write_bytes(bundle_for(atlas, key, "site-a", ["qa"]))
    server = Served(atlas.repository_dir)
    cache = tmp_path / "cache"
    try:
        site = AtlasClient(server.url, atlas.root_json, cache_dir=cache)
        assert site.fetch(tmp_path / "m0").number == 1

        proc = _run_until_paused(["atlas", "merge", str(atlas.path), str(bundle)], step)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        expected = 2 if step == "committed" else 1
        # a site that already trusted version 1, and a brand-new site, both verify what is served
        for cache_dir in (cache, tmp_path / f"fresh-{step}"):
            got = AtlasClient(server.url, atlas.root_json, cache_dir=cache_dir).fetch(tmp_path / "m1")
            assert got.number == expected
            assert read_atlas_version(tmp_path / "m1").id == got.id
        assert [e.number for e in Atlas(atlas.path).log()] == list(range(1, expected + 1))

        assert main(["atlas", "merge", str(atlas.path), str(bundle)]) == 0  # the operator reruns it
        out = capsys.readouterr().out
        assert ("already merged" if step == "committed" else "published version 2") in out
        assert not list(atlas.repository_dir.rglob(TMP_GLOB))
        got = AtlasClient(server.url, atlas.root_json, cache_dir=cache).fetch(tmp_path / "m2")
        assert got.number == 2 and got.version.condition_names() == ["s0", "s1", "qa"]
        assert [e.number for e in Atlas(atlas.path).log()] == [1, 2]
    finally:
        server.close()
