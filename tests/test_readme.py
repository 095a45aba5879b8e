"""The README's command lines and Python example, run as written on small data.

The commands are read from README.md itself, so the README cannot drift from
what works. Substitutions, all for speed or for the loopback port only: the
data files are small generated ones, training commands get ``--epochs 3
--threads 1 --quiet``, and port 8765 becomes a free port. ``fedarches demo``
lines are left to tests/test_demo.py (they take minutes); Flower's own
commands (``flower-superlink``, ``flwr``) to tests/test_federation.py.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedarches.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINS = {("atlas", "build"), ("train-reference",), ("map",), ("site", "map")}

pytestmark = pytest.mark.slow


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def fedarches_commands(block: str) -> list[list[str]]:
    """Every ``fedarches ...`` command of a bash block (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("fedarches "):
            out.append(shlex.split(line))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _adapt(argv: list[str], port: int) -> list[str]:
    argv = [a.replace("8765", str(port)) for a in argv]
    if tuple(argv[1:3]) in TRAINS or tuple(argv[1:2]) in TRAINS:
        argv += ["--epochs", "3", "--threads", "1", "--quiet"]
    return argv


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from fedarches.data.simulate import simulate

    adata = simulate(n_cells=500, n_genes=150, n_cell_types=3, n_studies=3, seed=4)
    study = adata.obs["study"].astype(str)
    adata[study.isin(["study_0", "study_1"]).to_numpy()].copy().write_h5ad(tmp_path / "ref.h5ad")
    adata[(study == "study_2").to_numpy()].copy().write_h5ad(tmp_path / "query.h5ad")
    adata[(study == "study_2").to_numpy()].copy().write_h5ad(tmp_path / "mine.h5ad")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDARCHES_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _run_block(block: str, port: int) -> list[subprocess.Popen]:
    servers = []
    for argv in fedarches_commands(block):
        argv = _adapt(argv, port)
        if argv[1] == "demo":
            continue
        if argv[1:3] == ["atlas", "serve"]:
            cmd = [sys.executable, "-c", "import sys; from fedarches.cli import main; sys.exit(main())",
                   *[a for a in argv[1:] if a != "&"]]
            servers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_http(f"http://127.0.0.1:{port}/metadata/1.root.json")
            continue
        assert main(argv[1:]) == 0, f"README command failed: {' '.join(argv)}"
    return servers


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"atlas serve did not answer at {url}")


def test_readme_has_the_commands_it_promises():
    blocks = readme_blocks("bash")
    commands = [tuple(c[1:3]) for b in blocks for c in fedarches_commands(b)]
    for expected in [("atlas", "init"), ("atlas", "build"), ("atlas", "serve"), ("site", "keygen"),
                     ("atlas", "enroll"), ("site", "fetch"), ("site", "map"), ("atlas", "merge"),
                     ("train-reference", "--data"), ("map", "--model"), ("embed", "--model")]:
        assert expected in commands, f"README lost `fedarches {' '.join(expected)}`"


def test_readme_walkthrough_runs_as_written(workdir, capsys):
    port = _free_port()
    workflow = next(b for b in readme_blocks("bash") if "atlas init" in b)
    servers = _run_block(workflow, port)
    try:
        out = capsys.readouterr().out
        assert "published version 2" in out
        assert (workdir / "site-a" / "umap.png").is_file()
        assert (workdir / "site-a" / "embedded.h5ad").is_file()
        cache = workdir / "cache" / "sites"
        assert len(list(cache.iterdir())) == 1, "the site's trust cache is not its own"
    finally:
        for s in servers:
            s.terminate()
            s.wait(timeout=10)


def test_readme_single_machine_commands_and_python_example_run(workdir):
    single = next(b for b in readme_blocks("bash") if "train-reference" in b)
    _run_block(single, _free_port())
    assert (workdir / "mapped" / "query.h5ad").is_file() and (workdir / "mapped-umap.png").is_file()
    (example,) = [b for b in readme_blocks("python") if "train_reference" in b]
    example = example.replace("TrainConfig(threads=1)", "TrainConfig(threads=1, epochs=3)")
    example = example.replace("MapSettings(threads=1)", "MapSettings(threads=1, epochs=3)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", example], cwd=workdir, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cell_type_pred" in res.stdout and "e-16" not in res.stdout
    assert (workdir / "mapped_model" / "manifest.json").is_file()
