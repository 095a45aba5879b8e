"""A hung site never holds a round, or the run, past the round timeout.

The site's work runs in a child process the ClientApp kills when the request's
time budget (its TTL, the coordinator's round timeout) is spent; the site then
answers ``failed`` with check "round deadline check". The fast tests drive that
directly; the Flower one runs a real simulation where one site hangs (the
``FEDARCHES_TEST_SITE_HANG`` fault-injection hook) and checks that the run ends
with the round and the other site's contribution is published.
"""

from __future__ import annotations

import json
import time

import pytest
from flwr.app import Message, MessageType, Metadata, RecordDict

from fedarches.errors import DataFileError, RoundDeadlineError
from fedarches.federation import client_app
from fedarches.federation.protocol import STATUS_FAILED, MapRequest, SiteConfig
from test_federation import _copy_atlas, _site, world  # noqa: F401  (module fixture)

HANG_S = 900  # far beyond the round: a run that waits for it is obvious
ROUND_TIMEOUT_S = 150  # Ray and the ClientApp take ~40 s to start on a busy 2-core machine
END_MARGIN_S = 30  # from the coordinator's last report write to `flwr run` returning


def _request() -> MapRequest:
    return MapRequest(round=1, atlas_url="http://127.0.0.1:9", version=1, version_id="0" * 64, trust_root=b"{}")


def _site_config(tmp_path, name: str) -> SiteConfig:
    return SiteConfig(site=name, data=tmp_path / "absent.h5ad", condition_key="study", key_dir=tmp_path / "keys",
                      out_dir=tmp_path / "results")


def test_a_hung_site_is_stopped_at_its_time_budget(tmp_path, monkeypatch):
    monkeypatch.setenv(client_app.TEST_HANG_ENV, f"other=1,hung={HANG_S}")
    t0 = time.monotonic()
    kind, reply = client_app.answer_within(_site_config(tmp_path, "hung"), _request(), 2.0)
    took = time.monotonic() - t0
    assert kind == "reply" and reply.status == STATUS_FAILED
    assert reply.check == RoundDeadlineError.check and reply.error_class == "RoundDeadlineError"
    assert reply.message.startswith("round deadline check failed: site hung")
    assert took < 2.0 + 5.0, f"a hung site held the call for {took:.1f}s"


def test_a_site_within_its_budget_answers_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv(client_app.TEST_HANG_ENV, "someone-else=600")
    kind, reply = client_app.answer_within(_site_config(tmp_path, "site-x"), _request(), 60.0)
    assert kind == "reply" and reply.status == STATUS_FAILED  # its data file is absent
    assert reply.check == DataFileError.check and reply.site == "site-x"


def _received(created_at: float, ttl: float) -> Message:
    """A request as a ClientApp receives it (metadata set by the SuperLink side)."""
    md = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                  created_at=created_at, ttl=ttl, message_type=MessageType.TRAIN)
    return Message(metadata=md, content=RecordDict())


def test_time_budget_is_what_is_left_of_the_request_ttl():
    budget = client_app.time_budget(_received(time.time(), 30.0))
    assert 30.0 - client_app.REPLY_MARGIN_S - 1.0 <= budget <= 30.0 - client_app.REPLY_MARGIN_S
    assert client_app.time_budget(_received(time.time() - 60, 30.0)) == 0.0


@pytest.mark.flower
def test_simulation_run_ends_with_the_round_when_a_site_hangs(world, tmp_path):  # noqa: F811
    from fedarches.federation.app_dir import write_app_dir
    from fedarches.federation.protocol import write_sim_sites
    from fedarches.testing.flower import start_simulation

    atlas = _copy_atlas(world, tmp_path / "atlas")
    sites = [_site(world, "site-a", tmp_path, conditions_per_round=1), _site(world, "site-b", tmp_path)]
    sim_sites = write_sim_sites(tmp_path / "sim-sites.toml", sites)
    report = tmp_path / "report.json"
    fed = start_simulation(tmp_path / "flower", env={client_app.TEST_HANG_ENV: f"site-b={HANG_S}"})
    try:
        result = fed.run(write_app_dir(tmp_path / "fedarches-app"),
                         {"atlas-dir": str(atlas.path), "num-server-rounds": 1, "report": str(report),
                          "sim-sites": str(sim_sites), "round-timeout": ROUND_TIMEOUT_S},
                         num_supernodes=2, timeout=ROUND_TIMEOUT_S + 240)
        returned = time.time()
    finally:
        fed.stop()
    assert result.ok, result.output[-3000:]
    held = returned - report.stat().st_mtime
    assert held < END_MARGIN_S, f"`flwr run` returned {held:.0f}s after the coordinator finished"
    rep = json.loads(report.read_text())
    (rnd,) = rep["rounds"]
    assert rnd["seconds"] <= ROUND_TIMEOUT_S + 5
    by_site = {s["site"] or s["node_id"]: s for s in rnd["sites"]}
    assert by_site["site-a"]["status"] == "accepted", rnd
    assert atlas.head().number == 2
    (a1, _) = world["sites"]["site-a"]["studies"]
    assert {c.name: c.site for c in atlas.head().conditions}[a1] == "site-a"
    hung = by_site.get("site-b") or next(s for s in rnd["sites"] if s["status"] == "no-reply")
    assert hung["status"] in (STATUS_FAILED, "no-reply"), hung
    if hung["status"] == STATUS_FAILED:
        assert hung["check"] == RoundDeadlineError.check
