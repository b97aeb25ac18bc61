"""Injecting one fault into a running call, and watching its pipeline go.

The fault waits until the call's pipeline is up (the service said hello, the
caller has part of the payload), then acts. A fault whose process cannot be
found, or whose call has no live connection to cancel, is *not injected*,
and says why: it never counts as a pass. After a destructive fault (a kill,
a peer closing, a cancel) the torture waits, bounded, for every process of
the pipeline to be gone, and then for the call's id to leave the world's
connection listings: a pipeline still there at the bound is hung.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from ..domains import DomainsError
from ._calls import RunningCall
from ._kinds import Action, CallPath, Role
from ._pipeline import Teardown, wait_gone
from ._procfs import Proc, ProcId, alive, ident_of
from ._vms import Active, VMGate
from ._waiting import until
from ._world import World

#: How often the world's connection listing is asked after a teardown.
_LISTING_POLL: Final = 0.05


class NotInjected(Exception):
    """The fault could not be injected (its process is not there, ...)."""


@dataclass
class FaultRecord:
    """What became of one planned fault."""

    kind: str
    #: Set once the fault acted: its time (``trio.current_time()``), for the teardown.
    injected_at: float | None = None
    #: Why it could not be injected.
    not_injected: str | None = None
    #: The call was collateral of another fault before its own came.
    skipped: bool = False
    #: It tears the pipeline down (else the call must still complete intact).
    destructive: bool = False
    #: What exactly happened ("SIGSTOP 0.4 s then SIGCONT", "service side", ...).
    detail: str = ""
    teardown: Teardown | None = None
    #: Checks after the teardown that failed (a connection still listed, ...).
    leaks: list[str] = field(default_factory=list)

    @property
    def injected(self) -> bool:
        return self.injected_at is not None


@dataclass
class _Target:
    """A process to signal, and whether it is a declared VM's (its death crashes the VM)."""

    proc: ProcId
    #: What it is, for the report ("the qrexec-daemon of tb", ...).
    what: str
    crashes: str | None = None


class FaultInjector:
    """One call's fault: see the module's docstring."""

    def __init__(self, world: World, gate: VMGate, active: Active, *,
                 teardown_bound: float) -> None:
        self.world = world
        self.gate = gate
        self.active = active
        self.teardown_bound = teardown_bound
        self.record: FaultRecord | None = None

    async def act(self, call: RunningCall) -> None:
        fault = call.plan.fault
        assert fault is not None
        record = self.record = FaultRecord(fault.kind.name)
        try:
            await self._ready(call)
            self._not_collateral()
            watched = await self._inject(call, record)
        except NotInjected as exc:
            record.injected_at = None
            # A call another fault crashed under this one's feet skips its own.
            if self.active.collateral_of is not None:
                record.skipped = True
                record.detail = f"call {self.active.collateral_of}'s fault came first"
            else:
                record.not_injected = str(exc)
            return
        finally:
            call.release.set()
        if record.destructive and record.injected_at is not None:
            record.teardown = await wait_gone(watched, record.injected_at, self.teardown_bound)
            if record.teardown.latency is not None:
                await self._check_connection_gone(call, record)

    async def _ready(self, call: RunningCall) -> None:
        """Wait for the hello and the held-back payload, or the caller's end."""
        async with trio.open_nursery() as race:
            async def ready() -> None:
                await call.hello_seen.wait()
                await call.reached.wait()
                race.cancel_scope.cancel()

            async def ended() -> None:
                await call.exited.wait()
                race.cancel_scope.cancel()

            race.start_soon(ready)
            race.start_soon(ended)
        if call.hello is None:
            raise NotInjected("the call ended before its service said hello")

    def _not_collateral(self) -> None:
        if self.active.collateral_of is not None:
            raise NotInjected("skipped")

    # -- the pipeline ----------------------------------------------------------------

    def _pipeline(self, call: RunningCall) -> list[ProcId]:
        """The call's own processes: caller, service group and stand-in, a DispVM's programs."""
        assert call.hello is not None
        found = [call.caller] if call.caller is not None else []
        found += call.hello.service_processes()
        if call.plan.path is CallPath.VM_DISPVM:
            found += [proc.ident for proc in self.world.programs(call.hello.domid) if proc]
        return found

    def _vm_programs(self, vm: str) -> list[ProcId]:
        return [proc.ident for proc in self.world.programs(self.world.vms[vm].domid) if proc]

    def _target(self, call: RunningCall, role: Role) -> _Target:
        """The process ``role`` names in this call; raises :class:`NotInjected`."""
        plan, hello = call.plan, call.hello
        assert hello is not None and plan.fault is not None
        found: ProcId | None
        crashes = None
        if role is Role.CALLER:
            found, what = call.caller, "the caller"
        elif role is Role.SERVICE:
            found, what = ident_of(hello.pid), "the service"
        else:
            domid, crashes = self._domain_of(call)
            agent, daemon = self.world.programs(domid)
            proc: Proc | None = daemon if role is Role.DAEMON else agent
            program = "qrexec-daemon" if role is Role.DAEMON else "qrexec-agent"
            found = proc.ident if proc is not None else None
            what = f"the {program} of {crashes or f'the DispVM (domid {domid})'}"
        if found is None or not alive(found):
            raise NotInjected(f"no {role} process to signal")
        return _Target(found, what, crashes)

    def _domain_of(self, call: RunningCall) -> tuple[int, str | None]:
        """The domain whose agent or daemon the fault hits, and its name if declared."""
        assert call.hello is not None
        vm = call.plan.fault_vm
        if vm is not None:
            return self.world.vms[vm].domid, vm
        return call.hello.domid, None  # a DispVM's

    # -- injecting -------------------------------------------------------------------

    async def _inject(self, call: RunningCall, record: FaultRecord) -> list[ProcId]:
        """Act; returns the processes whose end is the teardown."""
        fault = call.plan.fault
        assert fault is not None
        pipeline = self._pipeline(call)
        action = fault.kind.action
        if action is Action.KILL or action is Action.STOP:
            assert fault.kind.role is not None
            return pipeline + await self._signal(call, record, fault.kind.role)
        record.injected_at = trio.current_time()
        if action is Action.PEER_CLOSE:
            record.destructive = True
            record.detail = f"{fault.side} side"
            if fault.side == "caller":
                await call.close_local_end()
            else:
                send_signal(self._target(call, Role.SERVICE).proc, signal.SIGUSR2)
        elif action is Action.CANCEL:
            record.destructive = True
            await self._cancel(call, record)
        elif action is Action.STALLED_READER:
            record.detail = f"{fault.side} side"
            if fault.side == "caller":
                call.pause_reading()
                call.release.set()
                await trio.sleep(fault.pause)
                call.resume_reading()
        elif action is Action.SLOW_WRITER:
            record.detail = f"{fault.side} side"
            if fault.side == "caller":
                call.trickle = fault.pause
        return pipeline

    async def _cancel(self, call: RunningCall, record: FaultRecord) -> None:
        assert call.hello is not None
        call_id = call.hello.call_id
        record.detail = f"qrexec.Kill {call_id}"
        try:
            killed = await self.world.kill_connection(call_id)
        except DomainsError as exc:
            raise NotInjected(f"qrexec.Kill {call_id} failed: {exc}") from exc
        if not killed:
            raise NotInjected(f"no live connection {call_id} to cancel")

    async def _signal(self, call: RunningCall, record: FaultRecord, role: Role) -> list[ProcId]:
        """SIGKILL, or SIGSTOP then SIGCONT or SIGKILL; returns what must go with it."""
        target = self._target(call, role)
        # A declared VM's agent or daemon: the rest of the VM goes when the world halts
        # it. Found now: once the world restarts it, those would be the new ones.
        rest = self._vm_programs(target.crashes) if target.crashes is not None else []
        signalled = await self._signal_process(call, record, target)
        return signalled + rest if record.destructive else signalled

    async def _signal_process(self, call: RunningCall, record: FaultRecord,
                              target: _Target) -> list[ProcId]:
        fault = call.plan.fault
        assert fault is not None
        record.detail = f"SIGKILL of {target.what}"
        if fault.kind.action is Action.STOP:
            send_signal(target.proc, signal.SIGSTOP)
            try:
                await trio.sleep(fault.stop_for)
            except BaseException:
                # Cancelled: a process is never left stopped.
                send_signal(target.proc, signal.SIGCONT, missing_ok=True)
                raise
            record.detail = f"{target.what} stopped {fault.stop_for:.2f} s, then " + (
                "SIGKILL" if fault.then_kill else "SIGCONT")
            if not fault.then_kill:
                send_signal(target.proc, signal.SIGCONT, missing_ok=True)
                record.injected_at = trio.current_time()
                return [target.proc]
        if target.crashes is not None:
            self.gate.crashing(target.crashes, self.active.index)
        record.injected_at = trio.current_time()
        record.destructive = True
        send_signal(target.proc, signal.SIGKILL)
        return [target.proc]

    async def _check_connection_gone(self, call: RunningCall, record: FaultRecord) -> None:
        """After the teardown: the call's id must leave every registry of the world."""
        assert call.hello is not None and record.injected_at is not None
        call_id = call.hello.call_id
        injected_at = record.injected_at
        ours: list[dict[str, Any]] = []

        async def gone() -> bool:
            nonlocal ours
            try:
                listed = await self.world.connections()
            except DomainsError:
                return False
            # An id is a domain and a port: a later call may have it again; it
            # is ours only if it is older than the fault.
            since = trio.current_time() - injected_at
            ours = [entry for entry in listed if entry.get("id") == call_id
                    and float(entry.get("age", 0)) >= since]
            return not ours

        with trio.move_on_at(injected_at + self.teardown_bound):
            await until(gone, _LISTING_POLL)
            return
        record.leaks.append(f"connection {call_id} still listed by "
                            f"{', '.join(str(entry.get('owner')) for entry in ours)}")


def send_signal(target: ProcId, signum: signal.Signals, *, missing_ok: bool = False) -> None:
    """Signal that very process; raises :class:`NotInjected` if it is gone."""
    if not alive(target) and signum is not signal.SIGCONT:
        raise NotInjected(f"process {target.pid} is gone")
    try:
        os.kill(target.pid, signum)
    except ProcessLookupError:
        if not missing_ok:
            raise NotInjected(f"process {target.pid} is gone") from None
