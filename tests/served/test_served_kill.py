"""The server killed mid-request: a clear error, no partial step. Runs last (tests/served/run.sh):
it kills the server run.sh started (its process group, SIGKILL) while a large batch is being
scored, inside the example's training step."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from served_opd import shallow_student, step

from eaopd_mp import served

KILL_AFTER = 1.0  # seconds into the request; the batch below takes several seconds to score


def test_server_killed_mid_request_gives_a_clear_error_and_no_step(server, teacher):
    torch.manual_seed(0)
    student = shallow_student(teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    # 16 sequences of 512 random tokens, k = 64: many seconds of scoring, a ~40 MB answer
    ids = torch.randint(3, 49152, (16, 512))
    attention = torch.ones_like(ids)

    killed = {}

    def kill():
        time.sleep(KILL_AFTER)
        killed["at"] = time.perf_counter()
        os.killpg(server["pgid"], signal.SIGKILL)

    killer = threading.Thread(target=kill)
    start = time.perf_counter()
    killer.start()
    with pytest.raises(served.ServedTeacherError, match=r"no answer from .*/v1/completions for "
                       r"the batch of 16 sequences: .*\(the server died") as err:
        step(student, optimizer, ids, attention, attention, server["url"], server["model"],
             server["max_logprobs"])
    failed = time.perf_counter()
    killer.join()
    print(f"\n[measured] server killed {killed['at'] - start:.2f} s into the request; the "
          f"step raised {failed - killed['at']:.2f} s later: {err.value}")
    assert killed["at"] < failed, "the answer came before the kill: make the batch larger"
    assert all(p.grad is None for p in student.parameters())
    assert not optimizer.state  # AdamW never stepped
    for name, p in student.named_parameters():
        assert torch.equal(p, before[name]), name
    # the next batch finds no server: the same clear error, at once
    with pytest.raises(served.ServedTeacherError, match="no answer"):
        served.served_topk(server["url"], ids[:1, :8], k=5, model=server["model"], timeout=10)
