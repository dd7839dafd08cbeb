"""A pool of long-lived worker processes joined in one process group (gloo on CPU, NCCL with one
GPU per rank), so tests pay the start-up once.

``pool.run(fn, *args)`` runs ``fn(*args)`` on every rank (``fn`` must be importable by module
and name) and returns the per-rank results, or raises with the failing ranks' tracebacks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, backend: str, tasks: Any, results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    extra: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        extra["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
        **extra,
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as exc:
            results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int, backend: str = "gloo", timeout_s: float = 150.0) -> None:
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = timeout_s
        self._procs: list[Any] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self.backend, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out: dict[int, Any] = {}
        failures: dict[int, str] = {}
        try:
            for _ in range(self.world_size):
                rank, ok, value = self._results.get(timeout=self.timeout_s)
                (out if ok else failures)[rank] = value
        except queue.Empty:
            self.close()
            raise TimeoutError(f"{fn.__name__} did not finish on every rank in {self.timeout_s}s") from None
        if failures:
            detail = "\n".join(f"--- rank {r}:\n{tb}" for r, tb in sorted(failures.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(failures)}:\n{detail}")
        return [out[r] for r in range(self.world_size)]

    def run_outcomes(
        self, fn: Callable[..., Any], *args: Any, deadline_s: float, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """Like :meth:`run`, for runs where a rank may die or hang: per rank ``("ok", value)``,
        ``("raised", traceback)``, ``("died", exit code)`` or ``("hung", None)`` after
        ``deadline_s``. A death or a hang retires the whole world (the next run starts afresh)."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close(graceful=False)
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out: dict[int, tuple[str, Any]] = {}
        end = time.monotonic() + deadline_s
        while len(out) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=0.1)
                out[rank] = ("ok", value) if ok else ("raised", value)
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(self._procs):
                if r not in out and not p.is_alive():
                    out[r] = ("died", p.exitcode)
            if time.monotonic() > end:
                for r in range(self.world_size):
                    out.setdefault(r, ("hung", None))
        if any(kind in ("died", "hung") for kind, _ in out.values()):
            self.close(graceful=False)
        return [out[r] for r in range(self.world_size)]

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: ``graceful`` lets them leave the process group first (up to 5 s
        each); otherwise (a world with a dead or stuck rank) they are killed."""
        if graceful:
            for q in self._tasks:
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            if graceful:
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []
