"""A client's own stdio as trio streams: stdin, stdout (or one stdin socket), stderr.

Shared by ``qrexec-client`` and ``qrexec-client-vm``: both close their
stdout when the remote stdout ends, and both can carry both directions on
a stdin that is a socket (``--use-stdin-socket``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator

import trio
from trio.lowlevel import FdStream

from .._logging import get_logger

log = get_logger(__name__)


def stdin_socket_problem() -> str | None:
    """Why fd 0 cannot be used with ``--use-stdin-socket``, or ``None`` if it can."""
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            return "--use-stdin-socket passed, but stdin not a socket"
        return f"--use-stdin-socket: {exc.strerror}"
    with sock:
        if sock.type != socket.SOCK_STREAM:
            return f"stdin is a socket of type {int(sock.type)}, not SOCK_STREAM"
    return None


class LocalOutput(trio.abc.SendStream):
    """Where remote stdout goes: our stdout, or the stdin socket's sending side.

    :meth:`close` ends it for its reader (our fd 1 itself is closed, not just
    a duplicate); a reader that went away closes it too, and the failing
    write raises so that the caller drops the rest.
    """

    def __init__(self, stream: trio.abc.SendStream, *, socket_stream: bool) -> None:
        self._stream = stream
        self._socket = socket_stream
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise trio.ClosedResourceError
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("our stdout's reader went away; dropping remote stdout")
            await self.close()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def close(self) -> None:
        """End the output: the reader sees EOF (a socket: its sending side only)."""
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        self.closed = True
        if self._socket:
            assert isinstance(self._stream, trio.SocketStream)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                     OSError):
                await self._stream.send_eof()
            return
        await self._stream.aclose()
        # Our fd 1 too, or its reader never sees EOF; /dev/null keeps the number taken.
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
        finally:
            os.close(null)

    async def aclose(self) -> None:
        await self.close()


@contextlib.asynccontextmanager
async def local_ends(
    use_stdin_socket: bool,
) -> AsyncIterator[tuple[trio.abc.ReceiveStream, LocalOutput, trio.abc.SendStream]]:
    """Our input, our output and our stderr as trio streams.

    With ``--use-stdin-socket`` fd 0 is a socket carrying both directions.
    The streams own duplicates (trio makes them non-blocking while we run and
    restores their mode when they are closed).
    """
    stderr = FdStream(os.dup(2))
    if use_stdin_socket:
        both = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(0))))
        streams: list[trio.abc.AsyncResource] = [both, stderr]
        source: trio.abc.ReceiveStream = both
        output = LocalOutput(both, socket_stream=True)
    else:
        stdin, stdout = FdStream(os.dup(0)), FdStream(os.dup(1))
        streams = [stdin, stdout, stderr]
        source, output = stdin, LocalOutput(stdout, socket_stream=False)
    try:
        yield source, output, stderr
    finally:
        with trio.CancelScope(shield=True):
            for stream in streams:
                await stream.aclose()


