"""The examples refuse impossible flags with one clear line, before any work.

Each example checks its flags against what it can run (the models' sizes, the parallel
layout, the number of processes) before it builds a model or a process group. In
process, the check is called through the example's ``main`` with the work replaced by a
function that fails the test if reached; under ``torchrun`` (several processes, each of
which would print the message) the line must appear exactly once, with no traceback from
the example.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")


def _example(name: str, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    return importlib.import_module(name)


def _no_work(*args, **kwargs):
    raise AssertionError("the example started working before refusing its flags")


def _refused(main, argv, capsys) -> str:
    """The line ``main(argv)`` printed when it refused its flags: exit status 2, nothing on
    stdout, on stderr one line after (at most) argparse's usage, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, (exit_.value.code, err)
    assert out == ""
    *usage, line = err.splitlines()
    assert all(u.startswith(("usage:", " ")) for u in usage), err
    return line


# (example, the function its work starts with, flags, processes, the line it prints)
CASES = [
    ("megatron_distill", "init_parallel", ["--teacher-topk", "100"], 1,
     "megatron_distill.py: error: --teacher-topk 100 exceeds the vocabulary "
     "(--vocab-size 60) (see --help)"),
    ("megatron_distill", "init_parallel", ["--tp", "4"], 4,
     "megatron_distill.py: error: --tp 4 does not divide the models' attention heads "
     "(2 in the student): use --tp 1 or 2 (see --help)"),
    ("megatron_distill", "init_parallel", ["--pp", "2", "--virtual-pipeline", "2",
                                           "--micro-batches", "3", "--batch-size", "12"], 2,
     "megatron_distill.py: error: --micro-batches 3 must be a multiple of --pp 2 with "
     "--virtual-pipeline (megatron's interleaved schedule) (see --help)"),
    ("megatron_distill", "init_parallel", ["--tp", "2", "--sequence-parallel",
                                           "--seq-len", "31"], 2,
     "megatron_distill.py: error: --seq-len 31 must be a multiple of 2 (--tp "
     "sequence-parallel slices) (see --help)"),
    ("megatron_distill", "init_parallel", ["--tp", "2"], 3,
     "megatron_distill.py: error: --tp 2 x --pp 1 x --cp 1 = 2 does not divide the 3 "
     "processes (torchrun --nproc-per-node) (see --help)"),
    ("fsdp2_distill", "models", ["--steps", "0"], 2,
     "fsdp2_distill.py: error: --steps must be at least 1, got 0 (see --help)"),
    ("fsdp2_distill", "models", [], 9,
     "fsdp2_distill.py: error: 9 processes for a batch of 8 sequences: use at most 8 "
     "(see --help)"),
    ("hf_distill", "train_teacher", ["--trl-steps", "0"], 1,
     "hf_distill.py: error: --trl-steps must be at least 1, got 0"),
    ("multi_teacher", "teachers", ["--steps", "0"], 1,
     "multi_teacher.py: error: --steps must be at least 1, got 0"),
    ("served_opd", "load", ["--batch", "99"], 1,
     "served_opd.py: error: --batch 99: there are 8 prompts"),
    ("real_opd", "machine", ["--out", "x", "--steps", "0"], 1,
     "real_opd.py: error: --steps must be at least 1, got 0"),
    ("real_opd", "machine", ["--out", "x", "--samples", "2", "--stats-samples", "3"], 1,
     "real_opd.py: error: --stats-samples 3 exceeds --samples 2"),
    ("real_opd", "machine", ["--out", "x", "--layers", "3-1"], 1,
     "real_opd.py: error: --layers (none): give increasing layer numbers from 0, each once"),
    ("real_opd", "machine", ["--out", "x", "--layers", "a-b"], 1,
     "real_opd.py: error: --layers 'a-b': give ranges of layer numbers, e.g. 0-11,18-29"),
    ("real_opd", "machine", ["--out", "x", "--lr", "0"], 1,
     "real_opd.py: error: --lr must be positive, got 0.0"),
    ("real_opd", "machine", [], 1,
     "real_opd.py: error: --out is required (or --summarize DIR ...)"),
    ("real_opd", "machine", ["--summarize", "no-such-run"], 1,
     "real_opd.py: error: --summarize: no summary.json in no-such-run"),
]


@pytest.mark.parametrize("name, work, argv, world, line", CASES,
                         ids=[f"{c[0]} {' '.join(c[2])}" for c in CASES])
def test_example_refuses_an_impossible_flag_before_any_work(name, work, argv, world, line,
                                                             monkeypatch, capsys):
    module = _example(name, monkeypatch)
    monkeypatch.setattr(module, work, _no_work)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert _refused(module.main, argv, capsys) == line


@pytest.mark.parametrize("name", ["megatron_distill", "fsdp2_distill"])
def test_launching_without_torchrun_is_refused(name, monkeypatch, capsys):
    module = _example(name, monkeypatch)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    line = _refused(module.main, [], capsys)
    assert line.startswith(f"{name}.py: error: run it with torchrun: torchrun "), line


def test_the_compiled_step_refuses_an_unknown_flag():
    """It takes no options: a flag that would silently do nothing is refused."""
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "compiled_step.py"),
                           "--steps", "3"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == \
        "compiled_step.py: error: unrecognized arguments: --steps 3"


@pytest.mark.parametrize("name, argv, line", [
    ("megatron_distill", ["--teacher-topk", "100"],
     "megatron_distill.py: error: --teacher-topk 100 exceeds the vocabulary "
     "(--vocab-size 60) (see --help)"),
    ("fsdp2_distill", ["--steps", "0"],
     "fsdp2_distill.py: error: --steps must be at least 1, got 0 (see --help)"),
])
def test_under_torchrun_the_line_appears_once(name, argv, line):
    """Two processes refuse, rank 0 prints and fails, the other leaves quietly (had it
    failed first, the launcher could stop rank 0 before it prints); no traceback of the
    example's. torchrun's own report of the failed process follows the line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", os.path.join(EXAMPLES, f"{name}.py"), *argv]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert out.count(line) == 1, out[-3000:]
    assert f"examples/{name}.py\", line" not in out, out[-3000:]
    # rank 0 alone failed (the others left with status 0, or were stopped after it failed)
    assert out.count("exitcode  : 2") == 1 and "local_rank: 0" in out, out[-3000:]


def _summary(seed: int, values: dict[str, float]) -> dict:
    """A summary.json as real_opd writes it, every model's five numbers from ``values``."""
    keys = ("pass@1", "pass@k", "token_entropy", "fkl_high_entropy", "rkl")
    row = {name: dict(zip(keys, (v,) * 5, strict=True)) for name, v in values.items()}
    return {"config": {"seed": seed, "samples": 8}, "teacher": row.pop("teacher"),
            "student": row.pop("student"), "objectives": row}


def test_real_opd_seeds_table(monkeypatch):
    """``--summarize`` over two seeds: each cell is the mean, then the seeds' values; the
    paired rows are per-seed differences to ``opd`` (values chosen by hand)."""
    real_opd = _example("real_opd", monkeypatch)
    runs = [_summary(0, {"teacher": 0.5, "student": 0.0, "opd": 0.25, "eaopd": 0.5,
                         "eaopd_threshold": 0.125}),
            _summary(3, {"teacher": 0.75, "student": 0.25, "opd": 0.5, "eaopd": 0.5,
                         "eaopd_threshold": 0.75})]
    lines = real_opd.seeds_table(runs).splitlines()
    assert lines[0].startswith("| model (mean over seeds 0, 3) | pass@1 | pass@8 |")
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in lines[2:]}
    assert cells == {"teacher": "0.625 (0.500 / 0.750)", "student (start)": "0.125 (0.000 / 0.250)",
                     "opd": "0.375 (0.250 / 0.500)", "eaopd": "0.500 (0.500 / 0.500)",
                     "eaopd_threshold": "0.438 (0.125 / 0.750)",
                     "eaopd - opd": "0.125 (0.250 / 0.000)",
                     "eaopd_threshold - opd": "0.062 (-0.125 / 0.250)"}
    runs[1]["config"]["samples"] = 4
    with pytest.raises(ValueError, match="different --samples"):
        real_opd.seeds_table(runs)
