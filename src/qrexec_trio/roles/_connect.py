"""Building the connection for an allowed VM-initiated call (one implementation).

Used by the daemon (in-process policy), by ``qrexec-policy`` (R2: the policy
program makes the second half of the connection) and by ``qrexec-client -c``.
A call has a *source leg*, where dom0 plays the service side towards the
calling VM (MSG_SERVICE_CONNECT with connect_domain 0), and, for a VM target,
a *target leg*, where dom0 plays the caller towards the target VM
(MSG_EXEC_CMDLINE ``USER:QUBESRPC SVC+ARG SOURCE`` with connect_domain 0,
through the target's daemon socket). dom0 glues the two data vchans and never
parses the bytes. For a dom0 target, the source leg is served by
``qubes-rpc-multiplexer`` running the service here.

Everything a call opens is entered into its :class:`~qrexec_trio.nursery.Connection`:
when the connection ends (normally, by failure or by cancellation) both
vchans and the daemon sockets are closed, the multiplexer's process group is
killed and the DispVM destroyed.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import trio

from .._config import Timeouts
from .._logging import get_logger
from .._sockets import connect_unix
from ..blocking._daemon_client import DOM0_NAMES as DOM0_NAMES  # noqa: PLC0414 (its users import it here)
from ..blocking._daemon_client import ConnectError as ConnectError  # noqa: PLC0414
from ..blocking._daemon_client import RequestRefused as RequestRefused  # noqa: PLC0414
from ..blocking._daemon_client import TargetNotRunning as TargetNotRunning  # noqa: PLC0414
from ..blocking._daemon_client import connect_failure, daemon_socket_path, port_from_reply
from ..domains import DispVMLedger, Domains, DomainsError, disposable
from ..nursery import (
    Connection,
    ConnectionRegistry,
    FramedLink,
    GroupLedger,
    call_id,
    glue,
)
from ..protocol import (
    CLIENT_PROTOCOL_VERSION,
    DATA_RING_SIZE,
    PROTOCOL_VERSION,
    Direction,
    ExecCmdline,
    JustExec,
    RpcCall,
    ServiceConnect,
    negotiate_version,
)
from ..services import Runner, rpc_config_path, service_path
from ..xen import Vchan, VchanBackend
from ._launch import hold_for_session, prepare, serve_prepared

log = get_logger(__name__)

#: What a client asks a daemon for.
DaemonRequest = ExecCmdline | JustExec | ServiceConnect


async def open_daemon_request(
    socket_dir: str, target: str, request: DaemonRequest, timeouts: Timeouts
) -> FramedLink:
    """Connect to ``target``'s daemon, exchange HELLOs and send one request.

    The caller owns the link's socket (it stays open for the whole call:
    the daemon closes it when the agent reports the connection terminated).
    """
    path = daemon_socket_path(socket_dir, target)
    try:
        stream = await connect_unix(path, timeout=timeouts.handshake)
    except OSError as exc:
        raise connect_failure(path, target, exc) from exc
    link = FramedLink(stream, Direction.DAEMON_TO_CLIENT)
    try:
        with trio.fail_after(timeouts.handshake):
            version = negotiate_version(
                CLIENT_PROTOCOL_VERSION, await link.receive_hello(), CLIENT_PROTOCOL_VERSION
            )
            link.version = version
            await link.send_hello(CLIENT_PROTOCOL_VERSION)
            await link.send(request)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return link


async def request_port(
    socket_dir: str, target: str, request: DaemonRequest, timeouts: Timeouts
) -> tuple[trio.SocketStream, int, int]:
    """Send one request to ``target``'s daemon; returns (socket, domid, port).

    The socket stays open for the whole call: the daemon closes it when the
    agent reports the connection terminated.
    """
    link = await open_daemon_request(socket_dir, target, request, timeouts)
    stream = link.stream
    assert isinstance(stream, trio.SocketStream)
    try:
        with trio.fail_after(timeouts.handshake):
            domain, port = port_from_reply(await link.receive(), request, target)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return stream, domain, port


#: Answers the source VM's pending request: sends MSG_SERVICE_CONNECT and
#: returns the (source domid, port) of the data vchan the VM now offers.
AcceptSource = Callable[[], Awaitable[tuple[int, int]]]


def accept_via_daemon_socket(
    socket_dir: str, source: str, ident: bytes, timeouts: Timeouts, conn: Connection
) -> AcceptSource:
    """The source leg through the source's daemon socket (qrexec-policy, qrexec-client -c).

    The daemon socket is held by ``conn`` until the call ends.
    """

    async def accept() -> tuple[int, int]:
        stream, domid, port = await request_port(
            socket_dir, source, ServiceConnect(0, 0, ident), timeouts)
        await conn.enter(stream)
        return domid, port

    return accept


@dataclass(frozen=True)
class Target:
    """Where an allowed call goes, as the policy decided."""

    name: str
    user: str
    #: The target as the VM asked for it (for a dom0 service's environment).
    requested: str
    #: Start the target if it is not running (policy ``autostart``).
    autostart: bool = False

    @property
    def is_dom0(self) -> bool:
        return self.name in DOM0_NAMES

    @property
    def dispvm_template(self) -> str | None:
        """For a new DispVM (``@dispvm:TEMPLATE``), its template."""
        prefix = "@dispvm:"
        return self.name[len(prefix):] if self.name.startswith(prefix) else None


def target_cmdline(target: Target, descriptor: str, source: str) -> bytes:
    """``USER:QUBESRPC SVC+ARG SOURCE``; a descriptor without ``+`` gets one (§7.4)."""
    if "+" not in descriptor:
        descriptor += "+"
    return f"{target.user}:QUBESRPC {descriptor} {source}".encode("utf-8", "surrogateescape")


def dom0_service_call(target: Target, descriptor: str, source: str) -> RpcCall:
    """The dom0 form: ``SVC+ARG SOURCE name|keyword TARGET`` (keyword without its ``@``)."""
    if "+" not in descriptor:
        descriptor += "+"
    name, _, argument = descriptor.partition("+")
    requested = target.requested
    kind, value = ("keyword", requested[1:]) if requested.startswith("@") else ("name", requested)
    return RpcCall(descriptor, name, argument, source, kind, value or "dom0")


class NoTurnToConnect(ConnectError):
    """A VM-to-VM call did not get its turn to be connected in time (see :class:`Connector`)."""


class Connector:
    """Builds connections for allowed calls; one per dom0 program.

    With ``max_connecting``, at most that many VM-to-VM calls are being
    connected at once (from the target's request until both legs' HELLOs);
    the others wait their turn *before* anything of theirs starts. Setting up
    a call is a chain of steps through several processes, each bounded by a
    short timeout (a leg's HELLO, the target's data vchan). A thousand calls
    set up at once share the CPU, so every step of every call gets slow
    together, and the bounds fire on calls that are merely queued. Calls that
    wait their turn wait where waiting is expected: their caller is waiting
    for dom0's answer anyway.
    """

    def __init__(self, backend: VchanBackend, timeouts: Timeouts, socket_dir: str,
                 ledger: GroupLedger | None = None, domains: Domains | None = None,
                 *, max_connecting: int | None = None,
                 dispvms: DispVMLedger | None = None) -> None:
        self.backend = backend
        self.timeouts = timeouts
        self.socket_dir = socket_dir
        #: The domain manager, for DispVMs and autostart (None: neither is possible).
        self.domains = domains
        #: Where dom0 services' process groups are written down (for a successor).
        self.ledger = ledger
        #: Where the DispVMs of this program's calls are written down (for a successor).
        self.dispvms = dispvms
        self._connecting = trio.CapacityLimiter(max_connecting) if max_connecting else None

    async def connect(
        self, conn: Connection, accept_source: AcceptSource, target: Target, descriptor: str,
        source: str, *, turn_by: float = math.inf,
    ) -> int | None:
        """Build and run the whole call in ``conn``; returns a dom0 service's exit status.

        Everything the call opens is entered into ``conn``, so it is released
        when the connection ends, however it ends. For a VM target the target
        leg is set up *before* the source is answered, so that a target that
        cannot be reached is a refusal, not a half-open call. A VM-to-VM call
        that has no turn to be connected by ``turn_by`` (trio's clock) raises
        :class:`NoTurnToConnect`, the source still unanswered.
        """
        conn.describe(target=target.name, service=descriptor)
        if target.is_dom0:
            call = dom0_service_call(target, descriptor, source)
            return await self.dom0_service(
                conn, accept_source, f"QUBESRPC {call.text}".encode("utf-8", "surrogateescape"),
                source)
        template = target.dispvm_template
        if template is None:
            await self._vm_to_vm(conn, accept_source, target,
                                 target_cmdline(target, descriptor, source), turn_by)
            return None
        if self.domains is None:
            raise ConnectError("DispVMs are not available: no domain manager")
        # The DispVM lives exactly as long as this connection: created here,
        # destroyed when the connection ends, however it ends.
        name = await conn.enter(disposable(self.domains, template, self.timeouts,
                                                self.dispvms))
        conn.describe(target=name)
        dispvm = replace(target, name=name, autostart=False)
        await self._vm_to_vm(conn, accept_source, dispvm,
                             target_cmdline(dispvm, descriptor, source), turn_by)
        return None

    async def _open_source(self, conn: Connection, accept_source: AcceptSource) -> FramedLink:
        domid, port = await accept_source()
        vchan = await conn.enter(await self.backend.connect(
            domid, port, timeout=self.timeouts.data_vchan_connect))
        return FramedLink(vchan, Direction.CALLER_TO_SERVICE)

    async def dom0_service(self, conn: Connection, accept_source: AcceptSource,
                            cmdline: bytes, source: str) -> int:
        """Serve the source leg with a dom0 command: a service call or a plain command.

        The same service code as a VM's agent (rpc-config, socket services,
        wait-for-session, 125/127 on the data vchan), but stderr stays in
        dom0, as the reference's: the VM gets only the empty stderr message.
        """
        runner = dom0_runner()
        prepared = prepare(runner, rpc_config_path(), conn, cmdline, with_user=False,
                           extra_env={"QREXEC_REMOTE_DOMAIN": source})
        await hold_for_session(prepared, runner, timeouts=self.timeouts, ledger=self.ledger)
        link = await self._open_source(conn, accept_source)
        with trio.fail_after(self.timeouts.handshake):
            # As the reference's dom0 service side: read the VM's HELLO first.
            peer = await link.receive_hello()
            link.version = negotiate_version(PROTOCOL_VERSION, peer)
            await link.send_hello(PROTOCOL_VERSION)
        return await serve_prepared(conn, link, prepared, timeouts=self.timeouts,
                                    ledger=self.ledger, forward_stderr=False)

    async def _request_target(self, target: Target,
                              cmdline: bytes) -> tuple[trio.SocketStream, int, int]:
        request = ExecCmdline(0, 0, cmdline)
        try:
            return await request_port(self.socket_dir, target.name, request, self.timeouts)
        except TargetNotRunning:
            domains = self.domains
            if not target.autostart or domains is None:
                raise
        log.info("starting the target", target=target.name)
        try:
            with trio.fail_after(self.timeouts.domain_start):
                await domains.start(target.name)
        except (DomainsError, trio.TooSlowError) as exc:
            reason = exc.message if isinstance(exc, DomainsError) else "timed out"
            raise TargetNotRunning(
                f"{target.name} is not running and could not be started: {reason}") from exc
        return await request_port(self.socket_dir, target.name, request, self.timeouts)

    async def _target_leg(self, conn: Connection, target: Target, cmdline: bytes) -> Vchan:
        stream, domid, port = await self._request_target(target, cmdline)
        # The target's daemon socket is held for the whole call: its daemon
        # closes it when the target's agent reports the connection done.
        await conn.enter(stream)
        vchan = await conn.enter(await self.backend.serve_one(
            domid, port, timeout=self.timeouts.data_vchan_accept, read_min=DATA_RING_SIZE,
            write_min=DATA_RING_SIZE))
        log.info("target leg open", target=target.name, target_call=call_id(domid, port))
        return vchan

    @contextlib.asynccontextmanager
    async def _turn_to_connect(self, turn_by: float) -> AsyncIterator[None]:
        """Hold one of the ``max_connecting`` turns (see the class); none if unbounded."""
        turns = self._connecting
        if turns is None:
            yield
            return
        if turns.available_tokens == 0:
            log.info("call waits its turn to be connected", connecting=turns.borrowed_tokens)
        got_turn = False
        with trio.move_on_at(turn_by):
            await turns.acquire()
            got_turn = True
        if not got_turn:
            raise NoTurnToConnect(
                f"no turn to be connected in time: {turns.borrowed_tokens} calls from this "
                "VM were being connected, the most at once (--max-connecting)")
        try:
            yield
        finally:
            turns.release()

    async def _vm_to_vm(self, conn: Connection, accept_source: AcceptSource, target: Target,
                        cmdline: bytes, turn_by: float) -> None:
        async with self._turn_to_connect(turn_by):
            target_vchan = await self._target_leg(conn, target, cmdline)
            source = await self._open_source(conn, accept_source)
            target_link = FramedLink(target_vchan, Direction.SERVICE_TO_CALLER)
            with trio.fail_after(self.timeouts.handshake):
                # dom0 ends both legs: read both HELLOs, then offer each leg the
                # lower version, so both agree on one chunk limit.
                source_version = await source.receive_hello()
                target_version = await target_link.receive_hello()
                version = min(PROTOCOL_VERSION, source_version, target_version)
                negotiate_version(PROTOCOL_VERSION, version)
                await source.send_hello(version)
                await target_link.send_hello(version)
        log.info("glued", target=target.name, version=version)
        conn.running()
        await glue(source.stream, target_vchan, first_pending=source.take_buffered(),
                   second_pending=target_link.take_buffered(), meter=conn.metered())


async def connect_pending(
    backend: VchanBackend, timeouts: Timeouts, socket_dir: str, *, source: str,
    source_domain: int | str, ident: bytes, target: Target, descriptor: str,
) -> int | None:
    """Connect a VM's pending request from outside its daemon (R2 policy, ``qrexec-client -c``).

    The source leg goes through the source's daemon socket; the call is one
    connection of this (short-lived) program.
    """
    registry = ConnectionRegistry(cleanup_timeout=timeouts.cleanup)
    status = None
    async with registry.open(call_id(source_domain, ident), kind="vm-request", source=source,
                             target=target.name, service=descriptor) as conn:
        accept = accept_via_daemon_socket(socket_dir, source, ident, timeouts, conn)
        status = await Connector(backend, timeouts, socket_dir).connect(
            conn, accept, target, descriptor, source)
    return status


def dom0_runner() -> Runner:
    """How dom0 runs services and commands: as this process's user, bash for commands."""
    shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
    return Runner(service_path(), allow_scripts=True, shell=shell)
