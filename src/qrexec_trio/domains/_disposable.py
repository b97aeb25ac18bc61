"""A DispVM as an async context manager: made for one call, destroyed after it.

The DispVM belongs to the scope that made it: whatever ends the scope (the
call finished, the caller died, cancellation, dom0 shutting down) destroys it,
in a shielded and bounded cleanup, so no exit path can leave one behind. A
program killed outright runs no cleanup at all: so a long-lived one writes
its DispVMs down in a :class:`DispVMLedger`, and whoever comes after it (its
successor, or whoever halts its VM) destroys what the ledger still names.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Final

import trio

from .._config import Timeouts
from .._logging import get_logger
from ._interface import Domains, DomainsError

log = get_logger(__name__)

#: Names a ledger entry may have (qube names); anything else in the directory is ignored.
_ENTRY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class DispVMLedger:
    """The DispVMs a long-lived program made and has not destroyed yet, on disk."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def record(self, name: str) -> None:
        if _ENTRY.fullmatch(name):
            with open(os.path.join(self.directory, name), "w"):
                pass

    def forget(self, name: str) -> None:
        if _ENTRY.fullmatch(name):
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, name))

    def names(self) -> list[str]:
        try:
            return sorted(entry for entry in os.listdir(self.directory) if _ENTRY.fullmatch(entry))
        except FileNotFoundError:
            return []

    def remove_if_empty(self) -> None:
        with suppress(OSError):
            os.rmdir(self.directory)


async def destroy_leftovers(domains: Domains, ledger: DispVMLedger,
                            timeouts: Timeouts) -> list[str]:
    """Destroy the DispVMs a predecessor left in ``ledger``; returns their names.

    Each kill is bounded; one that fails stays in the ledger (logged) for the next try.
    """
    destroyed = []
    for name in ledger.names():
        try:
            with trio.fail_after(timeouts.cleanup):
                await domains.kill(name)
        except DomainsError as exc:
            if exc.kind != "QubesVMNotFoundError":
                log.error("leftover dispvm could not be destroyed", dispvm=name,
                          error=str(exc))
                continue
        except trio.TooSlowError:
            log.error("leftover dispvm destruction timed out", dispvm=name)
            continue
        ledger.forget(name)
        destroyed.append(name)
    return destroyed


@asynccontextmanager
async def disposable(domains: Domains, template: str, timeouts: Timeouts,
                     ledger: DispVMLedger | None = None) -> AsyncIterator[str]:
    """Create and start a DispVM from ``template``; yields its name; always destroys it.

    With ``ledger``, the DispVM is written down from its creation until it
    was destroyed.
    """
    # Creation is shielded (and bounded): a cancellation that arrived while
    # the domain manager was making the DispVM must not lose its name, or
    # nobody could destroy it. The cancellation still takes effect below.
    with trio.CancelScope(shield=True), trio.fail_after(timeouts.domain_start):
        name = await domains.create_disposable(template)
        if ledger is not None:
            ledger.record(name)
    log.info("dispvm created", dispvm=name, template=template)
    try:
        await trio.lowlevel.checkpoint()  # a pending cancellation ends the call here
        with trio.fail_after(timeouts.domain_start):
            await domains.start(name)
        log.info("dispvm started", dispvm=name)
        yield name
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(timeouts.cleanup) as bounded:
            try:
                await domains.kill(name)
                log.info("dispvm destroyed", dispvm=name)
                if ledger is not None:
                    ledger.forget(name)
            except DomainsError as exc:
                log.error("dispvm could not be destroyed", dispvm=name, error=str(exc))
        if bounded.cancelled_caught:
            log.error("dispvm destruction timed out", dispvm=name)
