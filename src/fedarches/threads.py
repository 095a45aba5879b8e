"""One thread setting for every pool a fedarches computation touches.

Why this module exists: torch's intra-op pool, the BLAS libraries (MKL inside
torch, OpenBLAS under numpy/scipy and faiss), the OpenMP runtimes (torch's and
faiss' own libgomp), faiss and numba each keep their own thread count. Left at
their defaults they all use every core, and their OpenMP workers spin-wait
between the minibatch-sized products of training; beside any other CPU-bound
work that spinning steals the cores the computation needs, and training gets
several times slower. ``OMP_NUM_THREADS`` alone does not reach every pool.

``thread_limits(threads, job)`` applies ONE count to all of them for the
duration of a call and restores each library's previous value on exit, so a
user's own settings are what they were once our call returns. ``threads=None``
means the default measured for that ``job`` (``DEFAULT_THREADS``; figures and
method in docs/THREADS.md). An explicit count is also what the label-transfer
neighbour search uses while the block runs (``policy_workers``).

Waiting threads: OpenMP reads ``OMP_WAIT_POLICY`` once, when its runtime
initialises (at ``import torch``), so only a process fedarches starts itself can
choose passive waiting; ``prefer_passive_wait`` is called by the CLI before
anything imports torch. The Python API cannot change it after the user imported
torch; the default of one training thread leaves no OpenMP worker to spin.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

from fedarches.errors import SettingError

#: What each kind of work uses when ``threads`` is None; None = each library's own default (every core).
#: "training": minibatch training (reference and query); "inference": the encoder pass over all cells
#: and label transfer's neighbour search. Chosen by measurement: docs/THREADS.md.
DEFAULT_THREADS: dict[str, int | None] = {"training": 1, "inference": None}
JOBS = tuple(DEFAULT_THREADS)

_ACTIVE: ContextVar[int | None] = ContextVar("fedarches_threads", default=None)


def check_threads(threads: Any) -> int | None:
    """``threads`` as given, or a SettingError: None or a positive integer."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SettingError(f"setting check failed: threads must be a positive integer or None (the measured "
                           f"default), got {threads!r}")
    return threads


def resolve_threads(threads: int | None, job: str) -> int | None:
    """The count ``thread_limits`` applies: ``threads``, else the job's default (None: leave every pool)."""
    if job not in DEFAULT_THREADS:
        raise SettingError(f"setting check failed: unknown thread job {job!r}; choose one of {', '.join(JOBS)}")
    n = check_threads(threads)
    return n if n is not None else DEFAULT_THREADS[job]


def active_threads() -> int | None:
    """The count of the innermost ``thread_limits`` block around this call, or None outside one."""
    return _ACTIVE.get()


@contextmanager
def thread_limits(threads: int | None, job: str) -> Iterator[int | None]:
    """Every pool at ``threads`` (None: the job's measured default) inside the block; restored after.

    Yields the count applied (None: nothing was changed). The limits are
    process-wide (the libraries have no per-thread setting): do not run two
    fedarches computations with different counts in threads of one process.
    """
    n = resolve_threads(threads, job)
    if n is None:
        yield None
        return
    with ExitStack() as stack:
        stack.enter_context(_torch_threads(n))
        stack.enter_context(_native_threads(n))
        stack.enter_context(_faiss_threads(n))
        stack.enter_context(_numba_threads(n))
        token = _ACTIVE.set(n)
        stack.callback(_ACTIVE.reset, token)
        yield n


def limit_process_threads(threads: int) -> None:
    """Every pool at ``threads`` for the rest of the process, not restored.

    Only for processes fedarches owns (Flower ServerApp / ClientApp workers run
    one site each, in parallel, so one thread each).
    """
    n = check_threads(threads)
    if n is None:
        raise SettingError("setting check failed: limit_process_threads needs a thread count, got None")
    # Set, not entered: nothing is left to restore at interpreter exit, when the
    # libraries a restore would call may already be torn down.
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n)  # without ``with``: the limits stay
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    numba = sys.modules.get("numba")
    if numba is not None and hasattr(numba, "set_num_threads"):
        numba.set_num_threads(min(n, int(numba.config.NUMBA_NUM_THREADS)))


def prefer_passive_wait() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user set one, before the OpenMP runtime starts.

    Idle OpenMP workers then sleep instead of spinning. Only takes effect when
    no OpenMP runtime is loaded yet (checked via torch), so it is skipped,
    not half-applied, in a process that already imported torch.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class policy_workers:  # noqa: N801 (a descriptor, used like a field)
    """A ``workers`` attribute that follows an active ``thread_limits`` block.

    Inside a block the block's count is used; outside, the value assigned.
    Lets the neighbour search (its own thread pools: scipy's k-d tree, faiss)
    honour one setting without threading ``workers`` through every call.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_assigned"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        active = _ACTIVE.get()
        return active if active is not None else obj.__dict__[self._slot]

    def __set__(self, obj: Any, value: int) -> None:
        obj.__dict__[self._slot] = value


# ------------------------------------------------------------------ one pool each

@contextmanager
def _swap(get: Callable[[], int], set_: Callable[[int], Any], n: int) -> Iterator[None]:
    old = get()
    set_(n)
    try:
        yield
    finally:
        set_(old)


def _torch_threads(n: int) -> AbstractContextManager[None]:
    """torch intra-op (also sets MKL's and torch's libgomp count). The inter-op pool
    is left alone: it can be set once per process and fedarches never uses it."""
    import torch

    return _swap(torch.get_num_threads, torch.set_num_threads, n)


@contextmanager
def _native_threads(n: int) -> Iterator[None]:
    """BLAS and OpenMP libraries loaded in the process (OpenBLAS of numpy/scipy and faiss,
    every libgomp copy), via threadpoolctl, which restores them on exit."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n):
        yield


def _faiss_threads(n: int) -> AbstractContextManager[None]:
    """faiss' OpenMP count, when faiss is already imported (importing it here would cost time)."""
    faiss = sys.modules.get("faiss")
    return nullcontext() if faiss is None else _swap(faiss.omp_get_max_threads, faiss.omp_set_num_threads, n)


def _numba_threads(n: int) -> AbstractContextManager[None]:
    """numba's parallel pool, only when numba is already imported (UMAP pulls it in)."""
    numba = sys.modules.get("numba")
    if numba is None or not hasattr(numba, "set_num_threads"):
        return nullcontext()
    return _swap(numba.get_num_threads, numba.set_num_threads, min(n, int(numba.config.NUMBA_NUM_THREADS)))


__all__ = [
    "DEFAULT_THREADS",
    "JOBS",
    "active_threads",
    "check_threads",
    "limit_process_threads",
    "policy_workers",
    "prefer_passive_wait",
    "resolve_threads",
    "thread_limits",
]
