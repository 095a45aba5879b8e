"""`fedarches demo --federated-reference`, small: version 1 is built over a Flower simulation by one
site per reference study (``atlas build-federated``), and the rest of the demo (sites fetching,
mapping and contributing over Flower rounds) runs on it unchanged."""

from __future__ import annotations

import json

import pytest

from fedarches.cli import main


@pytest.mark.flower
def test_demo_with_a_federated_reference(tmp_path, capsys):
    from fedarches.server import Atlas

    out = tmp_path / "demo"
    code = main(["demo", "--federated-reference", "--reference-rounds", "3", "--sites", "2", "--rounds", "1",
                 "--cells-per-study", "250", "--genes", "300", "--n-genes", "0", "--epochs", "15",
                 "--site-epochs", "5", "--no-plot", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    atlas = Atlas(out / "atlas")
    v1, v2 = atlas.log()
    # version 1: the generated data's two reference studies, each at its own site, 3 rounds x 5 epochs
    assert v1.strategy == "reference" and v1.build["sites"] == "ref-site-1,ref-site-2"
    assert (v1.build["rounds"], v1.build["local_epochs"]) == (3, 5)
    held = {c.name: c.metrics["held_by"] for c in atlas.version(1).conditions}
    assert sorted(held.values()) == ["ref-site-1", "ref-site-2"]
    assert "built over Flower" in text and "no reference cell left its site" in text
    ref_report = json.loads((out / "reference-report.json").read_text())
    assert ref_report["status"] == "completed" and len(ref_report["rounds"]) == 3
    # then the demo as ever: each site maps a new study onto version 1 and version 2 merges them
    assert v2.parent_numbers == [1]
    report = json.loads((out / "federation-report.json").read_text())
    assert report["status"] == "completed"
    accepted = [s for r in report["rounds"] for s in r["sites"] if s["status"] == "accepted"]
    assert sorted(s["site"] for s in accepted) == ["site-1", "site-2"]
    for s in accepted:
        assert 0.0 <= s["metrics"]["label_transfer.accuracy_known"] <= 1.0
    assert "label accuracy" in text and "the atlas learns" in text
