"""The Connection: one qrexec call, from its first message to its last byte.

Each connection is a trio nursery with a cancel scope, and it owns
everything the call uses: data vchans, daemon sockets, fd-passed sockets,
child process groups, its DispVM, its data port. Resources are entered into
the connection (:meth:`Connection.enter`, :meth:`Connection.callback`) and
released in reverse order when it ends, however it ends: normally, by an
error, or cancelled from outside (the peer went away, SIGTERM, or a user's
``qrexec-trio kill``). That release runs shielded, under its own deadline, so
cancellation cannot skip it and a stuck resource cannot hang it.

A program's :class:`ConnectionRegistry` knows its live connections, so they
can be listed (id, source, target, service, age, bytes each way, state) and
cancelled one by one. The call id is bound in the log context for the whole
connection, so every log line of the call carries it.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar, final

import structlog
import trio

from .._ids import call_id as call_id  # noqa: PLC0414 (defined light, for the clients)
from .._logging import get_logger
from ._errors import one_error

log = get_logger(__name__)

T = TypeVar("T")


class State(enum.Enum):
    """Where a connection is in its life."""

    #: Policy, DispVM, vchans and handshakes: nothing has flowed yet.
    SETUP = "setup"
    #: The data phase: bytes flow between caller and service.
    RUNNING = "running"
    #: Its resources are being released.
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A snapshot of one connection, for listings."""

    id: str
    kind: str
    source: str
    target: str
    service: str
    age: float
    #: Bytes from the caller towards the service, and back; ``None`` where
    #: this program does not carry the data itself.
    bytes_to_service: int | None
    bytes_to_caller: int | None
    state: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@final
class Meter:
    """Byte counters of one connection's data, each way."""

    __slots__ = ("to_caller", "to_service")

    def __init__(self) -> None:
        self.to_service = 0
        self.to_caller = 0


@final
class Connection:
    """One live qrexec connection. Made by :meth:`ConnectionRegistry.open`."""

    def __init__(self, call_id: str, *, kind: str, source: str, target: str, service: str,
                 cleanup_timeout: float) -> None:
        self.id = call_id
        #: What the connection is, as the owner names it ("service", "vm-request", ...).
        self.kind = kind
        self.source = source
        self.target = target
        self.service = service
        self.state = State.SETUP
        self.meter: Meter | None = None
        self.cancel_scope = trio.CancelScope()
        self._started = time.monotonic()
        self._cleanup_timeout = cleanup_timeout
        self._stack = contextlib.AsyncExitStack()
        self._nursery: trio.Nursery | None = None

    @property
    def nursery(self) -> trio.Nursery:
        """The connection's nursery: tasks that must not outlive the call."""
        assert self._nursery is not None, "the connection is not open"
        return self._nursery

    async def enter(self, resource: AbstractAsyncContextManager[T]) -> T:
        """Own ``resource`` until the connection ends; released in reverse order.

        The release runs in the connection's own shielded, bounded scope, so
        ``resource`` must not keep a cancel scope or nursery open across its
        ``yield`` (trio cannot close one inside a scope opened after it): a
        resource that needs a task runs it from a method the call awaits.
        """
        return await self._stack.enter_async_context(resource)

    def callback(self, release: Callable[[], object]) -> None:
        """Call ``release`` when the connection ends (in reverse order with the rest)."""
        self._stack.callback(release)

    def metered(self) -> Meter:
        """Count this connection's bytes (for a program that carries them)."""
        if self.meter is None:
            self.meter = Meter()
        return self.meter

    def running(self) -> None:
        """The data phase has begun."""
        self.state = State.RUNNING

    def describe(self, **what: str) -> None:
        """Fill in what is learnt during set-up (the target after a redirect, ...)."""
        for name, value in what.items():
            if name not in ("source", "target", "service"):
                raise TypeError(f"cannot describe {name!r}")
            setattr(self, name, value)

    def cancel(self) -> None:
        """Tear this connection down: its scope is cancelled and its resources released."""
        self.cancel_scope.cancel()

    @property
    def cancelled(self) -> bool:
        """The connection was cancelled from outside (or by its own cancel)."""
        return self.cancel_scope.cancel_called

    def info(self) -> ConnectionInfo:
        meter = self.meter
        return ConnectionInfo(
            id=self.id, kind=self.kind, source=self.source, target=self.target,
            service=self.service, age=round(time.monotonic() - self._started, 3),
            bytes_to_service=meter.to_service if meter else None,
            bytes_to_caller=meter.to_caller if meter else None,
            state=self.state.value,
        )

    async def _release(self) -> None:
        self.state = State.CLOSING
        with trio.CancelScope(shield=True), trio.move_on_after(self._cleanup_timeout) as late:
            await self._stack.aclose()
        if late.cancelled_caught:
            log.error("connection cleanup timed out; some resources may be left",
                      timeout=self._cleanup_timeout)


@final
class ConnectionRegistry:
    """The live connections of one program (a daemon, an agent)."""

    def __init__(self, *, cleanup_timeout: float) -> None:
        self._cleanup_timeout = cleanup_timeout
        self._live: dict[str, Connection] = {}

    def __len__(self) -> int:
        return len(self._live)

    def list(self) -> list[ConnectionInfo]:
        return [connection.info() for connection in self._live.values()]

    def get(self, call_id: str) -> Connection | None:
        return self._live.get(call_id)

    def cancel(self, call_id: str) -> bool:
        """Cancel one connection; ``False`` if there is no live one with that id."""
        connection = self._live.get(call_id)
        if connection is None:
            return False
        log.info("connection cancelled from outside", call=call_id)
        connection.cancel()
        return True

    def _unique(self, call_id: str) -> str:
        if call_id not in self._live:
            return call_id
        # Two live calls under one id would make `kill` ambiguous.
        for number in range(2, len(self._live) + 3):
            candidate = f"{call_id}+{number}"
            if candidate not in self._live:
                return candidate
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def open(self, call_id: str, *, kind: str, source: str = "", target: str = "",
                   service: str = "") -> AsyncIterator[Connection]:
        """A new connection, live until the block ends.

        Cancelling the connection ends the block without an exception (the
        caller can look at :attr:`Connection.cancelled`); its resources are
        released before ``open`` returns.
        """
        connection = Connection(self._unique(call_id), kind=kind, source=source,
                                target=target, service=service,
                                cleanup_timeout=self._cleanup_timeout)
        self._live[connection.id] = connection
        try:
            # one_error: a failure of the call reaches the caller as itself,
            # not wrapped in the connection nursery's exception group.
            with _bound(call=connection.id), one_error(), connection.cancel_scope:
                try:
                    async with trio.open_nursery() as nursery:
                        connection._nursery = nursery
                        yield connection
                        # The body is done: the connection's own tasks end with it.
                        nursery.cancel_scope.cancel()
                finally:
                    await connection._release()
        finally:
            del self._live[connection.id]


@contextlib.contextmanager
def _bound(**context: str) -> Iterator[None]:
    with structlog.contextvars.bound_contextvars(**context):
        yield
