"""The agent's request side: calls that programs in this VM make (wire-protocol.md §7.2,
r2-design.md §4).

Two ways in, both world-connectable (any local user may start a call, as in R2
and today's qrexec):

* **Today's trigger socket** (``PATH``, default ``<runtime-dir>/qrexec-agent``).
  A client sends one MSG_TRIGGER_SERVICE4 frame. We name the request
  ``SOCKET<fd>`` after the accepted socket, forward it to dom0, and keep the
  socket: on refusal we close it; on MSG_SERVICE_CONNECT we write the raw
  8-byte exec_params to it (the client then serves the data vchan itself)
  and report MSG_CONNECTION_TERMINATED once the client closes it.
* **The R2 path**: the fdpass socket ``PATH-fdpass`` and the trigger FIFO
  ``PATH-fifo`` (R2 put the FIFO at ``PATH`` itself, where today's socket must
  stay; one path cannot be both, so the FIFO moved beside it). The layouts,
  the CID and the status channel on socket 2 are defined in
  :mod:`..protocol._vm_local`. On MSG_SERVICE_CONNECT the **agent** serves the data
  vchan and relays it to the client's three sockets.

Hardening of the R2 CID, which in R2 bound whatever fd had that number: a CID
binds only sockets this agent accepted on its fdpass socket, that are still
unclaimed (each is claimed once) and not yet expired (``timeouts.cid_claim``),
and that were all three connected by the same process (SO_PEERCRED); any other
CID is refused with a log line and touches no socket. The FIFO carries no
credentials, though: whoever writes a record can name another process's
unclaimed sockets if it guesses their numbers. An unclaimed socket whose
client closed it is released at once, and unclaimed sockets are capped per
process, per user and in all (:class:`ClaimCaps`), so that one local process
cannot hold the slots every caller needs.

The ident a request has here (``SOCKET<fd>``, or the CID) is made of fd
numbers, which the next client gets once the old ones are closed, while dom0
may still hold the old request (its requester gave up waiting). So every ident
sent to dom0 is leased (:class:`DomRequests`) until dom0 answers it or the
control link is lost, and a request whose ident is leased goes to dom0 under a
derived one (``SOCKET13.2``). Only dom0 sees that one: the client, the
status channel and the agent's connection registry keep the request's own.

Requests wait at most ``timeouts.request_answer`` for dom0 (a lost control
link refuses them). Answers for idents not leased are logged and ignored.
Everything here lives in the nursery of :meth:`VmRequests.serve`; cancelling
it closes every socket and the FIFO and removes their files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import select
import socket
import stat
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, Protocol, TypeAlias, TypeVar, final

import structlog
import trio

from .._config import Timeouts
from .._errors import QrexecError
from .._logging import get_logger
from .._sockets import listening_socket, remove_stale, serve_socket, unlink_if_same
from ..nursery import (
    CallerEnd,
    Connection,
    ConnectionRegistry,
    EofWatch,
    FramedLink,
    call_data,
    call_id,
    one_error,
    open_caller_link,
)
from ..protocol import (
    IDENT_SIZE,
    ConnectionTerminated,
    Data,
    Direction,
    Event,
    ExitCode,
    ProtocolError,
    ServiceConnect,
    ServiceRefused,
    Stream,
    TriggerAnswer,
    TriggerService,
)
from ..protocol._vm_local import (
    FD_NUMBER,
    FIFO_RECORD_SIZE,
    control_path,
    decode_fifo_record,
    fdpass_path,
    fifo_path,
    parse_cid,
)
from ..xen import VchanBackend, VchanError

log = get_logger(__name__)

_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
#: Calls whose fdpass sockets may wait for their claim at once (see ClaimCaps).
_CALLS_SET_UP_AT_ONCE: Final = 256
#: FIFO records taken per wake-up: a flood of them must not stall the other tasks.
_RECORDS_PER_WAKE: Final = 64
#: The most records a FIFO can hold at once (1 MiB, Linux's default pipe-max-size,
#: the most an unprivileged writer can make it).
_RECORDS_IN_A_FULL_FIFO: Final = (1 << 20) // FIFO_RECORD_SIZE


class SetupError(QrexecError):
    """A socket or the FIFO could not be created; the message says which and why."""


class ClaimRefused(Exception):
    """A CID that does not name three sockets this agent may hand over."""


class ControlLink(Protocol):
    """What the request side needs from the agent's control vchan."""

    @property
    def control_version(self) -> int | None:
        """The negotiated version, or ``None`` while dom0 is not connected."""

    async def send_control(self, event: Event) -> bool:
        """Send one message to dom0; ``False`` if there is no link to send it on."""


@dataclass(frozen=True)
class RequestPaths:
    trigger: str
    fdpass: str
    fifo: str
    #: The agent's control socket (its live connections; see ``nursery._control``).
    control: str

    @classmethod
    def beside(cls, agent_socket: str) -> RequestPaths:
        return cls(agent_socket, fdpass_path(agent_socket), fifo_path(agent_socket),
                   control_path(agent_socket))


# -- the fdpass sockets' claim table -----------------------------------------------


@dataclass(frozen=True)
class ClaimCaps:
    """How many handed-out sockets may wait unclaimed, by whom.

    Each is an fd of the agent's until it is claimed, its client closes it, or
    ``timeouts.cid_claim`` passes. A caller holds three while it sets up a
    call (our ``qrexec-client-vm`` makes one). A process may hold eight calls'
    worth (a threaded caller); all callers together 256 calls' worth (set up
    at once: a claimed socket leaves the table), a fixed number rather than
    one that follows the data ports, since each is an fd; one user two thirds
    of that, so that the VM's other users (root, a service's user) keep a
    third.
    """

    per_process: int = 3 * 8
    per_user: int = 2 * _CALLS_SET_UP_AT_ONCE
    total: int = 3 * _CALLS_SET_UP_AT_ONCE


class ClaimCapReached(Exception):
    """No room for one more unclaimed socket of this peer; ``cap`` names the cap hit."""

    def __init__(self, cap: str, limit: int) -> None:
        super().__init__(f"{cap} cap of {limit} unclaimed sockets reached")
        self.cap = cap
        self.limit = limit


T = TypeVar("T")


@dataclass
class HandedOut(Generic[T]):
    """One unclaimed socket: ``claimed`` fires when a CID takes it."""

    item: T
    peer: tuple[int, int, int]  # SO_PEERCRED: pid, uid, gid
    claimed: trio.Event = field(default_factory=trio.Event)
    #: Whoever watches the socket until the claim does so in this scope; the
    #: claim cancels it at once, before the request's task reads the socket.
    watch: trio.CancelScope = field(default_factory=trio.CancelScope)


@final
class ClaimTable(Generic[T]):
    """Sockets accepted on the fdpass socket, by fd number, until a CID claims them."""

    def __init__(self, caps: ClaimCaps | None = None) -> None:
        self.caps = caps or ClaimCaps()
        self._entries: dict[int, HandedOut[T]] = {}
        self._per_pid: Counter[int] = Counter()
        self._per_uid: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, fd: int, item: T, peer: tuple[int, int, int]) -> HandedOut[T]:
        """Register a handed-out socket.

        Raises :class:`ClaimCapReached` if its peer (or everyone) holds too many
        (the caller closes the socket). The caps are checked from the narrowest,
        so the log names the process that hit its own cap rather than the total.
        """
        pid, uid, _ = peer
        for cap, held, limit in (("per-process", self._per_pid[pid], self.caps.per_process),
                                 ("per-user", self._per_uid[uid], self.caps.per_user),
                                 ("total", len(self._entries), self.caps.total)):
            if held >= limit:
                raise ClaimCapReached(cap, limit)
        entry = self._entries[fd] = HandedOut(item, peer)
        self._per_pid[pid] += 1
        self._per_uid[uid] += 1
        return entry

    def discard(self, fd: int, item: T) -> bool:
        """Drop ``item`` if it is still unclaimed; ``True`` if it was (the caller closes it)."""
        entry = self._entries.get(fd)
        if entry is None or entry.item is not item:
            return False
        self._remove(fd)
        return True

    def claim(self, cid: bytes) -> tuple[T, T, T]:
        """Hand over the three sockets a CID names, or raise :class:`ClaimRefused`.

        All or nothing: a refused CID leaves every entry as it was.
        """
        try:
            fds = parse_cid(cid)
        except ProtocolError as exc:
            raise ClaimRefused(f"malformed CID: {exc.rule}") from None
        missing = [fd for fd in fds if fd not in self._entries]
        if missing:
            raise ClaimRefused(
                f"fd {missing[0]} is not an unclaimed fdpass socket of this agent "
                "(never handed out, already claimed, closed by its client, or expired)"
            )
        entries = [self._entries[fd] for fd in fds]
        if len({entry.peer[:2] for entry in entries}) != 1:
            raise ClaimRefused("the three sockets were connected by different processes")
        for fd, entry in zip(fds, entries, strict=True):
            self._remove(fd)
            entry.watch.cancel()
            entry.claimed.set()
        return entries[0].item, entries[1].item, entries[2].item

    def _remove(self, fd: int) -> None:
        pid, uid, _ = self._entries.pop(fd).peer
        for counts, key in ((self._per_pid, pid), (self._per_uid, uid)):
            counts[key] -= 1
            if not counts[key]:
                del counts[key]


#: How the wait of an unclaimed socket ended.
_WaitEnd: TypeAlias = Literal["claimed", "closed", "expired"]


# -- one R2 client's three sockets ------------------------------------------------


@final
class _ClientSockets:
    """Socket 0 (the program's stdin), 1 (its stdout) and 2 (the status channel)."""

    def __init__(self, streams: tuple[trio.SocketStream, ...], timeouts: Timeouts) -> None:
        self.stdin, self.stdout, self.status = streams
        self._timeouts = timeouts

    async def send_status(self, frame: bytes) -> None:
        """A status-channel frame, if the client still reads them (else it is dropped)."""
        with trio.move_on_after(self._timeouts.handshake), contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError
        ):
            await self.status.send_all(frame)

    async def end_stdin(self) -> None:
        """Remote stdout ended: the program reads EOF on its stdin."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.stdin.send_eof()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for stream in (self.stdin, self.stdout, self.status):
                await trio.aclose_forcefully(stream)


@final
class _StatusStderr(trio.abc.SendStream):
    """Remote stderr as MSG_DATA_STDERR frames on the status channel."""

    def __init__(self, status: trio.SocketStream) -> None:
        self._status = status

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._status.send_all(Data(Stream.STDERR, bytes(data)).encode())

    async def wait_send_all_might_not_block(self) -> None:
        await self._status.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        # The channel outlives the stderr stream: the final status follows.
        await trio.lowlevel.checkpoint()


@contextlib.contextmanager
def _contained(what: str) -> Iterator[None]:
    """One request's failure is logged and ends that request only, never the agent."""
    try:
        with one_error():
            yield
    except Exception:
        log.exception(f"{what} failed")


async def _drain(stream: trio.abc.ReceiveStream, what: str) -> None:
    """Read and drop what the client writes where nobody listens, until it closes."""
    dropped = 0
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await stream.receive_some():
            dropped += len(data)
    if dropped:
        log.debug("dropped bytes the caller wrote", socket=what, bytes=dropped)


# -- the request side -------------------------------------------------------------


@dataclass
class _Pending:
    #: The request's own ident (what its client knows it by).
    ident: bytes
    answered: trio.Event = field(default_factory=trio.Event)
    answer: ServiceConnect | None = None
    #: Its requester stopped waiting while dom0 may still hold it.
    abandoned: bool = False


@final
class DomRequests:
    """Requests sent to dom0, by the ident dom0 knows them by, while dom0 may hold them.

    dom0's daemon refuses a request whose ident it still tracks. An ident is
    leased from sending until dom0 answers it (connect or refusal), even after
    its requester gave up, or until the control link is lost (a new daemon
    knows nothing of the old requests). A request whose own ident is leased
    is sent under a derived one: the ident, a dot and a generation number
    (``SOCKET13.2``, ``7 8 9.3``), cut to fit the 31-byte limit. Own idents
    have no dot, so a derived one never meets them.
    """

    def __init__(self) -> None:
        self._leases: dict[bytes, _Pending] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, wire: bytes) -> bool:
        return wire in self._leases

    def lease(self, ident: bytes) -> tuple[bytes, _Pending]:
        """The ident to send to dom0 for request ``ident``, leased; and its wait."""
        wire = self._free_form_of(ident)
        pending = self._leases[wire] = _Pending(ident)
        return wire, pending

    def _free_form_of(self, ident: bytes) -> bytes:
        if ident not in self._leases:
            return ident
        for generation in itertools.count(2):
            suffix = b".%d" % generation
            wire = ident[:IDENT_SIZE - 1 - len(suffix)] + suffix
            if wire not in self._leases:
                return wire
        raise AssertionError("unreachable")

    def answer(self, wire: bytes, answer: ServiceConnect | None, what: str) -> None:
        """dom0 answered ``wire``: wake its requester, or end the lease if it gave up."""
        pending = self._leases.get(wire)
        if pending is None or pending.answered.is_set():
            log.warning(f"{what} for no pending request; ignored", request=wire.decode())
        elif pending.abandoned:
            del self._leases[wire]
            log.warning(f"{what} came after its requester gave up; ignored",
                        request=wire.decode())
        else:
            pending.answer = answer
            pending.answered.set()

    def done(self, wire: bytes, *, at_dom0: bool) -> None:
        """The requester stops waiting; the lease stays while dom0 may hold the request."""
        pending = self._leases[wire]
        if pending.answered.is_set() or not at_dom0:
            del self._leases[wire]
        else:
            pending.abandoned = True

    def control_lost(self) -> None:
        """dom0's daemon went away: its requests are refused, every lease ends."""
        for wire, pending in list(self._leases.items()):
            if pending.abandoned:
                del self._leases[wire]
            elif not pending.answered.is_set():
                log.warning("control link lost; request refused", request=wire.decode())
                pending.answered.set()


@final
class VmRequests:
    def __init__(
        self,
        backend: VchanBackend,
        control: ControlLink,
        paths: RequestPaths,
        *,
        timeouts: Timeouts,
        registry: ConnectionRegistry,
    ) -> None:
        self.backend = backend
        self.control = control
        self.paths = paths
        self.timeouts = timeouts
        #: This VM's own calls are connections of the agent, beside its services.
        self.registry = registry
        self._requests = DomRequests()
        self._unclaimed: ClaimTable[trio.SocketStream] = ClaimTable()
        #: The FIFO and the nursery its requests run in, while serving.
        self._fifo: tuple[int, trio.Nursery] | None = None
        #: A graceful stop began: new requests are refused, live calls go on.
        self._stopping = False

    # -- answers from dom0 (called by the agent's control loop) ----------------

    def connect(self, connect: ServiceConnect) -> None:
        self._requests.answer(connect.request_id, connect, "SERVICE_CONNECT")

    def refuse(self, ident: bytes) -> None:
        self._requests.answer(ident, None, "SERVICE_REFUSED")

    def stop_accepting(self) -> None:
        """A graceful stop: this VM's new requests are refused (at once, not
        when the grace ends), the calls already connected go on."""
        self._stopping = True

    def control_lost(self) -> None:
        """dom0's daemon went away: the requests it had are lost with it."""
        self._requests.control_lost()

    # -- serving ----------------------------------------------------------------

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create the trigger socket, the fdpass socket and the FIFO; serve until cancelled.

        Raises :class:`SetupError` (before ``started``) if one cannot be made.
        """
        with contextlib.ExitStack() as cleanup:
            trigger = _listening_socket(self.paths.trigger, cleanup)
            fdpass = _listening_socket(self.paths.fdpass, cleanup)
            fifo = _open_fifo(self.paths.fifo, cleanup)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_socket, trigger, self._trigger_connection, nursery)
                nursery.start_soon(serve_socket, fdpass, self._hand_out, nursery)
                nursery.start_soon(self._read_fifo, fifo, nursery)
                log.info("accepting requests", trigger=self.paths.trigger,
                         fdpass=self.paths.fdpass, fifo=self.paths.fifo)
                task_status.started()

    # -- asking dom0 ------------------------------------------------------------

    async def _ask_dom0(self, request: TriggerService) -> ServiceConnect | None:
        """Forward a validated request; dom0's MSG_SERVICE_CONNECT, or ``None`` if refused."""
        if self._stopping:
            await trio.lowlevel.checkpoint()
            log.warning("request refused: agent stopping")
            return None
        trigger = self._trigger_for_dom0(request)
        if trigger is None:
            return None
        wire, pending = self._requests.lease(request.request_id)
        # Unless the send says it failed: a send cut short by cancellation may have gone out.
        at_dom0 = True
        try:
            if wire != request.request_id:
                log.info("request id still held by dom0; sending a derived one",
                         dom0_request=wire.decode())
            if not await self.control.send_control(
                    dataclasses.replace(trigger, request_id=wire)):
                at_dom0 = False
                log.warning("request refused: dom0 is not connected")
                return None
            log.info("request forwarded")
            with trio.move_on_after(self.timeouts.request_answer):
                await pending.answered.wait()
            if not pending.answered.is_set():
                log.warning("request refused: dom0 did not answer",
                            waited=self.timeouts.request_answer)
            elif pending.answer is None:
                log.info("request refused by dom0")
            return pending.answer
        finally:
            self._requests.done(wire, at_dom0=at_dom0)

    def _trigger_for_dom0(self, request: TriggerService) -> TriggerService | None:
        """The trigger message the connected daemon understands (TRIGGER4, 3 or 2)."""
        version = self.control.control_version
        if version is None:
            log.warning("request refused: dom0 is not connected")
            return None
        version = min(version, 4)
        if request.source and version < 4:
            # Dropping the requested source would make a relayed call look like our own.
            log.warning("request refused: the daemon's protocol cannot carry a source qube",
                        version=version)
            return None
        trigger = dataclasses.replace(request, version=version)
        try:
            trigger.encode()
        except ProtocolError as exc:
            log.warning("request refused: it does not fit the daemon's protocol",
                        version=version, error=str(exc))
            return None
        return trigger

    async def _terminated(self, connect: ServiceConnect) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.timeouts.cleanup):
            await self.control.send_control(
                ConnectionTerminated(connect.connect_domain, connect.connect_port))

    # -- today's trigger socket -------------------------------------------------

    async def _trigger_connection(self, stream: trio.SocketStream) -> None:
        ident = b"SOCKET%d" % stream.socket.fileno()
        with (
            structlog.contextvars.bound_contextvars(request=ident.decode()),
            _contained("trigger-socket request"),
        ):
            async with stream, self.registry.open(
                call_id(self.backend.own_domain, ident), kind="call",
                source=f"domain {self.backend.own_domain}",
            ) as conn:
                await self._trigger_request(conn, stream, ident)

    async def _trigger_request(self, conn: Connection, stream: trio.SocketStream,
                               ident: bytes) -> None:
        request = await self._read_trigger(stream, ident)
        if request is None:
            return
        conn.describe(target=request.target.decode(), service=request.service_name.decode())
        with structlog.contextvars.bound_contextvars(
            service=request.service_name.decode(), target=request.target.decode()
        ):
            connect = await self._ask_dom0(request)
            if connect is None:
                return  # closing the socket is today's refusal
            try:
                conn.running()
                await self._connect_trigger_client(stream, connect)
            finally:
                await self._terminated(connect)

    async def _read_trigger(
        self, stream: trio.SocketStream, ident: bytes
    ) -> TriggerService | None:
        """The client's one MSG_TRIGGER_SERVICE4, renamed to ``ident`` and validated."""
        link = FramedLink(stream, Direction.CLIENT_VM_TO_AGENT)
        try:
            with trio.fail_after(self.timeouts.client_request):
                request = await link.receive()
            if request is None:
                log.info("trigger client closed before its request")
                return None
            # The reader lets only a TRIGGER_SERVICE4 through on this link; the
            # client's request-id field is never used: the request gets ours.
            assert isinstance(request, TriggerService)
            return dataclasses.replace(request, request_id=ident)
        except ProtocolError as exc:
            log.warning("invalid trigger refused", error=str(exc))
        except trio.TooSlowError:
            log.warning("trigger client sent no request in time",
                        waited=self.timeouts.client_request)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("trigger client went away", error=str(exc) or type(exc).__name__)
        return None

    async def _connect_trigger_client(
        self, stream: trio.SocketStream, connect: ServiceConnect
    ) -> None:
        """Tell the client where to serve the data vchan; wait until it is done."""
        reply = TriggerAnswer(connect.connect_domain, connect.connect_port).encode()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.move_on_after(self.timeouts.handshake):
                await stream.send_all(reply)
            log.info("client connecting", domain=connect.connect_domain,
                     port=connect.connect_port)
        # The call runs between the client and the other side; its end is the
        # client closing this socket (however long the call takes).
        await _drain(stream, "trigger")
        log.info("client finished", port=connect.connect_port)

    # -- the R2 path: fdpass sockets --------------------------------------------

    async def _hand_out(self, stream: trio.SocketStream) -> None:
        """Tell a client its socket's fd number; close the socket if nobody claims it."""
        with _contained("fdpass connection"):
            await self._hold_unclaimed(stream)

    async def _hold_unclaimed(self, stream: trio.SocketStream) -> None:
        fd = stream.socket.fileno()
        pid, uid, _ = peer = _peer_credentials(stream.socket)
        try:
            # Registered before the number leaves: the claim can never outrun the entry.
            entry = self._unclaimed.add(fd, stream, peer)
        except ClaimCapReached as exc:
            log.warning("too many unclaimed fdpass sockets; connection closed",
                        cap=exc.cap, limit=exc.limit, pid=pid, uid=uid)
            await trio.aclose_forcefully(stream)
            return
        ended: _WaitEnd = "expired"
        try:
            with trio.fail_after(self.timeouts.handshake):
                await stream.send_all(FD_NUMBER.pack(fd))
            log.debug("fdpass socket handed out", fd=fd, pid=pid, uid=uid)
            ended = await self._until_claimed(stream.socket, entry)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("fdpass client went away", fd=fd, error=str(exc) or type(exc).__name__)
        finally:
            if self._unclaimed.discard(fd, stream):
                if ended == "closed":
                    # At debug level: a caller may open and close sockets at will.
                    log.debug("fdpass socket released: its client closed it", fd=fd, pid=pid)
                else:
                    log.info("fdpass socket closed unclaimed", fd=fd, pid=pid,
                             waited=self.timeouts.cid_claim)
                await trio.aclose_forcefully(stream)

    async def _until_claimed(self, sock: trio.socket.SocketType,
                             entry: HandedOut[trio.SocketStream]) -> _WaitEnd:
        """Wait for the claim: ``"claimed"``, or ``"closed"`` if the client closed the
        socket first, or ``"expired"`` after ``timeouts.cid_claim``."""
        with trio.move_on_after(self.timeouts.cid_claim):
            with entry.watch:  # the claim cancels it: the socket is the request's then
                if await _closed_by_peer(sock):
                    # A client closes a socket only once it wrote its record (it needs
                    # all three numbers first): that record is in the FIFO by now.
                    self._take_waiting_records(_RECORDS_IN_A_FULL_FIFO)
                    if not entry.claimed.is_set():
                        return "closed"
            await entry.claimed.wait()
            return "claimed"
        return "expired"

    # -- the R2 path: the trigger FIFO ---------------------------------------------

    async def _read_fifo(self, fd: int, nursery: trio.Nursery) -> None:
        # We hold a write end of our own, so reads never see end-of-file.
        self._fifo = fd, nursery
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                self._take_waiting_records(_RECORDS_PER_WAKE)
        finally:
            self._fifo = None

    def _take_waiting_records(self, limit: int) -> None:
        """The records the FIFO holds now (at most ``limit``), without waiting."""
        if self._fifo is None:
            return
        fd, nursery = self._fifo
        for _ in range(limit):
            try:
                raw = os.read(fd, FIFO_RECORD_SIZE)
            except BlockingIOError:
                return
            if not raw:  # cannot happen while we hold a writer; never spin on it
                return
            self._take_record(raw, nursery)

    def _take_record(self, raw: bytes, nursery: trio.Nursery) -> None:
        try:
            service, target, cid = decode_fifo_record(raw)
        except ProtocolError as exc:
            log.warning("trigger record dropped", error=str(exc), size=len(raw))
            return
        with structlog.contextvars.bound_contextvars(
            request=cid.decode("ascii", "replace"),
            service=service.decode("ascii", "replace"),
            target=target.decode("ascii", "replace"),
        ):
            try:
                streams = self._unclaimed.claim(cid)
            except ClaimRefused as exc:
                log.warning("R2 request refused: bad connection id", reason=str(exc))
                return
            sockets = _ClientSockets(streams, self.timeouts)
            try:
                request = TriggerService(4, b"", target, cid, service)
                request.encode()  # dom0's rules, checked here
            except ProtocolError as exc:
                log.warning("R2 request refused: invalid", error=str(exc))
                request = None
            nursery.start_soon(self._r2_request, cid, request, sockets)

    async def _r2_request(
        self, cid: bytes, request: TriggerService | None, sockets: _ClientSockets
    ) -> None:
        own = self.backend.own_domain
        with _contained("R2 request"):
            async with self.registry.open(
                call_id(own, cid), kind="call", source=f"domain {own}",
                target=request.target.decode() if request else "",
                service=request.service_name.decode() if request else "",
            ) as conn:
                await self._r2_call(conn, cid, request, sockets)

    async def _r2_call(
        self, conn: Connection, cid: bytes, request: TriggerService | None,
        sockets: _ClientSockets,
    ) -> None:
        try:
            connect = await self._ask_dom0(request) if request is not None else None
            if connect is None:
                await sockets.send_status(ServiceRefused(cid).encode())
                return
            try:
                status = await self._serve_r2_call(conn, connect, sockets)
                if status is not None:
                    await sockets.send_status(ExitCode(status).encode())
            finally:
                await self._terminated(connect)
        finally:
            await sockets.aclose()

    async def _serve_r2_call(self, conn: Connection, connect: ServiceConnect,
                             sockets: _ClientSockets) -> int | None:
        """Serve the data vchan as the caller; the remote status (-1: the vchan died),
        or ``None`` if the client went away first."""
        domain, port = connect.connect_domain, connect.connect_port
        try:
            with one_error():
                link = await open_caller_link(
                    self.backend, domain, port, accept_timeout=self.timeouts.data_vchan_connect,
                    handshake_timeout=self.timeouts.handshake)
                await conn.enter(link.stream)
                log.info("call connected", domain=domain, port=port)
                conn.running()
                status = await self._relay(link, sockets, conn)
        except (VchanError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError) as exc:
            log.warning("data vchan failed", error=str(exc) or type(exc).__name__)
            return -1
        log.info("call finished", status=status)
        return status

    async def _relay(self, link: FramedLink, sockets: _ClientSockets,
                     conn: Connection) -> int | None:
        source = EofWatch(sockets.stdout)  # socket 1: the program's output
        end = CallerEnd(input=source, output=sockets.stdin, errors=_StatusStderr(sockets.status),
                        close_output=sockets.end_stdin)
        status: int | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._end_when_client_leaves, sockets, source.at_eof,
                               nursery.cancel_scope)
            status = await call_data(link, end, finish_timeout=self.timeouts.send_finish,
                                     meter=conn.metered())
            nursery.cancel_scope.cancel()
        return status

    async def _end_when_client_leaves(
        self, sockets: _ClientSockets, input_done: trio.Event, call: trio.CancelScope
    ) -> None:
        """Cancel the call once the client closed all three sockets, after a grace period.

        The program may well exit right after writing its last byte (its stdout
        EOF went out as STDIN EOF); the service gets ``kill_grace`` to finish
        with it before the vchan closes under it.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, sockets.stdin, "stdin")
            nursery.start_soon(_drain, sockets.status, "status")
            nursery.start_soon(input_done.wait)
        log.info("caller closed its sockets", grace=self.timeouts.kill_grace)
        await trio.sleep(self.timeouts.kill_grace)
        log.warning("caller gone; ending the call")
        call.cancel()


# -- sockets and the FIFO on disk ------------------------------------------------


async def _closed_by_peer(sock: trio.socket.SocketType) -> bool:
    """Wait until the client writes to or closes an unclaimed socket; ``True`` if it
    closed it with nothing left unread.

    Nothing is consumed: the program may write its output before the record is
    read. Data, or a half-close (a caller whose input ended at once shuts its
    side of socket 1 down), mean the client is alive; then there is nothing
    more to learn here (the socket stays readable), so the caller stops
    watching rather than spin.
    """
    await trio.lowlevel.wait_readable(sock)
    try:
        if await sock.recv(1, socket.MSG_PEEK):  # readable: this returns at once
            return False
    except OSError:  # ECONNRESET: closed before it read its number
        return True
    # End of file: a full close only if the peer's side is gone both ways.
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(mask & (select.POLLHUP | select.POLLERR) for _, mask in poller.poll(0))


def _peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return int(pid), int(uid), int(gid)


def _listening_socket(path: str, cleanup: contextlib.ExitStack) -> trio.socket.SocketType:
    """A world-connectable unix socket at ``path``; closed and unlinked by ``cleanup``."""
    try:
        return cleanup.enter_context(listening_socket(path, mode=0o666))
    except OSError as exc:
        raise SetupError(f"cannot create socket {path}: {exc.strerror or exc}") from exc


def _open_fifo(path: str, cleanup: contextlib.ExitStack) -> int:
    """The trigger FIFO (mode 0666), open for reading; closed and unlinked by ``cleanup``."""
    try:
        remove_stale(path, stat.S_ISFIFO)
        os.mkfifo(path, 0o666)
        inode = os.lstat(path).st_ino
        cleanup.callback(unlink_if_same, path, inode)
        os.chmod(path, 0o666)  # mkfifo honours the umask
        flags = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
        read_fd = os.open(path, os.O_RDONLY | flags)
        cleanup.callback(_close_fd, read_fd)
        # Our own writer: without one, every reader sees EOF when the last
        # client closes, and would have to reopen the FIFO.
        write_fd = os.open(path, os.O_WRONLY | flags)
        cleanup.callback(os.close, write_fd)
        if os.fstat(read_fd).st_ino != inode:
            raise OSError(errno.EEXIST, "replaced while it was being opened")
    except OSError as exc:
        raise SetupError(f"cannot create FIFO {path}: {exc.strerror or exc}") from exc
    return read_fd


def _close_fd(fd: int) -> None:
    trio.lowlevel.notify_closing(fd)
    os.close(fd)
