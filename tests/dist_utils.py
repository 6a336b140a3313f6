"""Spawn a gloo process group on this machine and run a test body in every rank."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, compile_, timeout_s, args):
    os.environ["EAOPD_COMPILE"] = "1" if compile_ else "0"
    torch.set_num_threads(1)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timeout)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, compile_: bool = False, timeout_s: float | None = None
          ) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; re-raise any failure.
    ``timeout_s``: the collectives' timeout (gloo's default is 30 minutes), so that a rank
    left waiting for its peers fails the test instead of hanging it."""
    mp.spawn(_entry, args=(fn, world, _free_port(), compile_, timeout_s, args), nprocs=world,
             join=True)


class CollectiveCounter:
    """Counts the torch.distributed collectives called while active."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
             "reduce_scatter_single", "reduce_scatter_tensor", "broadcast", "reduce_scatter",
             "all_to_all_single")

    def __enter__(self):
        self.calls: list[str] = []
        self._depth = 0
        self._saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(*a, **k):
            self.calls.append(name)
            self._depth += 1  # a deprecated alias calling its successor counts once
            try:
                return fn(*a, **k) if self._depth == 1 else self._saved[name](*a, **k)
            finally:
                self._depth -= 1
        return counted

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return False


def merge_replicas(dicts):
    """One dict from every rank's (name -> tensor); replicas of a tensor must agree exactly."""
    merged = {}
    for d in dicts:
        for name, t in d.items():
            if name in merged:
                torch.testing.assert_close(t, merged[name], rtol=0, atol=0,
                                           msg=lambda m, n=name: f"replicas of {n}: {m}")
            merged[name] = t
    return merged
