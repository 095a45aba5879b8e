"""A federated reference's lineage entry names its build; every other entry keeps its bytes."""

from __future__ import annotations

import json

from fedarches.format.canonical import canonical_json
from fedarches.format.version import LineageEntry


def _entry(**extra: object) -> LineageEntry:
    return LineageEntry(number=1, id="a" * 64, parents=[], parent_numbers=[], branch="main", strategy="reference",
                        conditions=[], published="2026-12-01T00:00:00Z", **extra)


def test_an_entry_without_build_has_the_bytes_it_had_before_the_field_existed():
    raw = json.loads(canonical_json(_entry()))
    assert "build" not in raw and "labels" not in raw
    assert LineageEntry.model_validate(raw) == _entry()


def test_a_build_round_trips_through_the_canonical_bytes():
    e = _entry(build={"sites": "site-a,site-b", "rounds": 30, "strategy": "FedAvg"})
    back = LineageEntry.model_validate(json.loads(canonical_json(e)))
    assert back.build == {"sites": "site-a,site-b", "rounds": 30, "strategy": "FedAvg"}
