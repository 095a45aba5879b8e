"""The Flower run config: one validated model, one set of defaults, refused before any site runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedarches.config import STRATEGIES
from fedarches.errors import SettingError
from fedarches.federation.app_dir import app_pyproject
from fedarches.federation.coordinator import run_coordinator
from fedarches.federation.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_repository_pyproject_and_the_written_app():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert project == RunConfig.defaults()
    assert app_pyproject()["tool"]["flwr"]["app"]["config"] == RunConfig.defaults()


def test_bad_strategy_is_a_setting_error_naming_key_and_choices():
    with pytest.raises(SettingError) as info:
        RunConfig.from_run_config({"atlas-dir": "/a", "strategy": "bogus"})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("setting check failed") and "strategy" in msg
    assert all(s in msg for s in STRATEGIES)


@pytest.mark.parametrize("key,value", [("num-server-rounds", 0), ("round-timeout", 0), ("serve-port", 70000),
                                       ("epochs", -1), ("no-such-key", 1)])
def test_out_of_range_or_unknown_keys_are_refused(key, value):
    with pytest.raises(SettingError, match=key):
        RunConfig.from_run_config({"atlas-dir": "/a", key: value})


def test_env_fills_atlas_dir_and_url(monkeypatch):
    monkeypatch.setenv("FEDARCHES_ATLAS_DIR", "/srv/atlas")
    monkeypatch.setenv("FEDARCHES_ATLAS_URL", "http://h:1/")
    cfg = RunConfig.from_run_config({"num-server-rounds": 2})
    assert cfg.atlas_path == Path("/srv/atlas") and cfg.atlas_url == "http://h:1"
    assert cfg.num_server_rounds == 2
    monkeypatch.delenv("FEDARCHES_ATLAS_DIR")
    with pytest.raises(SettingError, match="atlas-dir"):
        RunConfig.from_run_config({})


class _Grid:
    """Flower's Grid interface, recording what the coordinator would send."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001
        self.sent.extend(messages)
        return []


def test_coordinator_refuses_a_bad_strategy_before_asking_any_site(tmp_path):
    grid = _Grid()
    with pytest.raises(SettingError, match="strategy"):
        run_coordinator(grid, {"atlas-dir": str(tmp_path), "strategy": "bogus"}, run_id=1)  # type: ignore[arg-type]
    assert grid.sent == []
