"""The site's job in its own process, stopped at the round's deadline.

Why a separate process: a ClientApp that never returns holds its SuperNode, and in
simulation it holds the whole run, because Flower's engine waits for a ClientApp
without a timeout and stops only between messages. A Python thread cannot be
stopped, and a job stuck in native code holds the ClientApp's process with it; a
process can be killed. The job process is started fresh (``python -m``), not
forked: the ClientApp runs inside a Ray actor or a SuperNode's app process, whose
threads' locks a fork would copy in whatever state they are. It is kept warm for
the ClientApp process's next jobs (`_JobProcess`) until it is killed or dies.

The deadline is the request's time-to-live (the coordinator sets it to the round
timeout) less a margin for the reply to travel back. At the deadline the ClientApp
kills the job and answers ``failed`` with a `DeadlineError`, so the coordinator
records the site by name. The job process also guards itself: it dies with its
parent (Linux ``PR_SET_PDEATHSIG``) and at the deadline plus a grace period
(``SIGALRM``, which the kernel delivers even to a process stuck in native code).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict
from pathlib import Path

from fedarches.atomic import PRIVATE_DIR, make_dirs
from fedarches.errors import DeadlineError, FedarchesError
from fedarches.federation.protocol import MapReply, MapRequest, SiteConfig

JOB_FILE = "job.json"
REPLY_FILE = "reply.json"
BUNDLE_FILE = "bundle.safetensors"
#: Seconds after the deadline at which the job process ends itself if nobody killed it.
SELF_KILL_GRACE = 5
#: The job's environment: one thread per pool, idle OpenMP workers sleep.
JOB_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


class SiteProcessError(RuntimeError):
    """The site's job process ended without a reply (a bug or a crash): reported as a Flower ``Error``."""


def reply_margin(ttl: float) -> float:
    """Time kept back from the time-to-live for the reply to reach the coordinator."""
    return min(10.0, max(1.0, 0.1 * ttl))


def request_deadline(created_at: float, ttl: float) -> float:
    """The wall-clock time (``time.time()``) by which a request's reply must be sent."""
    return created_at + ttl - reply_margin(ttl)


class _JobProcess:
    """A warm job process, kept by the ClientApp's process for its next jobs.

    Reused until it is killed at a deadline or dies: a simulated federation runs many
    sites' jobs through each ClientApp process, and importing the site's libraries
    costs more CPU than a small site's mapping. Jobs go in as folder names on one
    pipe and come back as "done" on another (its stdout and stderr stay the logs')."""

    def __init__(self) -> None:
        job_r, self._job_w = os.pipe()
        self._done_r, done_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedarches.federation.worker", "--serve", str(job_r), str(done_w),
                 str(os.getpid())],
                env={**os.environ, **JOB_ENV}, stdin=subprocess.DEVNULL, pass_fds=(job_r, done_w))
        finally:
            os.close(job_r)
            os.close(done_w)

    def run(self, jobdir: Path, deadline: float) -> int | None:
        """Exit code 0 when the job replied, the process's code when it died, None at the deadline."""
        try:
            os.write(self._job_w, f"{jobdir}\n".encode())
        except OSError:  # it died since its last job
            return self.proc.wait()
        while (left := deadline - time.time()) > 0:
            ready, _, _ = select.select([self._done_r], [], [], left)
            if ready:
                return 0 if os.read(self._done_r, 64) else self.proc.wait()
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for fd in (self._job_w, self._done_r):
            with contextlib.suppress(OSError):
                os.close(fd)


_warm: _JobProcess | None = None
_lock = threading.Lock()


def run_site_job(site: SiteConfig, request: MapRequest, deadline: float) -> MapReply:
    """Run `site_job.handle_request` in the job process; kill it at ``deadline``.

    Returns the job's reply (``failed`` for a failed check or the deadline); raises
    `SiteProcessError` when the job crashed."""
    global _warm
    started = time.time()
    if deadline <= started:
        return _late(site, request, started, started)
    jobs = site.results_dir / ".jobs"
    _sweep(jobs)
    jobdir = jobs / f"round-{request.round}-{uuid.uuid4().hex[:12]}"
    make_dirs(jobs, PRIVATE_DIR)
    jobdir.mkdir(mode=PRIVATE_DIR, exist_ok=False)
    os.chmod(jobdir, PRIVATE_DIR)  # whatever the umask
    with _lock:
        try:
            _write_job(jobdir, site, request, deadline)
            if _warm is not None and _warm.proc.poll() is not None:  # died while idle
                _warm.close()
                _warm = None
            if _warm is None:
                _warm = _JobProcess()
            code = _warm.run(jobdir, deadline)
            if code != 0:  # killed at the deadline, or died: never reused
                _warm.close()
                _warm = None
            if code is None:
                return _late(site, request, started, time.time())
            return _read_reply(jobdir, code, site.site)
        finally:
            shutil.rmtree(jobdir, ignore_errors=True)


def _sweep(jobs: Path) -> None:
    """Remove job folders a killed ClientApp process left (every other end removes its
    own): a site runs one job at a time, so any folder there now is a leftover."""
    if jobs.is_dir():
        for old in jobs.iterdir():
            shutil.rmtree(old, ignore_errors=True)


def _late(site: SiteConfig, request: MapRequest, started: float, stopped: float) -> MapReply:
    err = DeadlineError(
        f"deadline check failed: site {site.site} did not finish round {request.round} before the round's "
        f"deadline; its job was stopped after {stopped - started:.0f}s and sent nothing"
    )
    return MapReply.failed(site.site, err)


def _write_job(jobdir: Path, site: SiteConfig, request: MapRequest, deadline: float) -> None:
    req = asdict(request)
    req["trust_root"] = base64.b64encode(request.trust_root).decode()
    job = {"site": site.to_node_config(), "request": req, "deadline": deadline}
    (jobdir / JOB_FILE).write_text(json.dumps(job))


def _read_reply(jobdir: Path, code: int, site: str) -> MapReply:
    path = jobdir / REPLY_FILE
    if not path.is_file():
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise SiteProcessError(f"internal error at site {site}: its job process ended with {how} and no reply")
    data = json.loads(path.read_text())
    if "internal" in data:
        raise SiteProcessError(f"internal error at site {site}: {data['internal']}")
    bundle = jobdir / BUNDLE_FILE
    data["bundle"] = bundle.read_bytes() if bundle.is_file() else b""
    data["conditions"] = tuple(data.get("conditions", ()))
    return MapReply(**data)


# --------------------------------------------------------------------------- the job process


def _guard(parent: int) -> None:
    """Die with the parent (each job also sets an alarm at its deadline plus grace)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the guard was set
        os._exit(1)


def _reply_record(reply: MapReply, jobdir: Path) -> dict[str, object]:
    if reply.bundle:
        (jobdir / BUNDLE_FILE).write_bytes(reply.bundle)
    data = asdict(reply)
    data.pop("bundle")
    return data


def _run_job(jobdir: Path) -> None:
    job = json.loads((jobdir / JOB_FILE).read_text())
    signal.alarm(max(1, math.ceil(float(job["deadline"]) - time.time()) + SELF_KILL_GRACE))
    from fedarches.federation.site_job import handle_request

    site = SiteConfig.from_mapping(job["site"])
    req = dict(job["request"])
    req["trust_root"] = base64.b64decode(req["trust_root"])
    try:
        record = _reply_record(handle_request(site, MapRequest(**req)), jobdir)
    except FedarchesError as exc:
        record = _reply_record(MapReply.failed(site.site, exc), jobdir)
    except Exception as exc:  # a bug or a broken environment: the ClientApp reports a Flower Error
        traceback.print_exc()
        record = {"internal": f"{type(exc).__name__}: {exc}"}
    signal.alarm(0)
    tmp = jobdir / (REPLY_FILE + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, jobdir / REPLY_FILE)


def serve(job_fd: int, done_fd: int, parent: int) -> int:
    """The job process: run each job folder named on ``job_fd``, answer "done" on ``done_fd``."""
    _guard(parent)
    import fedarches.federation.site_job  # noqa: F401  (load the site's libraries while nobody waits)
    from fedarches.threads import limit_process_threads

    limit_process_threads(1)
    with os.fdopen(job_fd, "rb", buffering=0) as jobs:
        for line in iter(jobs.readline, b""):
            _run_job(Path(line.decode().strip()))
            os.write(done_fd, b"done\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--serve"] or len(sys.argv) != 5:
        sys.exit("usage: python -m fedarches.federation.worker --serve JOB_FD DONE_FD PARENT_PID "
                 "(started by the ClientApp)")
    sys.exit(serve(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
