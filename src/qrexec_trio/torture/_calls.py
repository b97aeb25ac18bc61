"""One call: the real client program as a child, checksummed data both ways.

A dom0 -> VM call runs ``qrexec-client`` as ``qrexec-trio run`` does, a call
from a VM ``qrexec-client-vm`` with that VM's agent socket as ``qrexec-trio
call`` does. The payload goes to the caller's stdin; the service echoes it
between its hello line and a trailer with the length and SHA-256 of what it
received. The call is intact only if the caller exits 0 and its stdout is
exactly hello + payload + the trailer the payload must give.

A faulted call holds part of its payload back until the fault is in
(:attr:`RunningCall.release`), so that its pipeline is surely alive then.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio

from .._config import Timeouts
from .._programs import program
from ..nursery import child_process
from ._kinds import CallPath, FaultKind, Role
from ._pipeline import Hello
from ._procfs import ProcId, ident_of
from ._service import END, SLOW_PIECE
from ._world import SERVICE, World

#: What the torture reads or writes at once.
_CHUNK: Final = 1 << 16
#: How long the readers may take to drain after the caller exited.
_DRAIN: Final = 5.0
#: The stderr kept for a report.
_STDERR_TAIL: Final = 400


@dataclass(frozen=True)
class FaultPlan:
    """One fault, decided before its call starts (so that a seed replays it)."""

    kind: FaultKind
    #: Payload bytes written before the fault.
    at: int
    #: ``caller`` or ``service``: which end closes, stalls or writes slowly.
    side: str
    #: SIGSTOP: how long the process stays stopped, and whether it is then
    #: killed (else continued).
    stop_for: float
    then_kill: bool
    #: Which daemon a daemon fault hits: the ``source``'s or the ``target``'s.
    daemon_of: str
    #: A stalled reader's pause, or a slow writer's interval between pieces (seconds).
    pause: float


@dataclass(frozen=True)
class CallPlan:
    index: int
    path: CallPath
    #: The calling VM; None for dom0.
    source: str | None
    #: A VM, or ``@dispvm``.
    target: str
    payload: bytes
    #: The service argument (see ``_service``): plain, stall.MS or slow.MS.
    mode: str
    fault: FaultPlan | None

    @property
    def vms(self) -> frozenset[str]:
        """The declared VMs the call goes through (a DispVM is its own)."""
        return frozenset(name for name in (self.source, self.target)
                         if name is not None and not name.startswith("@"))

    @property
    def fault_vm(self) -> str | None:
        """The declared VM whose agent or daemon the fault hits, if it hits one."""
        fault = self.fault
        role = fault.kind.role if fault is not None else None
        if fault is None or role not in (Role.SOURCE_AGENT, Role.TARGET_AGENT, Role.DAEMON):
            return None
        if role is Role.SOURCE_AGENT or (role is Role.DAEMON and fault.daemon_of == "source"):
            return self.source
        # The target's daemon: a declared VM's, or a DispVM's (its own, not declared).
        return None if self.path is CallPath.VM_DISPVM else self.target

    def expected_output(self, hello_line: bytes) -> bytes:
        digest = hashlib.sha256(self.payload).hexdigest()
        trailer = END + f" len={len(self.payload)} sha256={digest}\n".encode()
        return hello_line + self.payload + trailer


def caller_command(plan: CallPlan, world: World) -> tuple[list[str], dict[str, str]]:
    """The client's argv and environment, as ``qrexec-trio run`` or ``call`` would give them."""
    service = f"{SERVICE}+{plan.mode}"
    if plan.source is None:
        argv = [program("qrexec-client"), "--socket-dir", str(world.socket_dir),
                "-d", plan.target, f"DEFAULT:QUBESRPC {service} dom0"]
        return argv, world.caller_env(0)
    vm = world.vms[plan.source]
    argv = [program("qrexec-client-vm"), "--agent-socket", str(vm.agent_socket),
            plan.target, service]
    return argv, world.caller_env(vm.domid)


@dataclass
class CallResult:
    exit_status: int | None = None
    #: The caller was still running at the call's bound (then killed).
    hung: bool = False
    hello: Hello | None = None
    #: Why the call is not intact; None if it is.
    problem: str | None = None
    stderr: str = ""
    elapsed: float = 0.0
    #: When it started, by the wall clock (to find it in the world's log).
    started_at: float = 0.0

    @property
    def intact(self) -> bool:
        return self.problem is None and not self.hung


def _mismatch(expected: bytes, got: bytes) -> str:
    for offset, (want, have) in enumerate(zip(expected, got, strict=False)):
        if want != have:
            return f"output differs at byte {offset} of {len(expected)}"
    return f"output is {len(got)} bytes, {len(expected)} expected"


@dataclass
class RunningCall:
    """A call in flight: what a fault needs to act on it."""

    plan: CallPlan
    proc: trio.Process
    caller: ProcId | None
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    hello: Hello | None = None
    hello_seen: trio.Event = field(default_factory=trio.Event)
    #: The writer sent what goes before the fault (``FaultPlan.at``).
    reached: trio.Event = field(default_factory=trio.Event)
    #: The writer may send the rest.
    release: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    #: A slow writer's interval between pieces, once set.
    trickle: float | None = None
    _resume_reading: trio.Event | None = None

    def pause_reading(self) -> None:
        self._resume_reading = trio.Event()

    def resume_reading(self) -> None:
        if self._resume_reading is not None:
            self._resume_reading.set()
            self._resume_reading = None

    async def close_local_end(self) -> None:
        """The caller's local peer goes away: its stdin and stdout closed at once."""
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                if self._resume_reading is not None:
                    await self._resume_reading.wait()
                chunk = await self.proc.stdout.receive_some(_CHUNK)
                if not chunk:
                    return
                self.out += chunk
                if not self.hello_seen.is_set() and b"\n" in self.out:
                    self.hello = Hello.parse(bytes(self.out[:self.out.index(b"\n") + 1]))
                    self.hello_seen.set()
        except trio.ClosedResourceError:
            return  # closed by a peer-close fault

    async def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some(_CHUNK):
            self.err += chunk
            del self.err[:-_STDERR_TAIL]

    async def write_stdin(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        payload = self.plan.payload
        held = self.plan.fault.at if self.plan.fault is not None else len(payload)
        try:
            await self._send(stdin, payload[:held])
            self.reached.set()
            await self.release.wait()
            await self._send(stdin, payload[held:])
            await stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the caller is gone, or a fault closed its stdin
        finally:
            self.reached.set()

    async def _send(self, stdin: trio.abc.SendStream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            size = SLOW_PIECE if self.trickle is not None else _CHUNK
            await stdin.send_all(view[:size])
            view = view[size:]
            if self.trickle is not None and view:
                await trio.sleep(self.trickle)

    def result(self, result: CallResult) -> CallResult:
        result.hello = self.hello
        result.stderr = self.err.decode(errors="replace").strip()
        if result.hung:
            result.problem = "still running at the call's bound"
        elif result.exit_status != 0:
            result.problem = f"exit status {result.exit_status}"
        elif self.hello is None:
            result.problem = "no hello line from the service"
        else:
            line = bytes(self.out[:self.out.index(b"\n") + 1])
            expected = self.plan.expected_output(line)
            if bytes(self.out) != expected:
                result.problem = _mismatch(expected, bytes(self.out))
        return result


async def run_call(plan: CallPlan, world: World, *, bound: float, timeouts: Timeouts,
                   fault: Injector | None) -> CallResult:
    """Make one call; ``fault`` (if any) acts on it while it runs.

    The caller gets ``bound`` seconds to exit (else it is hung, and killed);
    the fault's own task may outlive the caller (it watches the teardown).
    """
    argv, env = caller_command(plan, world)
    started = trio.current_time()
    result = CallResult(started_at=time.time())
    async with trio.open_nursery() as outer:
        async with child_process(argv, timeouts=timeouts, env=env) as proc:
            call = RunningCall(plan, proc, ident_of(proc.pid))
            if fault is not None:
                outer.start_soon(fault.act, call)
            else:
                call.release.set()
            async with trio.open_nursery() as io:
                io.start_soon(call.read_stderr)
                io.start_soon(call.write_stdin)
                with trio.move_on_after(bound) as limit:
                    await call.read_stdout()
                    await proc.wait()
                if limit.cancelled_caught:
                    result.hung = True
                    proc.kill()
                result.exit_status = await proc.wait()
                call.exited.set()
                call.release.set()
                call.resume_reading()
                with trio.move_on_after(_DRAIN):
                    await call.read_stdout()
                io.cancel_scope.cancel()
        result.elapsed = trio.current_time() - started
        call.result(result)
    return result


class Injector(Protocol):
    """What acts on a faulted call while it runs (``_faults.FaultInjector``)."""

    async def act(self, call: RunningCall) -> None: ...
