"""The torture run: a world, warm-up calls, a baseline, the calls, the checks at rest.

Calls run ``--concurrency`` at a time (a capacity limiter), each in its own
nursery with its fault's task beside it; VM restarts run in a background
nursery that outlives the call whose fault crashed the VM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Final

import trio

from .._config import Timeouts
from ._calls import CallPlan, CallResult, run_call
from ._faults import FaultInjector
from ._kinds import CallPath
from ._leaks import Leak, Snapshot, leaks_at_rest, left_after_stop, snapshot
from ._options import Options
from ._plan import Planner
from ._progress import Progress
from ._report import Results
from ._vms import VMGate, VMUnavailable
from ._world import World, WorldUnusable, attach, own_world

#: Processes of a stopped world get this long to go before they count as left.
_AFTER_STOP: Final = 10.0


def _check(world: World, options: Options) -> None:
    """Raise :class:`WorldUnusable` if the world cannot carry the selected paths."""
    needed = 2 if CallPath.VM_VM in options.paths else 1
    if len(world.vms) < needed:
        raise WorldUnusable(
            f"the world has {len(world.vms)} running VM(s) with the torture service, "
            f"{needed} needed (start one from 'qrexec-trio torture --print-config')")
    if CallPath.VM_DISPVM in options.paths and world.template is None:
        raise WorldUnusable("the world has no DispVM template with the torture service "
                            "(needed for vm-dispvm calls)")


def _warm_up_plans(options: Options, world: World) -> list[CallPlan]:
    """Small unfaulted calls so that every agent and daemon served one of each kind:
    dom0 to each VM, each VM to the next (a ring), one VM to a DispVM."""
    vms = sorted(world.vms)
    ends: list[tuple[CallPath, str | None, str]] = []
    if CallPath.DOM0_VM in options.paths:
        ends += [(CallPath.DOM0_VM, None, vm) for vm in vms]
    if CallPath.VM_VM in options.paths:
        ends += [(CallPath.VM_VM, vm, vms[(number + 1) % len(vms)])
                 for number, vm in enumerate(vms)]
    if CallPath.VM_DISPVM in options.paths:
        ends.append((CallPath.VM_DISPVM, vms[0], "@dispvm"))
    return [CallPlan(index=-1 - number, path=path, source=source, target=target,
                     payload=b"warm-up\n", mode="plain", fault=None)
            for number, (path, source, target) in enumerate(ends)]


class Torture:
    def __init__(self, world: World, options: Options, timeouts: Timeouts) -> None:
        self.world = world
        self.options = options
        self.timeouts = timeouts
        where = f"{'started by the torture' if world.own else 'attached'}, {world.root}"
        self.results = Results(options, f"{where} (vchan {world.vchan})")
        self.in_flight = 0
        self.gate: VMGate | None = None

    async def run(self) -> Results:
        _check(self.world, self.options)
        base = await self._warm_up()
        started = trio.current_time()
        progress = Progress(self._progress_line)
        async with trio.open_nursery() as background:
            # Restarts outlive the call that crashed a VM: they live here.
            self.gate = VMGate(self.world, background, bound=self.timeouts.domain_start)
            drawing = trio.CancelScope()
            background.start_soon(_until_cancelled, progress, drawing)
            try:
                await self._calls(started)
            finally:
                drawing.cancel()
        self.results.elapsed = trio.current_time() - started
        self.results.restarts = self.gate.restarts.durations
        self.results.restart_failures = self.gate.restarts.failures
        _, self.results.leaks = await leaks_at_rest(self.world, base,
                                                    self.options.teardown_timeout)
        return self.results

    async def _call(self, plan: CallPlan, fault: FaultInjector | None) -> CallResult:
        result = await run_call(plan, self.world, bound=self.options.call_timeout,
                                timeouts=self.timeouts, fault=fault)
        if plan.path is CallPath.VM_DISPVM and result.hello is not None:
            self.world.dispvm_domids.add(result.hello.domid)
        return result

    async def _warm_up(self) -> Snapshot:
        for plan in _warm_up_plans(self.options, self.world):
            result = await self._call(plan, None)
            if not result.intact:
                raise WorldUnusable(f"the warm-up call {plan.source or 'dom0'} -> "
                                    f"{plan.target} failed: {result.problem} "
                                    f"{result.stderr[-300:]}".strip())
        # The baseline is the world at rest: settled after the warm-up.
        base, _ = await leaks_at_rest(self.world, await snapshot(self.world),
                                      self.options.teardown_timeout)
        return base

    async def _calls(self, started: float) -> None:
        options = self.options
        planner = Planner(options, list(self.world.vms))
        limiter = trio.CapacityLimiter(options.concurrency)
        assert self.gate is not None
        async with trio.open_nursery() as calls:
            for index in range(options.calls):
                await limiter.acquire_on_behalf_of(index)
                over = options.duration is not None \
                    and trio.current_time() - started >= options.duration
                if over or self.gate.broken:
                    limiter.release_on_behalf_of(index)
                    self.results.stopped_early = (
                        f"--duration {options.duration:g} s reached" if over
                        else "a VM could not be restarted")
                    break
                calls.start_soon(self._one, planner.plan(index), limiter)

    async def _one(self, plan: CallPlan, limiter: trio.CapacityLimiter) -> None:
        assert self.gate is not None
        self.in_flight += 1
        try:
            async with self.gate.calling(plan.index, plan.vms, faulted=plan.fault is not None,
                                         owns=plan.fault_vm) as active:
                injector = None if plan.fault is None else FaultInjector(
                    self.world, self.gate, active, teardown_bound=self.options.teardown_timeout)
                result = await self._call(plan, injector)
                self.results.count(plan, result, injector.record if injector else None,
                                   active.collateral_of)
        except VMUnavailable as exc:
            self.results.count(plan, CallResult(problem=f"not started: {exc}",
                                                started_at=time.time()), None, None)
        finally:
            self.in_flight -= 1
            limiter.release_on_behalf_of(plan.index)

    def _progress_line(self) -> str:
        results = self.results
        restarting = self.gate.restarting if self.gate is not None else 0
        return (f"[{results.calls}/{self.options.calls}] intact {results.intact} "
                f"faulted {results.faulted} unexpected {len(results.unexpected)} "
                f"hung {len(results.hung) + len(results.teardown_hung)} "
                f"collateral {results.collateral} in flight {self.in_flight} "
                f"restarts {len(self.gate.restarts.durations) if self.gate else 0}"
                + (f" (restarting {restarting})" if restarting else ""))


async def _until_cancelled(progress: Progress, scope: trio.CancelScope) -> None:
    with scope:
        await progress.run()


async def _after_stop(world: World, results: Results) -> None:
    """An own world stopped: it must have exited 0, removed its directory, left nothing."""
    if world.exit_status is None:
        results.problems.append("the world did not stop within its bound")
    elif world.exit_status != 0:
        results.problems.append(f"the world exited with status {world.exit_status}")
    if world.root.exists():
        results.problems.append(f"the world left its directory {world.root}")
    left = await left_after_stop(str(world.vchan_dir), world.pid, _AFTER_STOP)
    details = [proc.describe() for proc in left]
    for proc in left:
        # Ours to clean: a torture must not leave a machine worse than it found it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    if details:
        details.append("(killed by the torture after the report's check)")
    results.leaks.append(Leak("processes left after the world stopped", len(left), details))


async def torture(options: Options) -> Results:
    """The whole run; raises :class:`WorldUnusable` if there is no usable world."""
    timeouts = Timeouts.from_env()
    if options.world is not None:
        world = await attach(options.world.resolve(), timeouts)
        return await Torture(world, options, timeouts).run()
    workdir = Path(tempfile.mkdtemp(prefix="qrexec-torture-"))
    keep = True
    try:
        async with own_world(workdir, options.log_level, timeouts) as world:
            results = await Torture(world, options, timeouts).run()
        await _after_stop(world, results)
    except WorldUnusable as exc:
        raise WorldUnusable(f"{exc} (world log: {workdir / 'world.log'})") from None
    else:
        keep = options.keep_logs or bool(results.failures())
        if keep:
            results.world_log = str(world.log)
        return results
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

