"""Measuring the implementations of one case, interleaved.

For each case: build the inputs once; compute the reference; for each implementation
check its memory estimate against the budget, build it, run the warm-up steps (not
timed: they include compilation) and compare its loss and gradients with the
reference; then run ``repeats`` rounds in which every implementation runs one step, in
an order rotated each round, so that drift of the machine (clock, other load) hits all
implementations alike. Every step is timed. Last, one more step per implementation
measures its peak memory with the precise allocator setting (see :mod:`memory`); the
resident-set peak of the timed steps is kept too (``rss_peak_mib``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from cases import Case
from check import errors, reference_outputs
from impls import IMPLS, TP_IMPL, Impl, LocalRunner
from memory import GIB, MIB
from real_inputs import inputs_for
from tqdm import tqdm


@dataclass(frozen=True)
class Settings:
    """How to measure: step counts, memory budget, seed, reference check on/off."""

    repeats: int = 5
    warmup: int = 1
    budget_bytes: int = 16 * GIB
    seed: int = 0
    check: bool = True


def _work(case: Case) -> int:
    """Rough cost of one step, for the progress bar's ETA: the number of logits."""
    return case.tokens * case.vocab


class Progress:
    """A progress bar weighted by step cost, showing the case and implementation."""

    def __init__(self, cases: list[Case], settings: Settings):
        steps = settings.warmup + settings.repeats + 1  # + the memory step
        total = sum(_work(c) * len(c.impls) * steps for c in cases)
        self.bar = tqdm(total=total, unit="logit", unit_scale=True, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def step(self, case: Case, name: str, what: str, steps: int = 1) -> None:
        self.bar.set_description_str(f"{case.sweep} {case.label()}", refresh=False)
        self.bar.set_postfix_str(f"{name} {what}", refresh=False)
        self.bar.update(_work(case) * steps)

    def close(self) -> None:
        self.bar.close()


class Bench:
    """Runs cases; owns the TP worker pool (started on first use)."""

    def __init__(self, settings: Settings, progress: Progress):
        self.settings = settings
        self.progress = progress
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _runner(self, impl: Impl, case: Case, inputs):
        if impl.name != TP_IMPL:
            return LocalRunner(impl.make_step(case, inputs), inputs, case.device)
        from tp import TPPool, TPRunner

        if self._pool is None:
            self._pool = TPPool(case.device)
        return TPRunner(self._pool, case, self.settings.seed)

    def _failed(self, name: str, record: dict, exc: Exception) -> None:
        """Record a failure; a failed TP step may leave a rank stuck: restart the pool."""
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        if name == TP_IMPL:
            self.close()

    def _prepare(self, impl: Impl, case: Case, inputs, reference, record: dict):
        """Build, warm up and check one implementation; its runner, or None on failure."""
        s = self.settings
        try:
            runner = self._runner(impl, case, inputs)
            record["threads"] = getattr(runner, "threads", record["threads"])
            start = time.perf_counter()
            for _ in range(s.warmup):
                runner.run()
                self.progress.step(case, impl.name, "warm-up")
            record["warmup_s"] = round(time.perf_counter() - start, 3)
            out = runner.outputs()
            record["loss"] = out.loss
            if reference is not None and impl.exact:
                record.update(errors(out, reference))
            del out
            return runner
        except Exception as exc:  # noqa: BLE001 - one failure must not end the run
            self._failed(impl.name, record, exc)
            return None

    def run_case(self, case: Case) -> list[dict]:
        """Measure every implementation of ``case``; one record each."""
        s = self.settings
        inputs = inputs_for(case, s.seed)
        reference = reference_outputs(inputs) if s.check else None
        records, runners = {}, {}
        for name in case.impls:
            impl = IMPLS[name]
            record = new_record(case, impl, inputs.nbytes())
            records[name] = record
            reason = skip_reason(impl, case, s.budget_bytes)
            if reason is not None:
                record.update(status="skipped", reason=reason)
                self.progress.step(case, name, "skipped", s.warmup + s.repeats + 1)
                continue
            runner = self._prepare(impl, case, inputs, reference, record)
            if runner is None:
                self.progress.step(case, name, "failed", s.repeats + 1)
            else:
                runners[name] = runner
        if reference is not None:
            record_reference(records, reference)
        del reference
        self._rounds(case, runners, records)
        for runner in runners.values():
            runner.close()
        return list(records.values())

    def _rounds(self, case: Case, runners: dict, records: dict) -> None:
        """The timed steps: ``repeats`` rounds, every implementation once per round."""
        times = {name: [] for name in runners}
        peaks = {name: [] for name in runners}
        names = list(runners)
        for r in range(self.settings.repeats):
            k = r % max(1, len(names))
            for name in names[k:] + names[:k]:
                if name not in runners:
                    continue
                try:
                    seconds, peak = runners[name].run()
                except Exception as exc:  # noqa: BLE001
                    self._failed(name, records[name], exc)
                    runners.pop(name).close()
                    continue
                times[name].append(seconds)
                peaks[name].append(peak)
                self.progress.step(case, name, f"run {r + 1}/{self.settings.repeats}")
        for name in list(runners):
            try:
                _seconds, precise_peak = runners[name].run(precise=True)
            except Exception as exc:  # noqa: BLE001
                self._failed(name, records[name], exc)
                runners.pop(name).close()
                continue
            self.progress.step(case, name, "memory")
            finish_record(records[name], times[name], peaks[name], precise_peak)


def skip_reason(impl: Impl, case: Case, budget_bytes: int) -> str | None:
    """Why ``impl`` is not run at ``case`` (unavailable, or over the memory budget)."""
    reason = impl.needs(case)
    if reason is None and impl.estimate_bytes(case) > budget_bytes:
        reason = (f"estimated {impl.estimate_bytes(case) / GIB:.2f} GiB > memory budget "
                  f"{budget_bytes / GIB:.2f} GiB")
    return reason


def plan_table(cases: list[Case], settings: Settings) -> str:
    """What a run would do (``--dry-run``): every point, its estimate and skip reason."""
    lines = [f"{'sweep':<16} {'N':>6} {'H':>5} {'V':>6} {'chunk':>5} {'impl':<22} "
             f"{'est GiB':>7}  plan"]
    work = 0
    for case in cases:
        for name in case.impls:
            impl = IMPLS[name]
            reason = skip_reason(impl, case, settings.budget_bytes)
            if reason is None:
                work += _work(case) * (settings.warmup + settings.repeats + 1)
            lines.append(f"{case.sweep[:16]:<16} {case.tokens:>6} {case.hidden:>5} "
                         f"{case.vocab:>6} {case.chunk:>5} {name:<22} "
                         f"{impl.estimate_bytes(case) / GIB:>7.2f}  {reason or 'run'}")
    lines.append(f"\n{len(cases)} points; {work / 1e9:.1f} G logits computed in measured "
                 "and warm-up steps (the progress bar's unit)")
    return "\n".join(lines)


def new_record(case: Case, impl: Impl, inputs_bytes: int) -> dict:
    """A result record before measurement."""
    return {
        "impl": impl.name,
        **case.describe(),
        "status": "ok",
        "reason": None,
        "threads": torch.get_num_threads(),
        "time_ms_median": None,
        "time_ms_min": None,
        "times_ms": [],
        "peak_mib": None,
        "rss_peak_mib": None,
        "peak_mib_est": round(impl.estimate_bytes(case) / MIB, 1),
        "inputs_mib": round(inputs_bytes / MIB, 1),
        "warmup_s": None,
        "loss": None,
        "loss_ref": None,
        "loss_rel_err": None,
        "grad_rel_err": None,
    }


def record_reference(records: dict, reference) -> None:
    for record in records.values():
        record["loss_ref"] = reference.loss


def finish_record(record: dict, times: list[float], peaks: list[int], precise_peak: int) -> None:
    """Fill in the statistics: median and min time (ms); the peak of the memory step and
    the largest resident-set peak of the timed steps (MiB)."""
    if not times:
        return
    ms = [t * 1e3 for t in times]
    record["times_ms"] = [round(t, 3) for t in ms]
    record["time_ms_median"] = round(statistics.median(ms), 3)
    record["time_ms_min"] = round(min(ms), 3)
    record["peak_mib"] = round(precise_peak / MIB, 1)
    record["rss_peak_mib"] = round(max(peaks) / MIB, 1)
