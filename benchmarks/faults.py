"""Faults at federation scale: a simulated Flower federation where some sites crash,
hang or send garbage in every round.

    PYTHONPATH=src FEDARCHES_DATA=../shared/data .venv/bin/python benchmarks/faults.py \
        --sites 50 --rounds 3 --round-timeout 300 --work /tmp/faults

Each site is a simulated SuperNode (Flower's simulation engine, Ray) with its own
small generated data (``fedarches.data.simulate``: a few studies of tens of cells,
200 genes), its own enrolled key and one study mapped per round. Every fifth site
is faulty: its node config's ``fault`` makes its real job process raise (crash),
die by SIGKILL (kill), sleep past the deadline (hang) or send its signed bundle
with flipped bytes (garbage), mid-round, in every round. Printed: each round's wall
time against its timeout, published against expected contributions (exactly the
valid ones, by site), and the peak resident memory of the coordinator's process
and of the whole process tree (SuperLink, engine, Ray, ClientApps, site jobs),
sampled twice a second. The exit code is 1 when a check fails.

`tests/test_federation_faults.py` runs a 10-site version of the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAULT_KINDS = ("hang", "crash", "garbage", "kill")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Federation:
    """A published atlas and its sites, each with its data, key and (maybe) fault."""

    work: Path
    atlas_dir: Path
    sites: list[Any]  # protocol.SiteConfig
    studies: dict[str, list[str]]  # site -> its studies, in the order it maps them

    def faulty(self, rnd: int) -> set[str]:
        return {s.site for s in self.sites if s.fault_in(rnd)}


def spread_faults(n_sites: int, every: int = 5, kinds: tuple[str, ...] = FAULT_KINDS) -> dict[int, str]:
    """Every ``every``-th site is faulty (1 / every of them), kinds in turn."""
    faulty = range(every - 1, n_sites, every)
    return {i: kinds[k % len(kinds)] for k, i in enumerate(faulty)}


def build_federation(work: Path, n_sites: int, faults: dict[int, str | tuple[str, tuple[int, ...]]], *,
                     studies_per_site: int = 3, cells_per_study: int = 40, n_genes: int = 200,
                     reference_studies: int = 4, site_epochs: int = 2, seed: int = 0) -> Federation:
    """Generate the data, train and publish the reference, enrol every site.

    ``faults``: site index -> fault kind (every round) or (kind, rounds)."""

    from fedarches.data.simulate import simulate
    from fedarches.federation.protocol import SiteConfig
    from fedarches.format.signing import keygen
    from fedarches.server import Atlas

    n_studies = reference_studies + n_sites * studies_per_site
    adata = simulate(n_cells=n_studies * cells_per_study, n_genes=n_genes, n_cell_types=3,
                     n_studies=n_studies, seed=seed, n_jobs=1)
    study = adata.obs["study"].astype(str).to_numpy()
    names = list(dict.fromkeys(study))
    ref = adata[[s in names[:reference_studies] for s in study]].copy()
    atlas = Atlas.init(work / "atlas", "faults-atlas")
    atlas.build(ref, "study", "cell_type", epochs=20, n_genes=0, threads=1)

    sites, studies = [], {}
    for i in range(n_sites):
        name = f"site-{i:02d}"
        d = work / "sites" / name
        d.mkdir(parents=True)
        held = names[reference_studies + i * studies_per_site:reference_studies + (i + 1) * studies_per_site]
        part = adata[[s in held for s in study]].copy()
        part.obs["study"] = [f"{name}:{s}" for s in part.obs["study"].astype(str)]
        part.obs["study"] = part.obs["study"].astype("category")
        part.write_h5ad(d / "data.h5ad")
        atlas.enroll(name, keygen(d / "keys").public)
        studies[name] = [f"{name}:{s}" for s in held]
        fault = faults.get(i, "")
        kind, rounds = (fault, ()) if isinstance(fault, str) else fault
        sites.append(SiteConfig(site=name, data=d / "data.h5ad", condition_key="study", key_dir=d / "keys",
                                out_dir=d / "results", epochs=site_epochs, conditions_per_round=1,
                                fault=kind, fault_rounds=tuple(rounds)))
    return Federation(work=work, atlas_dir=atlas.path, sites=sites, studies=studies)


# --------------------------------------------------------------------------- memory


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(pid))
    return tree


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class MemorySampler:
    """Peak RSS of a process tree (and of its coordinator process) while a run goes on.

    The coordinator is the process that runs the ServerApp: in simulation Flower runs
    it in ``flwr-simulation``, beside the engine's driver."""

    root: int
    report: Path
    interval: float = 0.5
    peak_total: int = 0
    peak_processes: int = 0
    coordinator_by_round: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _rounds_done(self) -> int:
        try:
            return len(json.loads(self.report.read_text()).get("rounds", []))
        except (OSError, ValueError):
            return 0

    def _sample(self) -> None:
        tree, todo, pids = _children(), [self.root], []
        while todo:
            p = todo.pop()
            pids.append(p)
            todo.extend(tree.get(p, []))
        total = sum(_rss(p) for p in pids)
        self.peak_total = max(self.peak_total, total)
        self.peak_processes = max(self.peak_processes, len(pids))
        coord = max((_rss(p) for p in pids if "flwr-simulation" in _cmdline(p)), default=0)
        if coord:
            rnd = self._rounds_done() + 1
            self.coordinator_by_round[rnd] = max(self.coordinator_by_round.get(rnd, 0), coord)

    def start(self) -> "MemorySampler":
        def loop() -> None:
            while not self._stop.wait(self.interval):
                self._sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --------------------------------------------------------------------------- run and check


@dataclass
class Outcome:
    seconds: float  # `flwr run`, start to return
    report: dict[str, Any]
    new_by_round: list[set[tuple[str, str]]]  # (condition, site) each round's version added
    memory: MemorySampler
    flwr_ok: bool


def run_federation(fed: Federation, rounds: int, round_timeout: int, parallel: int = 6,
                   env: dict[str, str] | None = None) -> Outcome:
    from fedarches.federation.app_dir import write_app_dir
    from fedarches.federation.protocol import write_sim_sites
    from fedarches.server import Atlas
    from fedarches.testing.flower import start_simulation

    report = fed.work / "report.json"
    run_config = {"atlas-dir": str(fed.atlas_dir), "num-server-rounds": rounds, "report": str(report),
                  "round-timeout": round_timeout, "min-sites": len(fed.sites),
                  "sim-sites": str(write_sim_sites(fed.work / "sim-sites.toml", fed.sites))}
    flower = start_simulation(fed.work / "flower", env=env)
    memory = MemorySampler(flower.superlink.process.pid, report).start()
    try:
        result = flower.run(write_app_dir(fed.work / "app"), run_config, num_supernodes=len(fed.sites),
                            parallel=parallel, timeout=rounds * (round_timeout + 120) + 300)
    finally:
        memory.stop()
        flower.stop()
    rep = json.loads(report.read_text())
    atlas = Atlas(fed.atlas_dir)
    new_by_round, before = [], {(c.name, c.site) for c in atlas.version(1).conditions}
    for rnd in rep["rounds"]:
        now = set(before)
        for v in rnd["published"]:
            now |= {(c["name"], c["site"]) for c in v["conditions"]}
        new_by_round.append(now - before)
        before = now
    return Outcome(result.seconds, rep, new_by_round, memory, result.ok)


def expected_by_round(fed: Federation, rounds: int) -> list[set[tuple[str, str]]]:
    """What a correct run publishes: each round, the next study of every site that did not fault."""
    done = {s.site: 0 for s in fed.sites}
    out = []
    for rnd in range(1, rounds + 1):
        new = set()
        for s in fed.sites:
            if not s.fault_in(rnd) and done[s.site] < len(fed.studies[s.site]):
                new.add((fed.studies[s.site][done[s.site]], s.site))
                done[s.site] += 1
        out.append(new)
    return out


def problems(fed: Federation, out: Outcome, rounds: int, round_timeout: int) -> list[str]:
    """Every way the run missed the claim ("" list = it held)."""
    bad = [] if out.flwr_ok and out.report.get("status") == "completed" else [f"run status {out.report.get('status')}"]
    for i, (rnd, got, want) in enumerate(zip(out.report["rounds"], out.new_by_round,
                                             expected_by_round(fed, rounds), strict=False), 1):
        ask = rnd["wait_seconds"]
        if ask > round_timeout + 5:
            bad.append(f"round {i}: waited {ask:.0f}s for sites, timeout {round_timeout}s")
        if got != want:
            bad.append(f"round {i}: published {len(got)}, expected {len(want)}: "
                       f"missing {sorted(want - got)[:3]}, extra {sorted(got - want)[:3]}")
    if len(out.report["rounds"]) != rounds:
        bad.append(f"{len(out.report['rounds'])} of {rounds} rounds ran")
    return bad


def figures(fed: Federation, out: Outcome, rounds: int, round_timeout: int) -> str:
    mib = 1 / 2**20
    faults: dict[str, int] = {}
    for s in fed.sites:
        if s.fault:
            faults[s.fault] = faults.get(s.fault, 0) + 1
    lines = [f"sites: {len(fed.sites)} ({sum(faults.values())} faulty: "
             + ", ".join(f"{n} {k}" for k, n in sorted(faults.items())) + f"); rounds: {rounds}; "
             f"round timeout: {round_timeout}s; flwr run: {out.seconds:.0f}s",
             "", "| round | wall s | waiting for sites s | timeout s | published | expected | exact | site outcomes |",
             "|---|---|---|---|---|---|---|---|"]
    for i, (rnd, got, want) in enumerate(zip(out.report["rounds"], out.new_by_round,
                                             expected_by_round(fed, rounds), strict=False), 1):
        counts: dict[str, int] = {}
        for s in rnd["sites"]:
            key = s["status"] + (f" ({s['check']})" if s.get("check") else "")
            counts[key] = counts.get(key, 0) + 1
        lines.append(f"| {i} | {rnd['seconds']:.1f} | {rnd['wait_seconds']:.1f} | {round_timeout} | {len(got)} | {len(want)} | "
                     f"{'yes' if got == want else 'NO'} | "
                     + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " |")
    coord = out.memory.coordinator_by_round
    lines += ["", "peak RSS of the coordinator process (ServerApp + simulation engine), per round: "
              + ", ".join(f"round {r}: {v * mib:.0f} MiB" for r, v in sorted(coord.items()) if r <= rounds),
              f"peak RSS of the whole process tree: {out.memory.peak_total * mib:.0f} MiB "
              f"({out.memory.peak_processes} processes at most)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-timeout", type=int, default=300)
    p.add_argument("--fault-every", type=int, default=5, help="every N-th site is faulty (5: 20%%)")
    p.add_argument("--parallel", type=int, default=6, help="simulated SuperNodes running at once")
    p.add_argument("--work", type=Path, required=True, help="an empty or missing folder")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if any(a.work.iterdir()):
        p.error(f"{a.work} is not empty")
    for k, v in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                 "OMP_NUM_THREADS": "1"}.items():
        os.environ.setdefault(k, v)
    t0 = time.monotonic()
    fed = build_federation(a.work, a.sites, spread_faults(a.sites, a.fault_every))
    print(f"setup (data, reference, {a.sites} enrolments): {time.monotonic() - t0:.0f}s", flush=True)
    out = run_federation(fed, a.rounds, a.round_timeout, a.parallel)
    print(figures(fed, out, a.rounds, a.round_timeout))
    bad = problems(fed, out, a.rounds, a.round_timeout)
    print("\n" + ("all checks held" if not bad else "FAILED:\n" + "\n".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
