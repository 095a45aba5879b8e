"""Start, use and stop a Flower federation on this machine.

Used by ``fedarches demo``, the Flower tests and ``examples/flower-deployment``.
Everything here drives Flower's own executables (``flower-superlink``,
``flower-supernode``, ``flwr``); nothing imitates them:

- `SuperLink`: a ``flower-superlink`` process, either a deployment SuperLink
  (TLS with our certificates, ``--enable-supernode-auth``) or a simulation one
  (``--simulation``: ``flwr run`` then simulates the SuperNodes with Ray).
  Always ``--disable-runtime-dependency-installation``: the app's dependencies are
  the environment's, so the SuperLink never runs ``uv sync``.
- `SuperNode`: a ``flower-supernode`` process with its node config (a TOML file),
  TLS root certificate and authentication key.
- `FlwrCLI`: the ``flwr`` command with a private ``FLWR_HOME`` whose
  ``config.toml`` names the SuperLink connections, so the user's ``~/.flwr`` is
  never read or written.

Every process is started in its own session and stopped by its own id (SIGTERM
to its process group, then SIGKILL after a grace period), which also ends the
SuperExec/ServerApp/ClientApp children Flower starts under it. Ports are always
explicit; `free_port` picks an unused loopback port.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedarches.federation.certs import TLSFiles

# Environment every Flower process we start gets: no telemetry, no update check,
# no Ray usage stats, one thread per process (2-core machines run several).
QUIET_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}

_RUN_ID = re.compile(r"Successfully started run (\d+)")


class FlowerProcessError(RuntimeError):
    """A Flower process did not start, or a ``flwr`` command failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on ``host`` (the OS picks; the caller passes it explicitly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_bin(name: str) -> str:
    """Path of a Flower executable installed next to this Python, else the name on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(extra: Mapping[str, str] | None = None, flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update(extra)
    return env


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


@dataclass
class ManagedProcess:
    """One process we started, in its own session, logging to a file."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=str(self.cwd) if self.cwd else None,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log_path, n)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM our process group, wait ``grace`` seconds, then SIGKILL it."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the group id is our child's pid
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Children of the group (SuperExec, app processes) may outlive the leader.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=grace)


@dataclass
class SuperLink:
    """A ``flower-superlink`` on loopback.

    Deployment: pass ``tls`` (and usually ``supernode_auth=True``). Simulation:
    ``simulation=True`` (insecure; ``flwr run`` simulates the SuperNodes).
    Fleet, Control and Runtime APIs share one port in Flower 1.42.
    """

    workdir: Path
    port: int
    host: str = "127.0.0.1"
    tls: TLSFiles | None = None
    supernode_auth: bool = False
    simulation: bool = False
    database: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: ManagedProcess | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [flower_bin("flower-superlink")]
        if self.tls is None:
            if self.supernode_auth:
                raise ValueError("SuperNode authentication needs TLS: pass tls=make_tls_certificates(...)")
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
            ]
        if self.supernode_auth:
            cmd.append("--enable-supernode-auth")
        if self.simulation:
            cmd.append("--simulation")
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        cmd += [
            "--disable-runtime-dependency-installation",
            "--isolation", "subprocess",
            "--host", self.host,
            "--port", str(self.port),
        ]
        return cmd

    def connection(self) -> dict[str, Any]:
        """This SuperLink as a ``[superlink.NAME]`` table of the flwr ``config.toml``."""
        if self.tls is None:
            return {"address": self.address, "insecure": True}
        return {"address": self.address, "root-certificates": str(self.tls.ca_cert.resolve())}

    def start(self, timeout: float = 60.0) -> "SuperLink":
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir / "flwr-home-superlink"
        self.process = ManagedProcess(
            "superlink",
            self.command(),
            self.workdir / "superlink.log",
            flower_env(self.env, flwr_home=home),
            cwd=self.workdir,
        ).start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import httpx

        scheme = "https" if self.tls else "http"
        verify: Any = str(self.tls.ca_cert) if self.tls else False
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if not self.process.running():
                raise FlowerProcessError(
                    f"flower-superlink exited with code {self.process.proc.returncode if self.process.proc else '?'}:\n"
                    + self.process.log_tail()
                )
            try:
                if httpx.get(f"{scheme}://{self.address}/health", verify=verify, timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise FlowerProcessError(f"flower-superlink not ready on {self.address} after {timeout:.0f}s:\n"
                                 + self.process.log_tail())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class SuperNode:
    """A ``flower-supernode`` connected to a SuperLink, with its own node config."""

    name: str
    workdir: Path
    superlink: str
    port: int
    node_config: dict[str, Any]
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: ManagedProcess | None = field(default=None, init=False)

    def node_config_file(self) -> Path:
        path = self.workdir / f"node-config-{self.name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(self.node_config))
        return path

    def command(self) -> list[str]:
        cmd = [flower_bin("flower-supernode"), "--superlink", self.superlink]
        if self.root_certificates is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.root_certificates)]
        if self.auth_private_key is not None:
            cmd += ["--auth-supernode-private-key", str(self.auth_private_key)]
        cmd += [
            "--node-config", str(self.node_config_file()),
            "--isolation", "subprocess",
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]
        return cmd

    def start(self) -> "SuperNode":
        home = self.workdir / f"flwr-home-{self.name}"
        self.process = ManagedProcess(
            f"supernode-{self.name}",
            self.command(),
            self.workdir / f"supernode-{self.name}.log",
            flower_env(self.env, flwr_home=home),
            cwd=self.workdir,
        ).start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class RunResult:
    run_id: int | None
    status: str  # e.g. "finished:completed", "finished:failed"
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class FlwrCLI:
    """The ``flwr`` command with a private FLWR_HOME (its own ``config.toml``)."""

    def __init__(self, home: Path, env: Mapping[str, str] | None = None) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(env, flwr_home=self.home)
        self.connections: dict[str, dict[str, Any]] = {}

    def add_connection(self, name: str, connection: Mapping[str, Any], default: bool = True) -> None:
        self.connections[name] = dict(connection)
        doc: dict[str, Any] = {"superlink": dict(self.connections)}
        if default:
            doc["superlink"]["default"] = name
        (self.home / "config.toml").write_text(tomli_w.dumps(doc))

    def run_cmd(self, args: list[str], timeout: float = 120.0, cwd: Path | None = None,
                echo: bool | Callable[[str], None] = False) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS``. ``echo``: True copies its output to our stdout as it comes,
        a callable gets every line; either way the whole output is returned."""
        cmd = [flower_bin("flwr"), *args]
        if not echo:
            return subprocess.run(cmd, env=self.env, cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        # Stream while keeping a copy; a timer ends the command at the deadline even
        # when it prints nothing.
        proc = subprocess.Popen(cmd, env=self.env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        expired = threading.Event()

        def _expire() -> None:
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

        timer = threading.Timer(timeout, _expire)
        timer.daemon = True
        timer.start()
        out: list[str] = []
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                out.append(line)
                if callable(echo):
                    echo(line)
                else:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            proc.wait(timeout=30)
        except BaseException:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            raise
        finally:
            timer.cancel()
        if expired.is_set():
            raise subprocess.TimeoutExpired(cmd, timeout, output="".join(out))
        return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "")

    def _json(self, args: list[str], timeout: float = 60.0) -> dict[str, Any]:
        res = self.run_cmd([*args, "--format", "json"], timeout=timeout)
        text = res.stdout.strip()
        start = text.find("{")
        try:
            data = json.loads(text[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            data = {}
        if res.returncode != 0 or not data.get("success", False):
            raise FlowerProcessError(f"flwr {' '.join(args)} failed (exit {res.returncode}):\n"
                                     f"{res.stdout}\n{res.stderr}")
        return data

    def register_supernode(self, public_key: Path, connection: str, name: str | None = None) -> int:
        args = ["supernode", "register", str(public_key), connection]
        if name:
            args += ["--name", name]
        return int(self._json(args)["node-id"])

    def supernodes(self, connection: str) -> list[dict[str, Any]]:
        return list(self._json(["supernode", "ls", connection]).get("nodes", []))

    def wait_online(self, connection: str, count: int, timeout: float = 60.0,
                    processes: list[SuperNode] | None = None) -> list[int]:
        deadline = time.monotonic() + timeout
        online: list[int] = []
        while time.monotonic() < deadline:
            for sn in processes or []:
                if sn.process is not None and not sn.process.running():
                    raise FlowerProcessError(f"SuperNode {sn.name} exited:\n{sn.process.log_tail()}")
            online = [int(n["node-id"]) for n in self.supernodes(connection) if n.get("status") == "online"]
            if len(online) >= count:
                return online
            time.sleep(0.5)
        raise FlowerProcessError(f"only {len(online)} of {count} SuperNodes online after {timeout:.0f}s")

    def run_status(self, connection: str, run_id: int) -> str:
        data = self._json(["ls", connection, "--run-id", str(run_id)])
        runs = data.get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def run(
        self,
        app_dir: Path,
        connection: str,
        run_config: Mapping[str, Any] | None = None,
        federation_config: Mapping[str, Any] | None = None,
        timeout: float = 1800.0,
        echo: bool | Callable[[str], None] = False,
    ) -> RunResult:
        """``flwr run APP_DIR CONNECTION --stream`` with run config overrides (written as a
        TOML file, so any path or string survives quoting); returns the final status."""
        args = ["run", str(app_dir), connection, "--stream"]
        if run_config:
            cfg_file = self.home / f"run-config-{time.time_ns()}.toml"
            cfg_file.write_text(tomli_w.dumps(dict(run_config)))
            args += ["--run-config", str(cfg_file)]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
        t0 = time.monotonic()
        res = self.run_cmd(args, timeout=timeout, cwd=app_dir, echo=echo)
        output = res.stdout + res.stderr
        m = _RUN_ID.search(output)
        if res.returncode != 0 or m is None:
            raise FlowerProcessError(f"flwr run failed (exit {res.returncode}):\n{output[-4000:]}")
        run_id = int(m.group(1))
        status = "unknown"
        # The log stream ends when the run does; the status may lag a moment.
        for _ in range(50):
            status = self.run_status(connection, run_id)
            if status.startswith("finished"):
                break
            time.sleep(0.2)
        return RunResult(run_id=run_id, status=status, output=output, seconds=time.monotonic() - t0)


def _toml_value(v: Any) -> str:
    return tomli_w.dumps({"v": v}).split("=", 1)[1].strip()


# --------------------------------------------------------------------------- whole federations


@dataclass
class LocalFederation:
    """A running SuperLink (+ SuperNodes in deployment) and a ``flwr`` CLI pointed at it."""

    cli: FlwrCLI
    connection: str
    superlink: SuperLink
    supernodes: list[SuperNode] = field(default_factory=list)
    simulation: bool = False

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any] | None = None,
        *,
        num_supernodes: int | None = None,
        parallel: int | None = None,
        timeout: float = 1800.0,
        echo: bool | Callable[[str], None] = False,
    ) -> RunResult:
        """``parallel`` (simulation): how many simulated SuperNodes run their ClientApp
        at once. Default: one per core (two train at once on two cores); more lets
        sites that only wait (a hung one) not keep the others queued."""
        fed: dict[str, Any] | None = None
        if self.simulation:
            if not num_supernodes:
                raise ValueError("a simulation run needs num_supernodes")
            # One Ray CPU per ClientApp; telling Ray of more CPUs than cores runs more at once.
            fed = {"num-supernodes": int(num_supernodes), "client-resources-num-cpus": 1}
            if parallel:
                fed["init-args-num-cpus"] = int(parallel)
        return self.cli.run(app_dir, self.connection, run_config, fed, timeout=timeout, echo=echo)

    def stop(self) -> None:
        for sn in self.supernodes:
            sn.stop()
        self.superlink.stop()


def start_simulation(workdir: str | Path, env: Mapping[str, str] | None = None) -> LocalFederation:
    """A simulation SuperLink on a free loopback port; ``run(..., num_supernodes=N)``
    then simulates N SuperNodes with Ray (each sees only ``partition-id``)."""
    work = Path(workdir)
    link = SuperLink(work / "superlink", port=free_port(), simulation=True, env=dict(env or {})).start()
    cli = FlwrCLI(work / "flwr-home", env=env)
    cli.add_connection("fedarches-sim", link.connection())
    return LocalFederation(cli=cli, connection="fedarches-sim", superlink=link, simulation=True)


def start_deployment(
    workdir: str | Path,
    node_configs: Mapping[str, Mapping[str, Any]],
    *,
    env: Mapping[str, str] | None = None,
    online_timeout: float = 90.0,
) -> LocalFederation:
    """A deployment on loopback: TLS certificates (our CA), a SuperLink with
    ``--enable-supernode-auth``, one registered, authenticated SuperNode per entry
    of ``node_configs`` (name -> node config), all online before this returns."""
    from fedarches.federation.certs import make_supernode_keys, make_tls_certificates

    work = Path(workdir)
    tls = make_tls_certificates(work / "certs")
    link = SuperLink(work / "superlink", port=free_port(), tls=tls, supernode_auth=True,
                     env=dict(env or {})).start()
    fed = LocalFederation(cli=FlwrCLI(work / "flwr-home", env=env), connection="fedarches-tls", superlink=link)
    try:
        fed.cli.add_connection(fed.connection, link.connection())
        for name, node_config in node_configs.items():
            keys = make_supernode_keys(work / "certs" / "supernodes", name)
            fed.cli.register_supernode(keys.public_key, fed.connection, name=name)
            fed.supernodes.append(
                SuperNode(name, work / "supernodes", link.address, free_port(), dict(node_config),
                          root_certificates=tls.ca_cert, auth_private_key=keys.private_key,
                          env=dict(env or {})).start()
            )
        fed.cli.wait_online(fed.connection, len(node_configs), timeout=online_timeout, processes=fed.supernodes)
    except BaseException:
        fed.stop()
        raise
    return fed
