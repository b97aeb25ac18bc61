"""The poll loop of a call's caller side: local fds <-> one data vchan.

What to do with each message, and how input is framed, is
:class:`~qrexec_trio.protocol.CallerSession`'s business (shared with the
trio pump); this module only moves bytes and waits, with the same
backpressure as the trio pump: the next message is taken only once the
previous one was written locally, and local input is read only once the
previous frames went into the vchan, so memory stays bounded.
"""

from __future__ import annotations

import os
import select
import time
from fcntl import F_GETFL, F_SETFL, fcntl

from ..protocol import (
    CLOSE_OUTPUT,
    FINISHED,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    WRITE_ERRORS,
    WRITE_OUTPUT,
    CallerSession,
    Direction,
    Hello,
    MessageReader,
    RemoteProtocolError,
    negotiate_version,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ..protocol import Event
    from ._vchan import DataVchan


class PeerGone(OSError):
    """The other end of the vchan went away while we were sending."""


IN: int = select.POLLIN | select.POLLHUP | select.POLLERR
OUT: int = select.POLLOUT | select.POLLHUP | select.POLLERR


def read_some(fd: int, size: int) -> bytes | None:
    """What ``fd`` has now, at most ``size`` bytes: ``b""`` at its end (or if it
    failed: an input that breaks has ended), None if nothing yet."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def write_some(fd: int, left: memoryview) -> memoryview | None:
    """Write what ``fd`` takes now of ``left``; what is left to write, or None if the
    reader went away (it gets nothing more: the call goes on, as the reference's)."""
    try:
        return left[os.write(fd, left):]
    except BlockingIOError:
        return left
    except OSError:
        return None


class HandshakeTimeout(TimeoutError):
    """The peer sent no HELLO in time."""


def remaining_ms(deadline: float | None) -> int | None:
    """poll()'s timeout until ``deadline`` (a ``time.monotonic`` value; None: never)."""
    return None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))


def wait(fds: dict[int, int], deadline: float | None, *, look_only: bool = False
         ) -> dict[int, int]:
    """poll() the ``fds`` (fd -> events); what happened, {} at the deadline.
    ``look_only``: do not wait at all."""
    poller = select.poll()
    for fd, events in fds.items():
        poller.register(fd, events)
    return dict(poller.poll(0 if look_only else remaining_ms(deadline)))


def feed(reader: MessageReader, data: bytes | None) -> None:
    """What a non-blocking receive gave (:func:`read_some`'s convention) into ``reader``."""
    if data == b"":
        reader.feed_eof()
    elif data is not None:
        reader.feed(data)


def poll_round(vchan: DataVchan, local: dict[int, int], deadline: float | None, *,
               reading: bool, writing: bool) -> tuple[int, dict[int, int]]:
    """One poll() of the vchan (to receive and/or send) and the ``local`` fds (fd ->
    events): what the vchan can do now (poll bits: POLLIN receive, POLLOUT send,
    see ``ready``), and what happened to the local fds.

    A ring vchan may be able to go on without an event (data or room it had
    before we looked): then the poll only looks, so the local fds get their turn.
    """
    fd = vchan.fileno()
    now = vchan.ready(0, reading=reading, writing=writing)
    wanted = dict(local)
    wanted[fd] = wanted.get(fd, 0) | vchan.poll_mask(reading=reading, writing=writing)
    happened = wait(wanted, deadline, look_only=bool(now))
    revents = happened.pop(fd, 0)
    return now | vchan.ready(revents, reading=reading, writing=writing), happened


def _wait_vchan(vchan: DataVchan, deadline: float | None, *, reading: bool = False,
                writing: bool = False) -> bool:
    """Until the vchan can receive (``reading``) or send (``writing``); False at the
    deadline."""
    while True:
        can, _ = poll_round(vchan, {}, deadline, reading=reading, writing=writing)
        if can:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def _next_event(reader: MessageReader, vchan: DataVchan,
                deadline: float | None) -> Event | None:
    """The reader's next event (None: the vchan ended between messages)."""
    while (event := reader.next_event()) is None:
        if reader.at_clean_eof:
            return None
        if not _wait_vchan(vchan, deadline, reading=True):
            raise HandshakeTimeout("no HELLO from the service side in time")
        feed(reader, vchan.receive())
    return event


def _send_all(vchan: DataVchan, data: bytes, deadline: float | None) -> None:
    view = memoryview(data)
    while view:
        if not _wait_vchan(vchan, deadline, writing=True):
            raise HandshakeTimeout("the service side does not read its data vchan")
        view = view[vchan.send(view):]


def exchange_hello(vchan: DataVchan, *, timeout: float) -> MessageReader:
    """Send our HELLO, take the peer's; the reader for the rest of the call."""
    deadline = time.monotonic() + timeout
    _send_all(vchan, Hello(PROTOCOL_VERSION).encode(), deadline)
    reader = MessageReader(Direction.SERVICE_TO_CALLER)
    event = _next_event(reader, vchan, deadline)
    if event is None:
        raise RemoteProtocolError("hello", "peer closed before its HELLO")
    assert isinstance(event, Hello)  # the reader lets nothing else through first
    reader.version = negotiate_version(PROTOCOL_VERSION, event.version)
    return reader


class NonBlocking:
    """Local fds in non-blocking mode for the call, their modes restored after.

    The mode belongs to the open file, which others may share (a terminal), so
    it is put back however the call ends, as the trio clients do.
    """

    def __init__(self, fds: list[int]) -> None:
        self._saved: dict[int, int] = {}
        for fd in fds:
            if fd in self._saved:
                continue
            flags = fcntl(fd, F_GETFL)
            self._saved[fd] = flags
            fcntl(fd, F_SETFL, flags | os.O_NONBLOCK)

    def restore_one(self, fd: int) -> None:
        """Before ``fd`` is closed or replaced: its open file gets its mode back now."""
        flags = self._saved.pop(fd, None)
        if flags is not None:
            try:
                fcntl(fd, F_SETFL, flags)
            except OSError:
                pass

    def restore(self) -> None:
        for fd in list(self._saved):
            self.restore_one(fd)


class CallerLoop:
    """The data phase of one call on the caller's side, driven by poll()."""

    def __init__(self, vchan: DataVchan, reader: MessageReader, session: CallerSession,
                 *, input_fd: int | None, output_fd: int, errors_fd: int | None,
                 close_output: Callable[[], None], prefix: bytes = b"") -> None:
        self._vchan = vchan
        self._reader = reader
        self._session = session
        self._input_fd = input_fd
        self._output_fd = output_fd
        self._fds = {WRITE_OUTPUT: output_fd, WRITE_ERRORS: errors_fd}
        self._close_output = close_output
        #: Whole frames on their way into the vchan.
        self._to_vchan = bytearray(session.frame_input(prefix))
        #: The one local write in progress: (what, fd, bytes left).
        self._local: tuple[str, int, memoryview] | None = None
        self._vchan_ended = False
        if input_fd is None:
            self._to_vchan += session.frame_input_end()
        if errors_fd is None:
            session.errors_gone()

    def run(self) -> int | None:
        """Until the exit status came (returned) or the vchan ended first (None)."""
        local_fds = [fd for fd in (self._input_fd, *self._fds.values()) if fd is not None]
        modes = NonBlocking(local_fds)
        try:
            while not self._session.finished and not self._vchan_ended:
                if self._local is None and self._take_event(modes):
                    continue
                self._step()
        finally:
            modes.restore()
        return self._session.status

    def finish_input(self, timeout: float) -> None:
        """After the status: end our input if it was not ended, best effort, as the
        reference does (the service side may have closed already)."""
        if self._session.input_done or self._vchan_ended:
            return
        self._to_vchan += self._session.frame_input_end()
        deadline = time.monotonic() + timeout
        try:
            while self._to_vchan and _wait_vchan(self._vchan, deadline, writing=True):
                del self._to_vchan[:self._vchan.send(self._to_vchan)]
        except PeerGone:
            pass

    # -- one round -------------------------------------------------------------------

    def _take_event(self, modes: NonBlocking) -> bool:
        """Act on the next buffered message, if there is one; whether there was."""
        event = self._reader.next_event()
        if event is None:
            if self._reader.at_clean_eof:
                self._vchan_ended = True
                return True
            return False
        action = self._session.handle(event)
        if action is None:
            return True
        what, data = action
        if what == CLOSE_OUTPUT:
            modes.restore_one(self._output_fd)
            self._close_output()
        elif what != FINISHED:
            fd = self._fds[what]
            assert fd is not None  # the session drops what has nowhere to go
            self._local = (what, fd, memoryview(data))
        return True

    def _step(self) -> None:
        wanted: dict[int, int] = {}
        if self._input_fd is not None and not self._to_vchan:
            wanted[self._input_fd] = IN
        if self._local is not None:
            fd = self._local[1]
            wanted[fd] = wanted.get(fd, 0) | OUT
        vchan_can, ready = poll_round(self._vchan, wanted, None, reading=self._local is None,
                                      writing=bool(self._to_vchan))
        if self._local is not None and ready.get(self._local[1], 0) & OUT:
            self._write_local()
        if self._input_fd is not None and ready.get(self._input_fd, 0) & IN:
            self._read_input()
        if vchan_can & select.POLLOUT or (vchan_can and self._to_vchan):
            self._send()
        if vchan_can & IN and self._local is None:
            self._receive()

    def _write_local(self) -> None:
        assert self._local is not None
        what, fd, left = self._local
        rest = write_some(fd, left)
        if rest is None:
            if what == WRITE_OUTPUT:
                self._session.output_gone()
            else:
                self._session.errors_gone()
        self._local = (what, fd, rest) if rest else None

    def _read_input(self) -> None:
        assert self._input_fd is not None
        size = max(1, min(self._session.chunk_limit(),
                          self._vchan.buffer_space() - HEADER_SIZE))
        data = read_some(self._input_fd, size)
        if data is None:
            return
        if data:
            self._to_vchan += self._session.frame_input(data)
            return
        self._to_vchan += self._session.frame_input_end()
        self._input_fd = None

    def _send(self) -> None:
        try:
            del self._to_vchan[:self._vchan.send(self._to_vchan)]
        except PeerGone:
            # The service side may finish (and close) without reading our input,
            # as a service that does not exist does; what it sent is still to be
            # read, and decides how the call ended.
            self._to_vchan.clear()
            self._input_fd = None

    def _receive(self) -> None:
        feed(self._reader, self._vchan.receive())


def close_stdout() -> None:
    """End our output for its reader: fd 1 itself is closed; /dev/null keeps the number."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
    finally:
        os.close(null)
