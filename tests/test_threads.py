"""The thread policy (fedarches.threads): one setting reaches every pool, and the
previous values come back once a call returns."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from fedarches.config import TrainConfig
from fedarches.errors import SettingError
from fedarches.threads import (
    DEFAULT_THREADS,
    active_threads,
    check_threads,
    policy_workers,
    thread_limits,
)


def _native_counts() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info()]


@pytest.fixture
def two_threads():
    """Every pool at 2 before the test, whatever the suite set; the suite's count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(limits=2):
            yield
    finally:
        torch.set_num_threads(before)


def test_limits_apply_to_every_pool_and_are_restored(two_threads):
    outside = _native_counts()
    with thread_limits(1, "inference") as n:
        assert n == 1 and active_threads() == 1
        assert torch.get_num_threads() == 1
        assert set(_native_counts()) == {1}
    assert torch.get_num_threads() == 2
    assert _native_counts() == outside
    assert active_threads() is None


def test_default_is_the_measured_one_per_job(two_threads):
    with thread_limits(None, "training") as n:
        assert n == DEFAULT_THREADS["training"] == torch.get_num_threads()
    with thread_limits(None, "inference") as n:  # None: every pool left as it was
        assert n == DEFAULT_THREADS["inference"]
        assert torch.get_num_threads() == 2


def test_restored_when_the_block_raises(two_threads):
    with pytest.raises(RuntimeError), thread_limits(1, "training"):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2 and active_threads() is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_invalid_counts_are_setting_errors(bad):
    with pytest.raises(SettingError, match="^setting check failed: threads"):
        check_threads(bad)
    with pytest.raises(SettingError), thread_limits(bad, "training"):
        pass


def test_unknown_job_is_a_setting_error():
    with pytest.raises(SettingError, match="unknown thread job"), thread_limits(1, "plotting"):
        pass


def test_threads_reach_the_training_loop(tiny_data, trvae_model, two_threads):
    from fedarches.model import _prepare
    from fedarches.training import MatrixSource, copy_module, train

    ref, _ = tiny_data
    data, _ = _prepare(ref, "trvae", trvae_model.genes, "study", None)
    seen: list[int] = []
    for threads in (2, 1, None):
        module = copy_module(trvae_model.module)
        for layer in module.modules():  # the loss calls the layers, not module.forward
            layer.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        index = {c: i for i, c in enumerate(module.conditions)}
        cond = np.array([index[c] for c in data.conditions], dtype=np.int64)
        source = MatrixSource(module, data.x, cond, data.library)
        cfg = TrainConfig(epochs=1, seed=0, threads=threads)
        train(module, source, module.set_trainable(None), cfg, query=False, progress=False)
        expected = threads if threads is not None else DEFAULT_THREADS["training"]
        assert seen and set(seen) == {expected}
        seen.clear()
        assert torch.get_num_threads() == 2


def test_train_reference_refuses_a_bad_count_before_training(tiny_data):
    from fedarches.model import FedArchesModel

    with pytest.raises(SettingError, match="threads"):
        FedArchesModel.train_reference(tiny_data[0], "study", kind="trvae", n_genes=0,
                                       train=TrainConfig(epochs=1, threads=0), progress=False)


def test_embed_and_label_transfer_follow_threads(trvae_model, tiny_data, two_threads):
    """An explicit count also reaches the neighbour search's own pools (policy_workers)."""
    index = trvae_model.reference.transfer.index
    assigned = index.workers
    with thread_limits(1, "inference"):
        assert index.workers == 1
    assert index.workers == assigned
    ref, _ = tiny_data
    a = trvae_model.get_latent(ref, threads=1)
    assert np.array_equal(a, trvae_model.get_latent(ref))
    assert torch.get_num_threads() == 2


def test_policy_workers_is_the_assigned_value_outside_a_block():
    class Search:
        workers = policy_workers()

        def __init__(self, workers: int) -> None:
            self.workers = workers

    s = Search(7)
    assert s.workers == 7
    with thread_limits(3, "inference"):
        assert s.workers == 3
    assert s.workers == 7


def test_cli_parses_a_bad_count_into_a_setting_error(tiny_data, tmp_path, capsys):
    from fedarches.cli import main

    path = tmp_path / "ref.h5ad"
    tiny_data[0].write_h5ad(path)
    rc = main(["train-reference", "--data", str(path), "--condition-key", "study", "--n-genes", "0",
               "--epochs", "1", "--out", str(tmp_path / "m"), "--threads", "0", "--quiet"])
    assert rc == 2
    assert "setting check failed: threads" in capsys.readouterr().err


def _wait_policy(prelude: str, env: dict[str, str]) -> str:
    code = (f"{prelude}; import os; from fedarches.threads import prefer_passive_wait; prefer_passive_wait(); "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    full = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_passive_wait_only_before_torch_and_never_over_the_users_choice():
    assert _wait_policy("pass", {}) == "PASSIVE"
    assert _wait_policy("pass", {"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    assert _wait_policy("import torch", {}) == "None"
