"""Issue 10, faults inside a round (no simulation needed): the strategy around Flower's FedAvg
refuses an update built on another round, averages who answered, and changes nothing when
fewer than the minimum answered; the build setup travels losslessly in a ConfigRecord."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from fedarches.errors import ProtocolError
from fedarches.federation.reference_protocol import BuildSetup
from fedarches.federation.reference_strategy import make_strategy


def _reply(node: int, value: float, n: int, rnd: int, *, error: str = "") -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                    group_id="", created_at=time.time(), ttl=60.0, message_type="train")
    if error:
        return Message(error=Error(code=1, reason=error), metadata=meta)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, value, np.float32))}),
                          "metrics": MetricRecord({"num-examples": n, "round": rnd, "loss": value})})
    return Message(content=content, metadata=meta)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_stale_updates_are_refused_and_the_rest_is_averaged_by_cells(name):
    s = make_strategy(name, offset=4, min_replies=2)  # a resumed run: its first round is round 5
    arrays, _ = s.aggregate_train(1, [_reply(1, 1.0, 100, 5), _reply(2, 4.0, 300, 5),
                                      _reply(3, 1000.0, 600, 4), _reply(4, 0.0, 1, 5, error="site crashed")])
    assert np.allclose(arrays["w"].numpy(), 3.25)  # (1*100 + 4*300) / 400: the stale one is not in
    [log] = s.rounds
    assert (log.round, log.answered, log.stale, [f["node"] for f in log.failed]) == (5, [1, 2], [3], [4])


def test_a_round_below_the_minimum_changes_nothing():
    s = make_strategy("fedavg", min_replies=2)
    arrays, metrics = s.aggregate_train(1, [_reply(1, 1.0, 10, 1), _reply(2, 2.0, 10, 0)])
    assert arrays is None and metrics is None
    assert s.rounds[0].answered == [1] and s.rounds[0].stale == [2] and not s.rounds[0].aggregated


def test_checkpoint_after_each_round_with_the_resumed_number():
    seen = []
    s = make_strategy("fedavg", offset=2, checkpoint=lambda r, a: seen.append(r))
    s.evaluate_centralized(0, ArrayRecord())  # start() calls it once before any round: no checkpoint
    s.evaluate_centralized(1, ArrayRecord())
    assert seen == [3]


def test_build_setup_round_trips_and_names_its_build():
    setup = BuildSetup(atlas="a", sites=["s1", "s2"], genes=["g1", "g2"], model_config="{}", label_key="ct",
                       label_categories=["A", "B"], local_epochs=2, total_epochs=10)
    again = BuildSetup.from_config(setup.to_config(**{"server-round": 3}))
    assert again == setup and again.digest == setup.digest
    assert BuildSetup(**{**setup.__dict__, "genes": ["g2", "g1"]}).digest != setup.digest
    cfg = setup.to_config()
    cfg["protocol"] = "other/1"
    with pytest.raises(ProtocolError):
        BuildSetup.from_config(cfg)


def test_rounds_and_local_epochs_left_out_take_the_models_schedule():
    from fedarches.federation.reference_run_config import GAUSSIANS, SCHEDULES, ReferenceRunConfig

    base = {"atlas-dir": "atlas", "label-key": "cell_type"}
    for model, (rounds, epochs) in SCHEDULES.items():
        cfg = ReferenceRunConfig.from_run_config({**base, "model": model})
        assert (cfg.rounds, cfg.local_epochs, cfg.gaussians) == (rounds, epochs, GAUSSIANS[model])
        # the app declares 0 for both (Flower needs a typed default): the same schedule
        assert ReferenceRunConfig.from_run_config({**ReferenceRunConfig.defaults(), **base, "model": model}) == cfg
    cfg = ReferenceRunConfig.from_run_config({**base, "model": "nb", "rounds": 3})
    assert (cfg.rounds, cfg.local_epochs) == (3, SCHEDULES["nb"][1])
    assert ReferenceRunConfig.from_run_config(cfg.to_run_config()) == cfg
    assert ReferenceRunConfig.from_run_config({**base, "model": "nb", "gaussians": "pooled"}).gaussians == "pooled"


def test_build_federated_refuses_an_unenrolled_site_before_any_simulation(tmp_path, capsys):
    import tomli_w

    from fedarches.cli import main

    assert main(["atlas", "init", str(tmp_path / "atlas"), "--name", "fed"]) == 0
    site = {"site": "site-x", "data": str(tmp_path / "x.h5ad"), "condition-key": "study",
            "key-dir": str(tmp_path / "keys")}
    (tmp_path / "sites.toml").write_text(tomli_w.dumps({"site": [site]}))
    assert main(["atlas", "build-federated", str(tmp_path / "atlas"), "--sites", str(tmp_path / "sites.toml"),
                 "--label-key", "cell_type"]) == 2
    assert "enrollment check failed" in capsys.readouterr().err
    (tmp_path / "sites.toml").write_text(tomli_w.dumps({"site": [{"site": "site-x"}]}))
    assert main(["atlas", "build-federated", str(tmp_path / "atlas"), "--sites", str(tmp_path / "sites.toml"),
                 "--label-key", "cell_type"]) == 2
    assert "setting check failed" in capsys.readouterr().err


def _with_embeddings(msg: Message, studies: dict[str, tuple[float, int]]) -> Message:
    msg.content["mmd"] = ArrayRecord({**{s: Array(np.full(4, v, np.float32)) for s, (v, _) in studies.items()},
                                      **{f"{s}/n": Array(np.array([n])) for s, (_, n) in studies.items()}})
    return msg


def test_study_embeddings_are_taken_out_of_the_average_and_sent_with_the_next_round(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # a ServerApp process has these; messages need them
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    s = make_strategy("fedavg", exchange_embeddings=True, k_min=20)
    replies = [_with_embeddings(_reply(1, 1.0, 100, 1), {"a": (0.5, 100)}),
               _with_embeddings(_reply(2, 3.0, 100, 1), {"b": (2.0, 80), "tiny": (9.0, 5)})]
    arrays, _ = s.aggregate_train(1, replies)  # Flower's FedAvg would refuse two ArrayRecords per reply
    assert np.allclose(arrays["w"].numpy(), 2.0)
    assert sorted(s.embeddings) == ["a", "b"]  # a study of fewer than k_min cells is never passed on

    class _Grid:
        def get_node_ids(self):
            return [1, 2]

    from flwr.app import ConfigRecord

    [first, second] = s.configure_train(2, arrays, ConfigRecord({}), _Grid())
    for msg in (first, second):
        sent = msg.content.array_records["mmd"]
        assert sorted(sent) == ["a", "b"] and np.allclose(sent["b"].numpy(), 2.0)
    from fedarches.federation.reference_protocol import record_bytes

    assert s.rounds[-1].bytes_down == record_bytes(arrays) + record_bytes(first.content.array_records["mmd"])


def test_random_feature_mmd_to_a_mean_embedding_estimates_the_exact_mmd():
    import torch

    import fedarches.models.losses as losses

    torch.manual_seed(0)
    a, b = torch.randn(300, 16) * 2, torch.randn(300, 16) * 2 + 0.8
    w, u = losses.rff_frequencies(16, 512, seed=1)
    target = losses.rff_features(b, w, u).mean(0, keepdim=True)
    est = losses.rff_mmd_to_targets(a, torch.zeros(300, dtype=torch.long), w, u, target)
    kept, losses.MMD_SCALES = losses.MMD_SCALES, losses.RFF_SCALES
    try:
        exact = losses.mmd_between_conditions(torch.cat([a, b]), torch.cat([torch.zeros(300), torch.ones(300)]).long())
    finally:
        losses.MMD_SCALES = kept
    assert abs(float(est) - float(exact)) < 0.1 * float(exact)
    same = losses.rff_mmd_to_targets(b, torch.zeros(300, dtype=torch.long), w, u, target)
    assert float(same) < 1e-6  # a study against its own mean embedding: no distance
    assert float(losses.rff_mmd_to_targets(a, torch.zeros(300, dtype=torch.long), w, u, target[:0])) == 0.0
