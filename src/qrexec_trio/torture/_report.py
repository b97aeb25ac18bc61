"""The torture's results: counted as calls end, then a table and a JSON document.

The verdict is in one place (:meth:`Results.failures`): the run passes only
with no unexpected failure, no hang, no fault that could not be injected, no
VM that could not be restarted, and every leak row measured and clean.
"""

from __future__ import annotations

import datetime
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from ._calls import CallPlan, CallResult
from ._faults import FaultRecord
from ._kinds import FAULT_KINDS
from ._leaks import Leak
from ._options import Options

#: Examples of each problem kept for the report.
_EXAMPLES: Final = 8


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` in 0..1) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass
class KindStats:
    planned: int = 0
    injected: int = 0
    not_injected: int = 0
    skipped: int = 0
    #: Injected, and the call still completed with intact data.
    intact: int = 0
    teardown_hung: int = 0
    leaks_after: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class Results:
    options: Options
    world: str
    calls: int = 0
    intact: int = 0
    faulted: int = 0
    #: Faulted by a destructive fault, and failed (as may be).
    faulted_failed: int = 0
    unexpected: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    collateral: int = 0
    collateral_failed: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    kinds: dict[str, KindStats] = field(default_factory=dict)
    not_injected: list[str] = field(default_factory=list)
    teardown_hung: list[str] = field(default_factory=list)
    leaks_after_faults: list[str] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)
    restart_failures: list[str] = field(default_factory=list)
    leaks: list[Leak] = field(default_factory=list)
    #: Problems of the run itself (the world's exit status, ...).
    problems: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    world_log: str | None = None
    #: Why fewer calls than --calls were made, if so.
    stopped_early: str | None = None
    #: Every fault, as it went (for --json).
    fault_log: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for kind in self.options.faults:
            self.kinds.setdefault(kind.name, KindStats())

    @property
    def latencies(self) -> list[float]:
        return [value for stats in self.kinds.values() for value in stats.latencies]

    # -- counting ----------------------------------------------------------------------

    def count(self, plan: CallPlan, result: CallResult, fault: FaultRecord | None,
              collateral_of: int | None) -> None:
        self.calls += 1
        self.by_path[plan.path.value] += 1
        where = f"call {plan.index} ({_describe(plan)}, started {_clock(result.started_at)})"
        if result.intact:
            self.intact += 1
        if fault is not None:
            self._count_fault(where, fault, result)
            self._log_fault(plan, fault, result, collateral_of)
        if result.hung:
            self.hung.append(f"{where}: {result.problem}")
        elif collateral_of is not None:
            self.collateral += 1
            self.collateral_failed += not result.intact
        elif fault is not None and fault.injected and fault.destructive:
            self.faulted_failed += not result.intact
        elif not result.intact:
            what = f"after {fault.kind} ({fault.detail})" if fault and fault.injected else ""
            stderr = f"; stderr: {result.stderr[-200:]}" if result.stderr else ""
            self.unexpected.append(f"{where}: {result.problem} {what}{stderr}".strip())

    def _log_fault(self, plan: CallPlan, fault: FaultRecord, result: CallResult,
                   collateral_of: int | None) -> None:
        teardown = fault.teardown
        self.fault_log.append({
            "call": plan.index, "started": _clock(result.started_at),
            "path": plan.path.value, "source": plan.source or "dom0",
            "target": plan.target, "bytes": len(plan.payload), "kind": fault.kind,
            "detail": fault.detail, "injected": fault.injected,
            "not_injected": fault.not_injected, "skipped": fault.skipped,
            "destructive": fault.destructive,
            "teardown": None if teardown is None else (
                round(teardown.latency, 4) if teardown.latency is not None else "hung"),
            "left": [] if teardown is None else [ident.pid for ident in teardown.left],
            "leaks": fault.leaks, "intact": result.intact, "exit_status": result.exit_status,
            "collateral_of": collateral_of,
        })

    def _count_fault(self, where: str, fault: FaultRecord, result: CallResult) -> None:
        stats = self.kinds.setdefault(fault.kind, KindStats())
        stats.planned += 1
        if fault.skipped:
            # Turns keep faulted calls out of each other's way: a skip is no pass either.
            stats.skipped += 1
            self.not_injected.append(f"{where}: {fault.kind}: skipped, {fault.detail}")
            return
        if fault.not_injected is not None:
            stats.not_injected += 1
            self.not_injected.append(f"{where}: {fault.kind}: {fault.not_injected}")
            return
        self.faulted += 1
        stats.injected += 1
        stats.intact += result.intact
        teardown = fault.teardown
        if teardown is not None and teardown.latency is not None:
            stats.latencies.append(teardown.latency)
        elif teardown is not None:
            stats.teardown_hung += 1
            left = ", ".join(str(ident.pid) for ident in teardown.left)
            self.teardown_hung.append(f"{where}: {fault.kind} ({fault.detail}): "
                                      f"pids {left} still there")
        if fault.leaks:
            stats.leaks_after += 1
            self.leaks_after_faults += [f"{where}: {fault.kind}: {leak}" for leak in fault.leaks]

    # -- the verdict -------------------------------------------------------------------

    def failures(self) -> list[str]:
        """Why the run fails; empty if it passes."""
        reasons = []
        for count, what in (
            (len(self.unexpected), "calls failed unexpectedly"),
            (len(self.hung), "calls hung"),
            (len(self.teardown_hung), "faulted pipelines not torn down in time"),
            (len(self.not_injected), "faults could not be injected (or were skipped)"),
            (len(self.leaks_after_faults), "leaks found after faults"),
            (len(self.restart_failures), "VMs could not be restarted"),
        ):
            if count:
                reasons.append(f"{count} {what}")
        reasons += [f"leak: {leak.count} {leak.what}" for leak in self.leaks
                    if leak.measured and leak.count]
        reasons += [f"not measured: {leak.what}" for leak in self.leaks if not leak.measured]
        return reasons + self.problems

    # -- output ------------------------------------------------------------------------

    def table(self) -> str:
        return "\n".join(_table_lines(self))

    def as_json(self) -> dict[str, Any]:
        options = self.options
        latencies = self.latencies
        return {
            "options": {
                "calls": options.calls, "concurrency": options.concurrency,
                "faults": [kind.name for kind in options.faults],
                "fault_rate": options.fault_rate, "paths": [str(p) for p in options.paths],
                "seed": options.seed, "duration": options.duration,
                "call_timeout": options.call_timeout,
                "teardown_timeout": options.teardown_timeout,
                "max_payload": options.max_payload,
            },
            "world": self.world,
            "elapsed": round(self.elapsed, 3),
            "stopped_early": self.stopped_early,
            "calls": {
                "run": self.calls, "completed_intact": self.intact, "faulted": self.faulted,
                "faulted_failed": self.faulted_failed,
                "failed_unexpectedly": len(self.unexpected), "hung": len(self.hung),
                "collateral": self.collateral, "collateral_failed": self.collateral_failed,
                "by_path": dict(self.by_path),
            },
            "faults": {name: _kind_json(stats) for name, stats in self.kinds.items()},
            "teardown_latency": _latency_json(latencies),
            "teardown_hung": len(self.teardown_hung),
            "faults_not_injected": len(self.not_injected),
            "leaks_after_faults": len(self.leaks_after_faults),
            "restarts": {"count": len(self.restarts),
                         "seconds": _latency_json(self.restarts),
                         "failures": self.restart_failures},
            "leaks": [asdict(leak) for leak in self.leaks],
            "problems": {
                "failed_unexpectedly": self.unexpected, "hung": self.hung,
                "teardown_hung": self.teardown_hung, "not_injected": self.not_injected,
                "leaks_after_faults": self.leaks_after_faults, "run": self.problems,
            },
            "fault_log": self.fault_log,
            "failures": self.failures(),
            "passed": not self.failures(),
            "world_log": self.world_log,
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=1) + "\n")


def _clock(wall: float) -> str:
    """A wall-clock time as the world's log writes them (UTC)."""
    moment = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return moment.strftime("%H:%M:%S.%f")[:-3] + "Z"


def _describe(plan: CallPlan) -> str:
    source = plan.source or "dom0"
    return f"{source} -> {plan.target}, {len(plan.payload)} bytes"


def _kind_json(stats: KindStats) -> dict[str, Any]:
    data = asdict(stats)
    data["latencies"] = _latency_json(stats.latencies)
    return data


def _latency_json(values: list[float]) -> dict[str, Any]:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)
    return {"count": len(values), "p50": rounded(percentile(values, 0.5)),
            "p99": rounded(percentile(values, 0.99)),
            "max": rounded(max(values) if values else None)}


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _latency_cells(values: list[float]) -> str:
    return "/".join(_seconds(percentile(values, share)) for share in (0.5, 0.99, 1.0))


def _row(label: str, value: int, note: str = "") -> str:
    return f"  {label:<28}{value:>7}" + (f"   ({note})" if note else "")


def _table_lines(results: Results) -> list[str]:
    options = results.options
    faults = (", ".join(kind.name for kind in options.faults)
              if len(options.faults) != len(FAULT_KINDS) else "all")
    lines = [
        f"qrexec-trio torture: {results.calls} calls in {results.elapsed:.1f} s, "
        f"concurrency {options.concurrency}, seed {options.seed}"
        + (f" (stopped early: {results.stopped_early})" if results.stopped_early else ""),
        f"  world: {results.world}",
        f"  faults: {faults or 'none'} (rate {options.fault_rate:g}); paths: "
        + ", ".join(f"{path} {count}" for path, count in sorted(results.by_path.items())),
        "",
        "calls",
        _row("completed with intact data", results.intact),
        _row("faulted", results.faulted,
             f"destructive ones that failed, as they may: {results.faulted_failed}"),
        _row("failed unexpectedly", len(results.unexpected)),
        _row("hung", len(results.hung), f"bound {options.call_timeout:g} s a call"),
        _row("collateral", results.collateral,
             f"through a VM another call's fault crashed; {results.collateral_failed} failed"),
        _row("VM restarts", len(results.restarts),
             f"p50/p99/max {_latency_cells(results.restarts)} s"
             + (f"; {len(results.restart_failures)} FAILED" if results.restart_failures
                else "")),
        "",
    ]
    if results.kinds:
        lines += [
            f"faults{'':<17}{'planned':>8}{'injected':>9}{'not inj.':>9}{'skipped':>8}"
            f"{'intact':>7}{'td hung':>8}{'leaks':>6}  teardown p50/p99/max s",
        ]
        for name, stats in results.kinds.items():
            lines.append(
                f"  {name:<21}{stats.planned:>8}{stats.injected:>9}{stats.not_injected:>9}"
                f"{stats.skipped:>8}{stats.intact:>7}{stats.teardown_hung:>8}"
                f"{stats.leaks_after:>6}  {_latency_cells(stats.latencies)}")
        latencies = results.latencies
        lines += [
            "",
            f"teardown latency (fault -> last process of its pipeline gone; "
            f"{len(latencies)} destructive faults, bound {options.teardown_timeout:g} s):",
            f"  p50 {_seconds(percentile(latencies, 0.5))} s   "
            f"p99 {_seconds(percentile(latencies, 0.99))} s   "
            f"max {_seconds(max(latencies) if latencies else None)} s   "
            f"hung {len(results.teardown_hung)}",
            "",
        ]
    lines.append("leaks")
    for leak in results.leaks:
        count = str(leak.count) if leak.measured else "n/a"
        lines.append(f"  {leak.what:<40}{count:>5}")
        lines += [f"      {detail}" for detail in leak.details[:_EXAMPLES]]
    for title, items in (("failed unexpectedly", results.unexpected), ("hung", results.hung),
                         ("teardown not finished in time", results.teardown_hung),
                         ("faults not injected", results.not_injected),
                         ("leaks after faults", results.leaks_after_faults),
                         ("restart failures", results.restart_failures),
                         ("run", results.problems)):
        if items:
            lines += ["", f"{title} ({len(items)}):"]
            lines += [f"  {item}" for item in items[:_EXAMPLES]]
            if len(items) > _EXAMPLES:
                lines.append(f"  ... and {len(items) - _EXAMPLES} more (all in --json)")
    failures = results.failures()
    lines += ["", "result: PASS" if not failures else "result: FAIL: " + "; ".join(failures)]
    if results.world_log:
        lines.append(f"world log: {results.world_log}")
    return lines
