"""Waiting for what sends no event: another program's state, as it answers or as /proc shows it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def until(check: Callable[[], Awaitable[bool]], interval: float) -> None:
    """Return once ``check()`` is true, asking every ``interval`` seconds.

    The caller bounds it (a cancel scope with a deadline): nothing here gives up.
    """
    while True:
        if await check():
            return
        await trio.sleep(interval)
