"""The stdio socket switch: a service turns its fd 0 into its output too, with SIGUSR1.

A service's stdin is one end of a socketpair. A service that sends SIGUSR1 to
``$QREXEC_AGENT_PID`` asks for "fd 0 is a socket for both directions": from
then on what it writes to fd 0 is its stdout (golden transcripts ``k`` and
``k2``), and its stdout pipe is no longer read.

The reference forks one agent process per connection, so the signal names the
connection by the pid it reaches. We serve every connection in one process,
and a signal handler cannot tell who sent it; so each service gets a stand-in
for that pid: a sleeping child of its own (the *catcher*), which SIGUSR1's
default action terminates. The catcher dying of SIGUSR1 is the switch, for
that one connection. Any other signal sent to it is harmless, and none reaches
the agent itself.
"""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Final, final

import trio

from .._config import Timeouts
from .._logging import get_logger
from ._process import GroupLedger, child_process

log = get_logger(__name__)

#: A program that does nothing until a signal ends it (longer than any call),
#: under a name of its own so that nobody mistakes it for a service's sleep.
CATCHER_NAME: Final = "qrexec-agent-pid"
_CATCHER_ARGV: Final = (CATCHER_NAME, "2147483647")


@final
class StdioSwitch:
    """One connection's SIGUSR1 stand-in; :attr:`pid` is the service's QREXEC_AGENT_PID."""

    def __init__(self, catcher: trio.Process, settle_timeout: float) -> None:
        self._catcher = catcher
        self._settle_timeout = settle_timeout
        self.pid = catcher.pid
        #: Set once the service asked for the switch.
        self.flipped = trio.Event()
        #: The pipe read in progress, abandoned when the switch flips.
        self.reading: trio.CancelScope | None = None

    async def watch(self) -> None:
        """Wait for the catcher; a death by SIGUSR1 flips the switch."""
        status = await self._catcher.wait()
        if status == -signal.SIGUSR1:
            log.info("service switched its output to its stdin socket")
            self._flip()
        else:
            log.debug("the QREXEC_AGENT_PID stand-in ended", status=status)

    def check(self) -> bool:
        """Flip now if the catcher already died of SIGUSR1 (no waiting)."""
        if not self.flipped.is_set() and self._catcher.poll() == -signal.SIGUSR1:
            self._flip()
        return self.flipped.is_set()

    async def settle(self) -> bool:
        """Whether the service asked for the switch: the final answer, for its output's end.

        Polling the catcher is not enough. ``kill`` returns once the signal is
        queued, so on a busy machine the service can write to fd 0, exit and
        close its pipe before anyone sees the catcher die: its output would be
        lost. A SIGUSR1 already sent is the catcher's fate even before it dies
        (the kernel records a fatal signal's exit status when it is sent, and a
        pending SIGUSR1 is taken before a later SIGTERM), so stopping the
        catcher ourselves and waiting for it tells for certain.
        """
        if not self.flipped.is_set():
            with suppress(ProcessLookupError):
                self._catcher.terminate()
            with trio.move_on_after(self._settle_timeout):
                await self._catcher.wait()
        return self.check()

    def _flip(self) -> None:
        self.flipped.set()
        if self.reading is not None:
            self.reading.cancel()


@functools.cache
def _sleep_program() -> str:
    """Where ``sleep`` is: looked up once (a PATH walk is a few stats, per call)."""
    return shutil.which("sleep") or "sleep"


@asynccontextmanager
async def stdio_switch(timeouts: Timeouts, ledger: GroupLedger | None = None
                       ) -> AsyncIterator[StdioSwitch]:
    """A catcher for one connection; killed when the scope ends.

    Someone must run :meth:`StdioSwitch.watch` while the service runs (the
    service end's ``wait`` does). No task is kept here across the ``yield``:
    a connection releases this resource from its own shielded scope, and a
    nursery opened before that scope could not be closed inside it.
    """
    async with child_process(list(_CATCHER_ARGV), executable=_sleep_program(),
                             timeouts=timeouts, ledger=ledger,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) as catcher:
        yield StdioSwitch(catcher, timeouts.cleanup)


@final
class SwitchableOutput(trio.abc.ReceiveStream):
    """A service's output: its stdout pipe, then, once switched, its stdin socket.

    A pipe read in progress when the switch flips is abandoned (nothing is
    lost: trio's reads are cancellable without consuming data). At the pipe's
    end-of-file the switch is settled (:meth:`StdioSwitch.settle`), since the
    service may have signalled and exited before its catcher's death was noticed.
    """

    def __init__(self, pipe: trio.abc.ReceiveStream, socket: trio.abc.ReceiveStream,
                 switch: StdioSwitch) -> None:
        self._pipe = pipe
        self._socket = socket
        self._switch = switch

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._switch.flipped.is_set():
            data = await self._read_pipe(max_bytes)
            if data is not None:
                return data
        return await self._socket.receive_some(max_bytes)

    async def _read_pipe(self, max_bytes: int | None) -> bytes | bytearray | None:
        """Pipe data; ``b""`` at its end; ``None`` once the switch flipped."""
        data: bytes | bytearray | None = None
        # One cancel scope, not a task per read: this is the data path.
        with trio.CancelScope() as reading:
            self._switch.reading = reading
            try:
                data = await self._pipe.receive_some(max_bytes)
            finally:
                self._switch.reading = None
        if data is None or (not data and await self._switch.settle()):
            return None
        return data

    async def aclose(self) -> None:
        await self._pipe.aclose()
