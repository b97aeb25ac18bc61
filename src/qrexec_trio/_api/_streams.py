"""Local ends of a call as trio streams: a capture buffer, a sink that drops
everything, and adapters for blocking file objects (the blocking API)."""

from __future__ import annotations

import io
from typing import Protocol

import trio


class Capture(trio.abc.SendStream):
    """A ``stdout``/``stderr`` for :func:`qrexec_trio.call` that keeps what it gets.

    ``capture.data`` holds everything written so far. Memory is not bounded:
    use it for replies of reasonable size, a stream of your own otherwise.
    """

    def __init__(self) -> None:
        self._data = bytearray()

    @property
    def data(self) -> bytes:
        return bytes(self._data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self._data += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class Discard(trio.abc.SendStream):
    """Where output nobody asked for goes: nowhere (but it is still read, so
    that the service is never blocked on a full vchan)."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class Readable(Protocol):
    """A binary file object to read a call's input from (``sys.stdin.buffer``, ...)."""

    def read(self, size: int = -1, /) -> bytes | None: ...


class Writable(Protocol):
    """A binary file object to write a call's output to (``io.BytesIO``, ...)."""

    def write(self, data: bytes, /) -> object: ...


def _never_blocks(file: object) -> bool:
    # Memory files are read and written in place; anything else may block
    # (a pipe, a terminal) and goes through a worker thread.
    return isinstance(file, io.BytesIO)


class FileSource(trio.abc.ReceiveStream):
    """A blocking binary file read as a stream, in a worker thread.

    ``read1`` is preferred where the file has it: it returns what is
    available instead of waiting for a whole chunk (a pipe, a terminal).
    A read still in progress when the call ends is abandoned: whatever it
    then reads is lost.
    """

    def __init__(self, file: Readable) -> None:
        self._file = file
        self._direct = _never_blocks(file)

    def _read(self, size: int) -> bytes:
        read1 = getattr(self._file, "read1", None)
        data = read1(size) if callable(read1) else self._file.read(size)
        return bytes(data or b"")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or io.DEFAULT_BUFFER_SIZE
        if self._direct:
            await trio.lowlevel.checkpoint()
            return self._read(size)
        return await trio.to_thread.run_sync(self._read, size, abandon_on_cancel=True)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # the file is the caller's to close


class FileSink(trio.abc.SendStream):
    """A blocking binary file written as a stream, in a worker thread, flushed
    after every write so that output shows as it comes."""

    def __init__(self, file: Writable) -> None:
        self._file = file
        self._direct = _never_blocks(file)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view.tobytes())
            # Raw files may take part of it; buffered ones take all (and return None or a count).
            view = view[written if isinstance(written, int) and written > 0 else len(view):]
        flush = getattr(self._file, "flush", None)
        if callable(flush):
            flush()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._direct:
            await trio.lowlevel.checkpoint()
            self._write(bytes(data))
            return
        await trio.to_thread.run_sync(self._write, bytes(data), abandon_on_cancel=True)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # the file is the caller's to close
