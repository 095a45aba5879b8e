"""Faults at real sites: a site that hangs, crashes or sends garbage never holds a round
past its timeout and never costs the other sites their contributions.

Faults are real behaviour of a site's job process, chosen by its node config
(`protocol.FAULTS`): nothing of Flower or of intake is replaced."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fedarches.federation.protocol import MapRequest
from test_federation import _copy_atlas, _site, world  # noqa: F401 (the module's atlas and sites)

ROUND_TIMEOUT = 40
#: How long after the coordinator's last round `flwr run` may still take (engine and Ray shutdown).
HOLD_MARGIN = 30


MARK = "FEDARCHES_FAULT_TEST"


def _job_processes(marker: Path) -> list[str]:
    """Live site job processes of a federation started with ``{MARK: marker}`` in its environment."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "fedarches.federation.worker" in cmd and f"{MARK}={marker}".encode() in env:
            found.append(f"{pid}: {cmd}")
    return found


def _request(atlas, url: str) -> MapRequest:
    head = atlas.head()
    return MapRequest(round=1, atlas_url=url, version=head.number, version_id=head.id,
                      trust_root=atlas.root_json.read_bytes(), epochs=3)


def test_site_job_is_stopped_at_its_deadline_and_a_crash_is_an_error(world, tmp_path):  # noqa: F811
    from fedarches.errors import DeadlineError
    from fedarches.federation.worker import SiteProcessError, run_site_job
    from fedarches.server import make_server

    from fedarches.federation import worker

    atlas = _copy_atlas(world, tmp_path / "atlas")
    server = make_server(atlas.repository_dir, "127.0.0.1", 0)
    server.start_background()
    leftover = tmp_path / "site-b-results" / ".jobs" / "round-1-killed"  # a killed ClientApp's job folder
    leftover.mkdir(parents=True)
    try:
        with pytest.raises(SiteProcessError, match="site site-b: RuntimeError: injected fault"):
            run_site_job(_site(world, "site-b", tmp_path, fault="crash"), _request(atlas, server.url),
                         deadline=time.time() + 60)
        assert not leftover.exists()  # swept by the next job
        warm = worker._warm.proc
        assert warm.poll() is None  # an exception leaves the job process usable for the next job
        t0 = time.monotonic()
        reply = run_site_job(_site(world, "site-b", tmp_path, fault="hang"), _request(atlas, server.url),
                             deadline=time.time() + 8)
        took = time.monotonic() - t0
        assert reply.status == "failed" and reply.check == DeadlineError.check, reply
        assert reply.error_class == "DeadlineError" and "site-b" in reply.message
        assert 7 <= took <= 10, took
        assert warm.poll() is not None and worker._warm is None  # killed at the deadline, never reused
        assert not any((tmp_path / "site-b-results" / ".jobs").iterdir())
    finally:
        server.shutdown()
        server.server_close()


def _hung_site_run(world, tmp_path, deployment: bool):  # noqa: F811
    from fedarches.federation.app_dir import write_app_dir
    from fedarches.federation.protocol import write_sim_sites
    from fedarches.testing.flower import start_deployment, start_simulation

    atlas = _copy_atlas(world, tmp_path / "atlas")
    sites = [_site(world, "site-b", tmp_path), _site(world, "site-c", tmp_path, condition_key="study", fault="hang")]
    report = tmp_path / "report.json"
    run_config = {"atlas-dir": str(atlas.path), "num-server-rounds": 1, "report": str(report),
                  "round-timeout": ROUND_TIMEOUT, "min-sites": 2}
    env = {MARK: str(tmp_path)}
    if deployment:
        fed = start_deployment(tmp_path / "flower", {s.site: s.to_node_config() for s in sites}, env=env)
    else:
        run_config["sim-sites"] = str(write_sim_sites(tmp_path / "sim-sites.toml", sites))
        fed = start_simulation(tmp_path / "flower", env=env)
    try:
        result = fed.run(write_app_dir(tmp_path / "fedarches-app"), run_config,
                         num_supernodes=None if deployment else len(sites), timeout=300)
        returned = time.time()
    finally:
        fed.stop()
    assert result.ok, result.output[-3000:]
    rep = json.loads(report.read_text())
    (rnd,) = rep["rounds"]
    held = returned - report.stat().st_mtime  # from the coordinator's last word to `flwr run` returning
    assert rnd["seconds"] <= ROUND_TIMEOUT + 5, rnd["seconds"]
    assert held <= HOLD_MARGIN, (held, result.seconds)
    by_site = {s["site"] or s["node_id"]: s for s in rnd["sites"]}
    assert by_site["site-b"]["status"] == "accepted"
    hung = by_site.get("site-c")
    assert hung is None or hung["check"] == "deadline check", rnd["sites"]  # failed in time, or silent
    (published,) = rnd["published"]
    assert atlas.head().number == published["number"] == 2
    new = {c["name"]: c["site"] for c in published["conditions"]} .items() - {
        (c.name, c.site) for c in atlas.version(1).conditions}
    assert new == {(s, "site-b") for s in world["sites"]["site-b"]["studies"]}
    assert not _job_processes(tmp_path)
    return result, held


@pytest.mark.flower
def test_a_hung_site_does_not_hold_a_simulation_past_its_round_timeout(world, tmp_path):  # noqa: F811
    _hung_site_run(world, tmp_path, deployment=False)


@pytest.mark.flower
def test_a_hung_supernode_does_not_hold_a_deployment_past_its_round_timeout(world, tmp_path):  # noqa: F811
    _hung_site_run(world, tmp_path, deployment=True)


def test_a_clientapp_process_loads_no_site_library_before_its_job():
    """The ClientApp's process stays light (it only waits for its job process), and the
    statuses it passes on are the site library's own."""
    import subprocess
    import sys

    from fedarches.client import site
    from fedarches.federation import protocol

    assert (protocol.STATUS_CONTRIBUTED, protocol.STATUS_NOTHING_NEW) == (site.STATUS_CONTRIBUTED,
                                                                          site.STATUS_NOTHING_NEW)
    code = ("import sys, fedarches.federation.client_app; "
            "print(sorted(m for m in ('torch', 'anndata', 'fedarches.client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.flower
def test_ten_sites_with_faults_publish_exactly_the_valid_bundles_in_time(tmp_path):
    """benchmarks/faults.py at test size: of 10 sites one crashes, one dies and one sends a
    corrupted bundle in every round, and one hangs in round 2 after contributing in round 1."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    faults = pytest.importorskip("faults")

    timeout, rounds = 90, 2
    fed = faults.build_federation(tmp_path, 10, {1: "crash", 4: "garbage", 6: "kill", 8: ("hang", (2,))})
    out = faults.run_federation(fed, rounds, timeout, parallel=4, env={MARK: str(tmp_path)})
    print(faults.figures(fed, out, rounds, timeout))
    assert not faults.problems(fed, out, rounds, timeout), faults.figures(fed, out, rounds, timeout)
    first, second = ({s["site"]: s for s in r["sites"]} for r in out.report["rounds"])
    assert first["site-04"]["status"] == "rejected" and first["site-04"]["check"] == "hash check"
    assert first["site-08"]["status"] == "accepted" and second["site-08"]["check"] == "deadline check"
    errors = sorted(s["message"] for s in out.report["rounds"][0]["sites"] if s["status"] == "error")
    assert len(errors) == 2  # a crashed job is a Flower Error (a bug), naming the site
    assert "site site-01: RuntimeError: injected fault" in errors[0] and "site site-06" in errors[1]
    assert "signal 9" in errors[1]
    assert [len(n) for n in out.new_by_round] == [7, 6]
    assert out.report["rounds"][0]["wait_seconds"] < timeout  # nobody hangs in round 1: no waiting out the clock
    assert not _job_processes(tmp_path)
