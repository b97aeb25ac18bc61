"""Small stream adapters."""

from __future__ import annotations

from typing import final

import trio


@final
class EofWatch(trio.abc.ReceiveStream):
    """A receive stream that tells (``at_eof``) when it reached end-of-file.

    A broken or closed stream counts as ended: for whoever waits on
    ``at_eof``, no more data is coming either way.
    """

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self.at_eof = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.at_eof.set()
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()
