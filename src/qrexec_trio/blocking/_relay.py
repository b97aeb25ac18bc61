"""The poll loop of an R2 call: our stdio <-> the agent's three sockets.

In R2 the agent runs the data vchan; the client only relays: its input to
socket 1 (then shuts its write side), socket 0 to its output (closed at
socket 0's end), and reads the status channel, socket 2: remote stderr, then
the exit status or a refusal (:mod:`qrexec_trio.protocol._vm_local`). The status
messages are handled by :class:`~qrexec_trio.protocol.CallerSession`, as on
a data vchan.
"""

from __future__ import annotations

from _socket import SHUT_WR

from .._logging import get_logger
from ..protocol import (
    FINISHED,
    CallerSession,
    Direction,
    MessageReader,
    ProtocolError,
    ServiceRefused,
    filter_escape_chars,
)
from ._io import IN, OUT, NonBlocking, feed, read_some, wait, write_some

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _socket import socket as raw_socket
    from collections.abc import Callable

log = get_logger(__name__)

_CHUNK = 65536


class RefusedByAgent(Exception):
    """The status channel said the call was refused."""


class _Copy:
    """Bytes from one fd to another, one chunk at a time (backpressure)."""

    def __init__(self, source: int, sink: int, at_end: Callable[[], None],
                 transform: Callable[[bytes], bytes] | None = None) -> None:
        self.source: int | None = source
        self._transform = transform
        self.sink = sink
        self._at_end = at_end
        self._left = memoryview(b"")
        self._sink_gone = False

    @property
    def done(self) -> bool:
        return self.source is None and not self._left

    def wanted(self, fds: dict[int, int]) -> None:
        if self._left:
            fds[self.sink] = fds.get(self.sink, 0) | OUT
        elif self.source is not None:
            fds[self.source] = fds.get(self.source, 0) | IN

    def step(self, ready: dict[int, int]) -> None:
        if self._left and ready.get(self.sink, 0) & OUT:
            self._write()
        elif not self._left and self.source is not None and ready.get(self.source, 0) & IN:
            self._read()

    def _read(self) -> None:
        assert self.source is not None
        data = read_some(self.source, _CHUNK)
        if data is None:
            return
        if not data:
            self.source = None
            self._at_end()
        elif not self._sink_gone:
            self._left = memoryview(self._transform(data) if self._transform else data)

    def _write(self) -> None:
        rest = write_some(self.sink, self._left)
        if rest is None:
            self._sink_gone = True
        self._left = rest or memoryview(b"")


def r2_relay(sockets: tuple[raw_socket, raw_socket, raw_socket], *, prefix: bytes,
             filter_output: bool, filter_errors: bool,
             close_output: Callable[[], None]) -> int | None:
    """Relay one R2 call; the remote exit status (None if the channel ended without
    one). Raises :class:`RefusedByAgent`."""
    output_socket, input_socket, status_socket = sockets
    modes = NonBlocking([0, 1, 2, *(sock.fileno() for sock in sockets)])
    try:
        if prefix:
            input_socket.setblocking(True)
            try:
                input_socket.sendall(prefix)
            except OSError:
                pass  # a refusal closes it: the status channel says so
            input_socket.setblocking(False)

        def end_input() -> None:
            try:
                input_socket.shutdown(SHUT_WR)
            except OSError:
                pass

        def end_output() -> None:
            modes.restore_one(1)
            close_output()

        to_remote = _Copy(0, input_socket.fileno(), end_input)
        to_output = _Copy(output_socket.fileno(), 1, end_output,
                          filter_escape_chars if filter_output else None)
        status = _StatusChannel(status_socket.fileno(), filter_errors)
        while not (status.done and to_output.done):
            wanted: dict[int, int] = {}
            if not status.done:
                to_remote.wanted(wanted)  # our input matters only while the call lasts
                status.wanted(wanted)
            to_output.wanted(wanted)
            ready = wait(wanted, None)
            if not status.done:
                to_remote.step(ready)
                status.step(ready)
            to_output.step(ready)
        return status.session.status
    finally:
        modes.restore()


class _StatusChannel:
    """Socket 2: remote stderr to our fd 2, then the outcome."""

    def __init__(self, fd: int, filter_errors: bool) -> None:
        self._fd = fd
        self._reader = MessageReader(Direction.AGENT_TO_CLIENT_VM)
        self.session = CallerSession(2, filter_errors=filter_errors)
        self._errors = memoryview(b"")
        self.done = False

    def wanted(self, fds: dict[int, int]) -> None:
        if self._errors:
            fds[2] = fds.get(2, 0) | OUT
        else:
            fds[self._fd] = fds.get(self._fd, 0) | IN

    def step(self, ready: dict[int, int]) -> None:
        if self._errors:
            if ready.get(2, 0) & OUT:
                self._write_errors()
            return
        if ready.get(self._fd, 0) & IN:
            self._receive()
        self._take_events()

    def _receive(self) -> None:
        feed(self._reader, read_some(self._fd, _CHUNK))

    def _take_events(self) -> None:
        while not self._errors and not self.done:
            try:
                event = self._reader.next_event()
            except ProtocolError as exc:
                log.error("the agent broke the status channel", error=str(exc))
                self.done = True
                return
            if event is None:
                self.done = self._reader.at_clean_eof
                return
            if isinstance(event, ServiceRefused):
                raise RefusedByAgent
            action = self.session.handle(event)
            if action is None:
                continue
            what, data = action
            if what == FINISHED:
                self.done = True
            else:
                self._errors = memoryview(data)

    def _write_errors(self) -> None:
        rest = write_some(2, self._errors)
        if rest is None:
            self.session.errors_gone()
        self._errors = rest or memoryview(b"")
        self._take_events()
