"""A DispVM as an async context manager: made for one call, destroyed after it.

The DispVM belongs to the scope that made it: whatever ends the scope (the
call finished, the caller died, cancellation, dom0 shutting down) destroys it,
in a shielded and bounded cleanup, so no exit path can leave one behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .._config import Timeouts
from .._logging import get_logger
from ._interface import Domains, DomainsError

log = get_logger(__name__)


@asynccontextmanager
async def disposable(domains: Domains, template: str, timeouts: Timeouts) -> AsyncIterator[str]:
    """Create and start a DispVM from ``template``; yields its name; always destroys it."""
    # Creation is shielded (and bounded): a cancellation that arrived while
    # the domain manager was making the DispVM must not lose its name, or
    # nobody could destroy it. The cancellation still takes effect below.
    with trio.CancelScope(shield=True), trio.fail_after(timeouts.domain_start):
        name = await domains.create_disposable(template)
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
            except DomainsError as exc:
                log.error("dispvm could not be destroyed", dispvm=name, error=str(exc))
        if bounded.cancelled_caught:
            log.error("dispvm destruction timed out", dispvm=name)
