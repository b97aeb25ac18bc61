"""The glue: relay bytes between two streams (the two legs of a VM-to-VM call).

dom0 never parses what the VMs say to each other: once each leg has done its
HELLO, bytes go through unchanged, one chunk in flight per direction (so the
rings give backpressure end to end). The call ends when either side ends: a
vchan has no half-close, so end-of-file from one VM means that VM is done, or
gone. The caller closes both legs afterwards, which is what tells the other VM.

A side that cannot be written to any more only stops its own direction: the
other direction still drains to its end-of-file, so that what a finished
service sent last (its exit code) reaches the caller even when the caller's
late input could no longer be delivered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from ._connection import Meter

_CHUNK: Final = 65536 + 8


async def _copy(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream,
                done: trio.CancelScope, count: Callable[[int], None]) -> None:
    try:
        while data := await source.receive_some(_CHUNK):
            count(len(data))
            try:
                await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the sink is gone: its own end-of-file will end the call
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    # The source ended: that side is done (or gone), and so is the call.
    done.cancel()


async def glue(
    first: trio.abc.Stream, second: trio.abc.Stream, *, first_pending: bytes = b"",
    second_pending: bytes = b"", meter: Meter | None = None,
) -> None:
    """Copy ``first`` (the caller's leg) <-> ``second`` (the service's) until either ends.

    ``*_pending`` are bytes already read from that stream (past its HELLO)
    that must reach the other side before anything else. ``meter`` counts
    the bytes each way (framing included: dom0 does not parse them).
    """
    meter = meter or Meter()

    def to_service(size: int) -> None:
        meter.to_service += size

    def to_caller(size: int) -> None:
        meter.to_caller += size

    async with trio.open_nursery() as nursery:
        if first_pending:
            to_service(len(first_pending))
            await second.send_all(first_pending)
        if second_pending:
            to_caller(len(second_pending))
            await first.send_all(second_pending)
        nursery.start_soon(_copy, first, second, nursery.cancel_scope, to_service)
        nursery.start_soon(_copy, second, first, nursery.cancel_scope, to_caller)
