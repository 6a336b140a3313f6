"""The vocab-parallel loss at TP=2: two worker processes on one process group.

The pool spawns the workers once per benchmark run; for each case both build the same
inputs from the same seed and keep their half of the vocabulary rows of the student and
teacher weights (hidden states are replicated, as after Megatron's sequence gather).
A step is timed on rank 0 between two barriers; each rank measures its own peak memory
and the larger is reported. On CPU the group is gloo and each rank gets
``cpu_count / 2`` threads, so that the pair uses the same cores as one process would.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import Case, make_inputs
from impls import Outputs, configure_process
from memory import PeakMeter

WORLD = 2
COLLECTIVE_TIMEOUT_S = 600  # a rank that failed mid-step frees the other
REPLY_TIMEOUT_S = 1800


class _Shard:
    """One rank's inputs for a case and its step."""

    def __init__(self, case: Case, seed: int, rank: int, device: torch.device):
        from eaopd_mp.parallel import fused_linear_vocab_parallel_eaopd_loss

        self.loss_fn = fused_linear_vocab_parallel_eaopd_loss
        self.case = case
        full = make_inputs(case, seed, device="cpu")
        rows = case.vocab // WORLD
        self.rows = slice(rank * rows, (rank + 1) * rows)
        dtype = case.torch_dtype

        def local(t, grad=False):
            return t.detach().to(device=device, dtype=dtype).clone().requires_grad_(grad)

        self.hs, self.ht = local(full.hs, True), local(full.ht)
        self.ws, self.wt = local(full.ws[self.rows], True), local(full.wt[self.rows])
        del full
        self.device = device
        self.meter = PeakMeter(device)
        self.loss: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, precise: bool) -> tuple[float, int]:
        """One timed step: ``(seconds between barriers, this rank's peak bytes)``."""
        self.hs.grad = self.ws.grad = None
        self.meter.start(precise)
        dist.barrier()
        start = time.perf_counter()
        loss = self.loss_fn(
            self.hs, self.ws, teacher_hidden=self.ht, teacher_weight=self.wt,
            chunk_size=self.case.chunk, tp_group=dist.group.WORLD,
        )
        loss.backward()
        self._sync()
        dist.barrier()
        seconds = time.perf_counter() - start
        self.loss = loss.detach().item()
        return seconds, self.meter.stop()

    def outputs(self) -> Outputs:
        return Outputs(self.loss, self.hs.grad, self.ws.grad, self.rows)


def _worker(rank: int, init_file: str, device_type: str, conn) -> None:
    """Serve ``(command, argument)`` messages until ``close``."""
    configure_process()
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or WORLD) // WORLD))
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    shard = None
    while True:
        command, arg = conn.recv()
        try:
            if command == "close":
                break
            if command == "setup":
                shard = None
                shard = _Shard(arg[0], arg[1], rank, device)
                reply = torch.get_num_threads()
            elif command == "run":
                reply = shard.run(arg)
            elif command == "outputs":
                reply = shard.outputs() if rank == 0 else None
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", reply))
        except Exception:  # noqa: BLE001 - reported to the parent, which decides
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()
    conn.close()


class TPPool:
    """Two persistent worker processes; the parent sends commands and waits."""

    def __init__(self, device_type: str = "cpu"):
        ctx = mp.get_context("spawn")
        fd, self._init_file = tempfile.mkstemp(prefix="eaopd-bench-tp-")
        os.close(fd)
        os.unlink(self._init_file)  # the file store creates it
        self.conns, self.procs = [], []
        for rank in range(WORLD):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, self._init_file, device_type, child),
                               daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def call(self, command: str, arg=None) -> list:
        """Send a command to every rank and return their replies (raises on error)."""
        for conn in self.conns:
            conn.send((command, arg))
        replies = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(REPLY_TIMEOUT_S):
                raise TimeoutError(f"TP rank {rank} did not answer {command!r}")
            status, reply = conn.recv()
            if status != "ok":
                raise RuntimeError(f"TP rank {rank} failed on {command!r}:\n{reply}")
            replies.append(reply)
        return replies

    def close(self) -> None:
        """Stop the workers (those still alive after a grace period are terminated)."""
        for conn in self.conns:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)


class TPRunner:
    """The :class:`~impls.LocalRunner` interface over a :class:`TPPool`."""

    def __init__(self, pool: TPPool, case: Case, seed: int):
        self.pool = pool
        self.threads = pool.call("setup", (case, seed))[0]

    def run(self, precise: bool = False) -> tuple[float, int]:
        replies = self.pool.call("run", precise)
        return replies[0][0], max(peak for _seconds, peak in replies)

    def outputs(self) -> Outputs:
        return self.pool.call("outputs")[0]

    def close(self) -> None:
        pass
