"""The declared VMs under faults: who is using them, crashes, restarts.

Killing (or stopping) a VM's agent or daemon hits every call through the VM,
not only the faulted one: a killed one crashes the VM (the world halts it).
The other calls that were in flight through it are *collateral*: they may
fail, but must not hang. A crashed VM is restarted (the world's
``admin.vm.Start``) before any new call uses it; calls that need it wait.

Faulted calls take turns per VM (:class:`_Turns`): a call whose fault hits a
VM's agent or daemon has the VM to itself among faulted calls, so that a
fault never lands in a pipeline another fault has already broken (each fault
is measured alone, and none is lost). Calls without a fault do not take turns:
they are the ones that may be collateral.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import trio

from ..domains import DomainsError
from ._waiting import until
from ._world import World

#: How often a crashed VM's state is asked for while the world halts it.
_STATE_POLL: Final = 0.05


class VMUnavailable(Exception):
    """A VM a call needs could not be restarted."""


@dataclass
class Active:
    """A call in flight, as the gate knows it."""

    index: int
    vms: frozenset[str]
    #: The index of the call whose fault crashed a VM under this one.
    collateral_of: int | None = None


@dataclass
class Restarts:
    durations: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class _Turns:
    """One VM's turns: faulted calls share it; a fault on its agent or daemon owns it.

    An owner waiting keeps new sharers out (else a busy VM would never be
    free). Calls take the turns of their VMs in name order, so no two wait
    for each other.
    """

    def __init__(self) -> None:
        self._sharers = 0
        self._owned = False
        self._owners_waiting = 0
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _until(self, free: Callable[[], bool]) -> None:
        while not free():
            await self._changed.wait()

    async def share(self) -> None:
        await self._until(lambda: not self._owned and not self._owners_waiting)
        self._sharers += 1

    def unshare(self) -> None:
        self._sharers -= 1
        self._notify()

    async def own(self) -> None:
        self._owners_waiting += 1
        try:
            await self._until(lambda: not self._owned and not self._sharers)
        finally:
            self._owners_waiting -= 1
            self._notify()
        self._owned = True

    def disown(self) -> None:
        self._owned = False
        self._notify()


class VMGate:
    def __init__(self, world: World, background: trio.Nursery, *, bound: float) -> None:
        self._world = world
        self._background = background
        self._bound = bound
        self._up = {name: _set_event() for name in world.vms}
        self._turns = {name: _Turns() for name in world.vms}
        self._active: dict[int, Active] = {}
        self.restarts = Restarts()
        #: Set when a VM could not be restarted: the run stops starting calls.
        self.broken = False

    @property
    def restarting(self) -> int:
        return sum(not event.is_set() for event in self._up.values())

    @asynccontextmanager
    async def calling(self, index: int, vms: frozenset[str], *, faulted: bool,
                      owns: str | None) -> AsyncIterator[Active]:
        """Register a call: its turns if ``faulted`` (owning ``owns``), then its VMs up.

        Raises :class:`VMUnavailable` if a VM it needs could not be restarted.
        """
        async with contextlib.AsyncExitStack() as turns:
            if faulted:
                for name in sorted(vms):
                    turn = self._turns[name]
                    if name == owns:
                        await turn.own()
                        turns.callback(turn.disown)
                    else:
                        await turn.share()
                        turns.callback(turn.unshare)
            await self._all_up(vms)
            active = self._active[index] = Active(index, vms)
            try:
                yield active
            finally:
                del self._active[index]

    async def _all_up(self, vms: frozenset[str]) -> None:
        while down := [name for name in sorted(vms) if not self._up[name].is_set()]:
            with trio.move_on_after(self._bound):
                await self._up[down[0]].wait()
            if self.broken or not self._up[down[0]].is_set():
                raise VMUnavailable(f"{down[0]} could not be restarted")

    def crashing(self, vm: str, by: int) -> None:
        """``vm`` is about to crash by call ``by``'s fault: mark the others, restart it."""
        if not self._up[vm].is_set():
            return
        self._up[vm] = trio.Event()
        for active in self._active.values():
            if active.index != by and vm in active.vms and active.collateral_of is None:
                active.collateral_of = by
        self._background.start_soon(self._restart, vm)

    async def _restart(self, vm: str) -> None:
        started = trio.current_time()
        try:
            with trio.fail_after(self._bound):
                # The world halts a VM once it sees its agent or daemon gone.
                await until(functools.partial(self._halted, vm), _STATE_POLL)
                await self._world.start(vm)
        except (trio.TooSlowError, DomainsError) as exc:
            why = str(exc) or f"not halted and started again within {self._bound:g} s"
            self.restarts.failures.append(f"{vm}: {why}")
            self.broken = True
        else:
            self.restarts.durations.append(trio.current_time() - started)
        finally:
            self._up[vm].set()

    async def _halted(self, vm: str) -> bool:
        return (await self._world.states()).get(vm) != "Running"


def _set_event() -> trio.Event:
    event = trio.Event()
    event.set()
    return event
