"""Results as JSON, markdown tables, a terminal table and plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

FIELDS = ("device", "dtype", "tokens", "hidden", "vocab", "chunk")
BASELINES = ("floor_chunked", "floor")
LOGITS_SWEEPS = ("long-", "real-")  # sweeps whose tables and plots show one logits tensor
# Fixed colours and line styles, so that an implementation looks the same on every plot.
STYLES = {
    "naive_eager": ("tab:red", "-"),
    "naive_compiled": ("tab:orange", "-"),
    "eaopd_logits": ("tab:olive", "-"),
    "eaopd_fused": ("tab:blue", "-"),
    "eaopd_fused_recompute": ("tab:cyan", "-"),
    "eaopd_tp2": ("tab:purple", "-"),
    "floor": ("black", "--"),
    "floor_chunked": ("tab:gray", "--"),
    "liger_jsd": ("tab:brown", ":"),
    "liger_eaopd": ("tab:green", ":"),
}


def by_sweep(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by sweep, in first-seen order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["sweep"]].append(r)
    return dict(groups)


def _fixed(group: list[dict]) -> str:
    """The fields a sweep holds fixed, e.g. ``hidden=128 vocab=32000 fp32 cpu``."""
    x = group[0]["x"]
    parts = []
    for f in FIELDS:
        values = {r[f] for r in group}
        if f != x and len(values) == 1:
            v = values.pop()
            parts.append(str(v) if f in ("device", "dtype") else f"{f}={v}")
    return " ".join(parts)


def _baseline(rows: list[dict]) -> dict | None:
    """The floor measured at the same point (chunked if there, else whole)."""
    for name in BASELINES:
        for r in rows:
            if r["impl"] == name and r["time_ms_median"] is not None:
                return r
    return None


def _point_key(r: dict) -> tuple:
    return tuple(r[f] for f in FIELDS)


def ratios(records: list[dict]) -> dict[tuple, dict[str, float]]:
    """``{(impl, point): {floor name: time ratio}}`` for every measured record."""
    points: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        points[(r["sweep"], _point_key(r))].append(r)
    out = {}
    for rows in points.values():
        floors = {r["impl"]: r for r in rows if r["impl"] in BASELINES and r["time_ms_median"]}
        for r in rows:
            if r["time_ms_median"] is not None:
                out[(r["impl"], r["sweep"], _point_key(r))] = {
                    name: r["time_ms_median"] / f["time_ms_median"] for name, f in floors.items()
                }
    return out


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    return f"{v:{spec}}"


def sweep_markdown(name: str, group: list[dict]) -> str:
    """Two tables for one sweep (time with ratio to the floor, memory) and skip notes."""
    x = group[0]["x"]
    impls = list(dict.fromkeys(r["impl"] for r in group))
    xs = sorted({r[x] for r in group})
    cell = {(r["impl"], r[x]): r for r in group}
    head = f"| {x} | " + " | ".join(impls) + " |\n|---:|" + "---:|" * len(impls) + "\n"
    time_rows, mem_rows, notes, absent = [], [], [], False
    for v in xs:
        base = _baseline([cell[(i, v)] for i in impls if (i, v) in cell])
        t, m = [], []
        for i in impls:
            r = cell.get((i, v))
            if r is None or r["time_ms_median"] is None:
                t.append("-")
                m.append("-")
                if r is None:
                    absent = True
                elif r["reason"]:
                    notes.append(f"- {i} at {x}={v}: {r['status']}: {r['reason']}")
                continue
            ratio = f" ({r['time_ms_median'] / base['time_ms_median']:.2f}x)" if base else ""
            t.append(f"{r['time_ms_median']:.3g}{ratio}")
            m.append(f"{r['peak_mib']:.3g}")
        time_rows.append(f"| {v} | " + " | ".join(t) + " |")
        mem_rows.append(f"| {v} | " + " | ".join(m) + " |")
    base_name = next((b for b in BASELINES if b in impls), None)
    ratio_note = f" (x {base_name})" if base_name else ""
    if absent:
        notes.append("- a dash with no note: not part of the sweep at that point")
    text = [f"### {name}: {_fixed(group)}\n",
            f"Median time of forward + backward, ms{ratio_note}:\n", head + "\n".join(time_rows),
            "\nPeak memory of a step above its inputs, MiB:\n", head + "\n".join(mem_rows)]
    if notes:
        text += ["\nNot measured:\n", "\n".join(notes)]
    return "\n".join(text) + "\n"


def detail_markdown(records: list[dict]) -> str:
    """Every record in one table, with the accuracy columns."""
    cols = ("impl", "sweep", "tokens", "hidden", "vocab", "chunk", "time_ms_median",
            "time_ms_min", "peak_mib", "rss_peak_mib", "loss_rel_err", "grad_rel_err",
            "warmup_s", "status")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        vals = []
        for c in cols:
            v = r[c]
            vals.append(_fmt(v, ".2e") if c.endswith("rel_err") else ("-" if v is None else
                                                                      str(v)))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def markdown(records: list[dict], meta: dict) -> str:
    """The whole ``results.md``: how it was run, one section per sweep, all records."""
    out = ["# eaopd_mp benchmark\n", f"Command: `{meta['command']}`\n",
           "| machine | |\n|---|---|"]
    out += [f"| {k} | {v} |" for k, v in meta.items() if k not in ("command", "implementations")]
    out.append("")
    used = dict.fromkeys(r["impl"] for r in records)
    legend = meta.get("implementations", {})
    if legend:
        out += ["| implementation | |\n|---|---|"]
        out += [f"| {name} | {legend.get(name, '')} |" for name in used]
        out.append("")
    for name, group in by_sweep(records).items():
        out.append(sweep_markdown(name, group))
    if flat := flatness(records):
        out += ["### Memory against tokens\n", flat + "\n"]
    if goals := gpu_goals(records):
        out += ["### Goals\n", goals + "\n"]
    if ratios_ := dtype_ratios(records):
        out += ["### bf16 against fp32\n", ratios_ + "\n"]
    out += ["### All records\n", detail_markdown(records)]
    return "\n".join(out)


def text_table(records: list[dict]) -> str:
    """A compact fixed-width table for the terminal."""
    rat = ratios(records)
    head = (f"{'sweep':<16} {'N':>6} {'H':>5} {'V':>6} {'impl':<22} {'median ms':>10} "
            f"{'x floor':>8} {'x fl.chk':>8} {'peak MiB':>9} {'loss err':>9}  status")
    lines = [head, "-" * len(head)]
    for r in records:
        q = rat.get((r["impl"], r["sweep"], _point_key(r)), {})
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(
            f"{r['sweep'][:16]:<16} {r['tokens']:>6} {r['hidden']:>5} {r['vocab']:>6} "
            f"{r['impl']:<22} {_fmt(r['time_ms_median'], '.1f'):>10} "
            f"{_fmt(q.get('floor'), '.2f'):>8} {_fmt(q.get('floor_chunked'), '.2f'):>8} "
            f"{_fmt(r['peak_mib'], '.1f'):>9} {_fmt(r['loss_rel_err'], '.1e'):>9}  "
            f"{status[:70]}"
        )
    return "\n".join(lines)


GOAL_FLOOR_RATIO = 1.10  # eaopd_fused <= 1.10 x the four bf16 GEMMs at full size
GOAL_FLAT_RATIO = 1.10  # its peak less the returned hidden gradient: largest / smallest


def _median(rows: list[dict], impl: str, tokens: int) -> list[dict]:
    return [r for r in rows if r["impl"] == impl and r["tokens"] == tokens
            and r["time_ms_median"] is not None]


def gpu_goals(records: list[dict]) -> str:
    """Issue 13's goals on the records of the GPU suite (sweeps named ``gpu-*``, CUDA);
    empty if there are none. A markdown table: one row per goal, one column per N.

    - ``eaopd_fused`` (default chunk) at most 1.10x ``floor`` (four bf16 GEMMs);
    - ``eaopd_fused`` faster than ``liger_jsd`` at its faster measured chunk;
    - memory flat in N: ``eaopd_fused``'s peak above its inputs, less the ``(N, H)``
      hidden-state gradient it must return, varies by at most 1.10x over N.

    A goal whose records are missing (skipped, failed) reads "not measured", never met.
    """
    gpu = [r for r in records if r["sweep"].startswith("gpu-") and r["device"] == "cuda"]
    main = [r for r in gpu if r["chunk"] == min(g["chunk"] for g in gpu)] if gpu else []
    fused = sorted((r for r in main if r["impl"] == "eaopd_fused"), key=lambda r: r["tokens"])
    if not fused:
        return ""
    tokens = [r["tokens"] for r in fused]
    rows = []

    def row(name, cells, ok, verdict_detail=""):
        if None in ok:
            verdict = "not measured"
        else:
            verdict = "met" if all(ok) else "MISSED"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {verdict}{verdict_detail} |")

    cells, ok = [], []
    for r in fused:
        floor = _median(main, "floor", r["tokens"])
        if not floor or r["time_ms_median"] is None:
            cells.append("-")
            ok.append(None)
            continue
        ratio = r["time_ms_median"] / floor[0]["time_ms_median"]
        cells.append(f"{r['time_ms_median']:.1f} / {floor[0]['time_ms_median']:.1f} ms = "
                     f"{ratio:.2f}x")
        ok.append(ratio <= GOAL_FLOOR_RATIO)
    row(f"eaopd_fused / floor <= {GOAL_FLOOR_RATIO:.2f}", cells, ok)

    cells, ok = [], []
    for r in fused:
        liger = sorted(_median(gpu, "liger_jsd", r["tokens"]), key=lambda x: x["time_ms_median"])
        if not liger or r["time_ms_median"] is None:
            cells.append("-")
            ok.append(None)
            continue
        best = liger[0]
        cells.append(f"{r['time_ms_median']:.1f} vs {best['time_ms_median']:.1f} ms "
                     f"(chunk {best['chunk']})")
        ok.append(r["time_ms_median"] < best["time_ms_median"])
    row("eaopd_fused faster than liger_jsd", cells, ok)

    cells, excess = [], []
    for r in fused:
        if r["peak_mib"] is None:
            cells.append("-")
            excess.append(None)
            continue
        grad_h = r["tokens"] * r["hidden"] * (2 if r["dtype"] == "bf16" else 4) / 2**20
        excess.append(r["peak_mib"] - grad_h)
        cells.append(f"{r['peak_mib']:.0f} - {grad_h:.0f} = {excess[-1]:.0f} MiB")
    measured = [e for e in excess if e is not None]
    spread = max(measured) / max(min(measured), 1e-9) if len(measured) >= 2 else None
    flat_ok = [None] if spread is None or None in excess else [spread <= GOAL_FLAT_RATIO]
    row(f"peak - hidden grad flat in N (max/min <= {GOAL_FLAT_RATIO:.2f})", cells, flat_ok,
        "" if spread is None else f" ({spread:.2f})")

    r0 = fused[0]
    head = ("| goal | " + " | ".join(f"N={n}" for n in tokens) + " | verdict |\n|---|"
            + "---:|" * len(tokens) + "---|")
    return (f"GPU goals ({r0['dtype']}, H={r0['hidden']}, V={r0['vocab']}, chunk "
            f"{r0['chunk']}; median times):\n\n" + head + "\n" + "\n".join(rows))


def dtype_ratios(records: list[dict]) -> str:
    """One line per implementation and point measured in both fp32 and bf16: the bf16
    median time over the fp32 one (the ``cpu-bf16`` suite); empty if there is none."""
    by_point: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        if r["time_ms_median"] is not None:
            key = (r["impl"], r["device"], r["tokens"], r["hidden"], r["vocab"], r["chunk"])
            by_point[key][r["dtype"]] = r
    lines = []
    for (impl, device, n, h, v, chunk), rs in by_point.items():
        if "fp32" in rs and "bf16" in rs:
            a, b = rs["fp32"]["time_ms_median"], rs["bf16"]["time_ms_median"]
            lines.append(f"{impl} {device} N={n} H={h} V={v} chunk={chunk}: bf16 {b:.1f} ms, "
                         f"fp32 {a:.1f} ms, bf16 / fp32 = {b / a:.2f}")
    return "\n".join(lines)


def logits_bytes(records: list[dict]) -> str:
    """For the long-context and real-model suites: per token count, the size of one ``(tokens, V)``
    float32 logits tensor next to each implementation's measured peak above the inputs
    (or why it was not run). Empty for other suites."""
    rows = [r for r in records if r["sweep"].startswith(LOGITS_SWEEPS)]
    if not rows:
        return ""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["| tokens | one (tokens, V) fp32 logits | "
             + " | ".join(f"{i} peak / time" for i in impls) + " |",
             "|---:|---:|" + "---:|" * len(impls)]
    for tokens in sorted({r["tokens"] for r in rows}):
        vocab = next(r["vocab"] for r in rows if r["tokens"] == tokens)
        cells = []
        for impl in impls:
            r = next((r for r in rows if r["tokens"] == tokens and r["impl"] == impl), None)
            if r is None or r["status"] != "ok" or r["peak_mib"] is None:
                cells.append("not run" if r is None else f"skipped: {r['reason']}")
            else:
                cells.append(f"{r['peak_mib']:.0f} MiB / {r['time_ms_median'] / 1e3:.2f} s")
        lines.append(f"| {tokens} | {tokens * vocab * 4 / 2**20:.0f} MiB | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(value: float, _pos=None) -> str:
    """Tick label: 512, 1k, 64k."""
    if value >= 1024 and value % 1024 == 0:
        return f"{value / 1024:g}k"
    return f"{value:g}"


def flatness(records: list[dict]) -> str:
    """One line per sweep over tokens with a single implementation: how its peak grows.

    Issue 2's check that the fused loss's working memory does not grow with N.
    """
    lines = []
    for name, group in by_sweep(records).items():
        impls = {r["impl"] for r in group}
        peaks = [(r["tokens"], r["peak_mib"]) for r in group if r["peak_mib"] is not None]
        if group[0]["x"] != "tokens" or len(impls) != 1 or len(peaks) < 2:
            continue
        values = ", ".join(f"N={n}: {p:.1f} MiB" for n, p in sorted(peaks))
        spread = max(p for _, p in peaks) / max(min(p for _, p in peaks), 1e-9)
        lines.append(f"{name} {impls.pop()} peak above inputs: {values} "
                     f"(largest / smallest = {spread:.2f})")
    return "\n".join(lines)


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per sweep with two or more points: time and peak memory against x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    paths = []
    for name, group in by_sweep(records).items():
        x = group[0]["x"]
        if len({r[x] for r in group}) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for impl in dict.fromkeys(r["impl"] for r in group):
            pts = sorted((r[x], r["time_ms_median"], r["peak_mib"]) for r in group
                         if r["impl"] == impl and r["time_ms_median"] is not None)
            if not pts:
                continue
            xs, ts, ms = zip(*pts, strict=True)
            color, line = STYLES.get(impl, (None, "-"))
            style = dict(marker="o", label=impl, color=color, linestyle=line,
                         linewidth=2.5 if impl.startswith("eaopd_fused") else 1.5)
            axes[0].plot(xs, ts, **style)
            axes[1].plot(xs, [max(m, 0.1) for m in ms], **style)
        if name.startswith(LOGITS_SWEEPS):  # what one (tokens, V) fp32 logits tensor takes
            xs = sorted({r[x] for r in group})
            axes[1].plot(xs, [n * group[0]["vocab"] * 4 / 2**20 for n in xs], color="gray",
                         linestyle=":", label="one (tokens, V) fp32 logits")
        for ax, ylabel in zip(axes, ("forward + backward, ms (median)",
                                     "peak memory above inputs, MiB"), strict=True):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(_short))
            ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{name}: {_fixed(group)}")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_all(records: list[dict], meta: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    """``results.json`` (the records), ``meta.json``, ``results.md`` and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(records, meta))
    written = [out_dir / "results.json", out_dir / "results.md"]
    return written + (plot(records, out_dir) if plots else [])


def main(argv=None) -> None:
    """``python bench/report.py DIR``: redo ``results.md`` and the plots from DIR's JSON."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out", type=Path)
    out = p.parse_args(argv).out
    records = json.loads((out / "results.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    for path in write_all(records, meta, out):
        print(path)


if __name__ == "__main__":
    main()
