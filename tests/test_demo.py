"""The demo (``python -m eaopd_mp.demo``): its language, its metrics and its outputs.

The end-to-end tests run the demo with a tiny budget (a few steps), so they check that
every output is written and well-formed, not the distillation result itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from eaopd_mp import demo  # noqa: E402

TINY = ["--steps", "4", "--warm-steps", "5", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """One tiny demo run: its output directory and the summary ``main`` returned."""
    out = tmp_path_factory.mktemp("demo") / "out"
    summary = demo.main([*TINY, "--seed", "3", "--out", str(out)])
    return out, summary


def test_teacher_is_the_language():
    cfg = demo.Config()
    lang = demo.build_language(cfg, torch.Generator().manual_seed(0))
    n, k = cfg.n_choice, cfg.k
    h = demo.entropy(lang.teacher)
    assert torch.allclose(h[n:], torch.full((n,), math.log(k)), atol=0.02)  # free rows
    assert bool((h[:n] < 0.05).all())  # forced rows
    assert torch.equal(lang.teacher[:n].argmax(-1), lang.forced)
    assert sorted(lang.choices[:, 0].tolist()) == list(range(n))
    assert bool(lang.support.sum(1).eq(torch.tensor([1] * n + [k] * n)).all())


def test_collapsed_data_stays_in_language_and_lost_diversity():
    cfg = demo.Config()
    gen = torch.Generator().manual_seed(0)
    lang = demo.build_language(cfg, gen)
    seq = demo.collapsed_batch(lang, 32, 11, gen)
    assert seq.shape == (32, 11)
    assert bool(lang.support[seq[:, :-1], seq[:, 1:]].all())
    free_ctx, free_next = seq[:, 0:-1:2], seq[:, 1::2]
    assert torch.equal(free_next, lang.choices[free_ctx - lang.n, 0])


def test_distinct_free_counts_allowed_choices_per_context():
    lang = demo.build_language(demo.Config(), torch.Generator().manual_seed(0))
    n, c = lang.n, lang.choices
    ctx = torch.tensor([n, n, n, n + 1, n + 1])
    nxt = torch.tensor([c[0, 0], c[0, 1], c[0, 1], c[1, 2], n + 5])  # last: not allowed
    assert demo.distinct_free(lang, ctx, nxt) == pytest.approx((2 + 1) / 2)
    assert demo.distinct_free(lang, ctx[:0], nxt[:0]) == 0.0


def test_loss_labels_mask_only_the_prompt():
    labels = demo.loss_labels(2, 7, 3)
    assert labels.shape == (2, 6) and labels.dtype == torch.float32
    assert labels[0].tolist() == [0, 0, 1, 1, 1, 1]


def test_every_output_is_written_and_well_formed(tiny_run):
    out, returned = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(returned))
    assert set(summary["methods"]) == {"rkl", "fkl", "eaopd"}
    assert 0.0 < summary["teacher_entropy_high"] <= math.log(summary["config"]["vocab"])
    assert summary["teacher_entropy_high"] == pytest.approx(math.log(4), abs=0.02)
    k = summary["config"]["k"]
    for name, row in [("start", summary["start"]), *summary["methods"].items()]:
        for key in demo.METRICS:
            assert math.isfinite(row[key]), (name, key)
        assert 0.0 <= row["student_entropy_high"] <= math.log(32) + 1e-6
        assert 0.0 <= row["student_entropy_low"] <= math.log(32) + 1e-6
        assert 0.0 <= row["teacher_mode_mass_low"] <= 1.0
        assert 0.0 <= row["distinct_continuations"] <= k
        assert row["kl_fwd"] >= 0.0 and row["kl_rev"] >= 0.0
    for row in summary["methods"].values():
        assert math.isfinite(row["final_loss"]) and row["final_loss"] >= 0.0

    history = json.loads((out / "history.json").read_text())
    assert set(history) == {"rkl", "fkl", "eaopd"}
    for curves in history.values():
        assert set(demo.METRICS) <= set(curves)
        assert all(len(v) == 4 and all(map(math.isfinite, v)) for v in curves.values())

    png = out / "curves.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_the_table_lists_every_run(tiny_run):
    _, summary = tiny_run
    text = demo.table(summary)
    lines = text.splitlines()
    assert len(lines) == 2 + 5
    for name in ("teacher", "start", "rkl", "fkl", "eaopd"):
        assert any(line.startswith(f"| {name} |") for line in lines)


def test_deterministic_for_a_seed(tiny_run, tmp_path):
    out, _ = tiny_run
    demo.main([*TINY, "--seed", "3", "--out", str(tmp_path)])
    assert (tmp_path / "summary.json").read_bytes() == (out / "summary.json").read_bytes()
    assert (tmp_path / "history.json").read_bytes() == (out / "history.json").read_bytes()


def test_main_restores_threads_and_compile_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("EAOPD_COMPILE", raising=False)
    threads = torch.get_num_threads()
    demo.main(["--steps", "1", "--warm-steps", "0", "--no-progress", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    assert "EAOPD_COMPILE" not in os.environ


def test_cli_rejects_a_bad_budget():
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "eaopd_mp.demo", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert "--steps" in proc.stdout and "--seed" in proc.stdout and "--out" in proc.stdout


def test_teacher_topk_runs_both_tails(tmp_path):
    """``--teacher-topk 2``: the gate on the full teacher and on its top-2 in both tails;
    every run in the summary and the table, evaluated against the full teacher."""
    summary = demo.main([*TINY, "--teacher-topk", "2", "--out", str(tmp_path)])
    assert list(summary["methods"]) == ["eaopd", "topk-bucket", "topk-renormalize"]
    assert summary["teacher_topk"] == 2
    for vals in summary["methods"].values():
        assert all(math.isfinite(vals[k]) for k in (*demo.METRICS, "kl_fwd", "kl_rev"))
    assert "| topk-renormalize |" in demo.table(summary)
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
