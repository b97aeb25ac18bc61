"""qrexec-daemon: dom0's end of one VM (one daemon per running VM).

It connects the control vchan to the VM's agent, serves ``qrexec-client`` on
``<socket-dir>/qrexec.<domid>`` (with ``qrexec.<name>`` and
``qrexec.uuid:<uuid>`` links), allocates data ports, and passes the VM's
service requests to a request handler. A client or a VM that sends garbage
loses its own connection; the daemon goes on serving everyone else.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import select
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import structlog
import trio

from .._config import Timeouts
from .._defaults import DAEMON_SOCKET_DIR
from .._errors import QrexecError
from .._help import finish_parser
from .._ledgers import daemon_dispvm_ledger, daemon_groups_ledger
from .._logging import get_logger
from .._sockets import listening_socket, serve_socket
from ..domains import (
    DEFAULT_QUBESD_INTERNAL_SOCKET,
    DEFAULT_QUBESD_SOCKET,
    DispVMLedger,
    Domains,
    QubesdDomains,
    destroy_leftovers,
    serve_admin,
)
from ..nursery import (
    CALL_FAILURES,
    Connection,
    ConnectionRegistry,
    FramedLink,
    GroupLedger,
    call_id,
    child_process,
    control_socket_path,
    one_error,
    ports_method,
    registry_methods,
)
from ..policy import DEFAULT_POLICY_D, DEFAULT_R2_DIR
from ..protocol import (
    CLIENT_PROTOCOL_VERSION,
    FIRST_DATA_PORT,
    LAST_DATA_PORT,
    PROTOCOL_VERSION,
    VCHAN_BASE_PORT,
    ConnectionTerminated,
    Direction,
    Event,
    ExecCmdline,
    JustExec,
    MsgType,
    PortAssigned,
    ProtocolError,
    RemoteProtocolError,
    RpcCall,
    ServiceConnect,
    ServiceRefused,
    TriggerService,
    UndecodableMessage,
    negotiate_version,
    parse_cmdline,
    substitute_default_user,
)
from ..xen import VchanBackend, VchanConnectTimeout, get_backend
from ._cli import (
    Lifecycle,
    add_lifecycle_options,
    add_logging_options,
    run_long_lived,
    setup_logging,
)
from ._connect import ConnectError, Connector, Target
from ._decide import (
    Decider,
    EngineDecider,
    ProgramDecider,
    system_info_from_args,
)
from ._ports import PortTable
from .policy_agent import DEFAULT_POLICY_AGENT, PolicyAgentCaller, valid_agent_name

log = get_logger(__name__)

DEFAULT_SOCKET_DIR: Final = DAEMON_SOCKET_DIR
DEFAULT_LOG_DIR: Final = "/var/log/qubes"
#: Set in the environment of the background daemon: the fd to report readiness on.
READY_FD_ENV: Final = "QREXEC_TRIO_READY_FD"

#: VM-initiated calls of one VM at once. Above 256 (a busy VM's burst, issue
#: 13) and below the data ports (MAX_DATA_PORTS), which dom0's clients share.
DEFAULT_MAX_CALLS: Final = 512
#: The log line of a request refused by that limit.
TOO_MANY_CALLS: Final = "request refused: too many calls from this VM at once (--max-calls)"
#: VM-to-VM calls of one VM being connected at once; the others wait their
#: turn (see ``Connector``). Measured on two cores with 1000 calls at once
#: from four VMs (tests/e2e/test_concurrency.py), with other work taking
#: most of the CPU: at 16 the legs' HELLOs were at most about 4 s apart,
#: against a 10 s bound; at 64 up to 7 s. More does not connect faster.
DEFAULT_MAX_CONNECTING: Final = 16

#: What one attempt to connect the agent can end with, short of our own bug:
#: no offer in time, a bad or late HELLO, or a peer that left mid-handshake.
AGENT_CONNECT_FAILURES: Final = (VchanConnectTimeout, ProtocolError, trio.TooSlowError,
                                 trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass
class PendingRequest:
    """A VM's request, from its trigger until its call is over."""

    request: TriggerService
    #: Set once the request was answered (connected or refused). From then on
    #: its ident names nothing here: the agent may use it for a new request
    #: while this call goes on.
    answered: trio.Event = field(default_factory=trio.Event)


class ControlLinkDown(QrexecError):
    """The agent is not connected right now."""


class Daemon:
    def __init__(
        self,
        backend: VchanBackend,
        *,
        domid: int,
        name: str,
        default_user: str = "user",
        socket_dir: str = DEFAULT_SOCKET_DIR,
        uuid: str | None = None,
        timeouts: Timeouts,
        decider: Decider | None = None,
        policy_exec: str | None = None,
        max_calls: int = DEFAULT_MAX_CALLS,
        max_connecting: int = DEFAULT_MAX_CONNECTING,
        domains: Domains | None = None,
    ) -> None:
        self.backend = backend
        self.domid = domid
        self.name = name
        self.default_user = default_user
        self.socket_dir = socket_dir
        self.uuid = uuid
        self.timeouts = timeouts
        #: Decides VM requests in this process (None: refuse every request).
        self.decider = decider
        #: R2 mode: run this program to decide *and* connect each request.
        self.policy_exec = policy_exec
        self.max_calls = max_calls
        # dom0 services this daemon starts are written down, so that a daemon
        # restarted after a SIGKILL can end what its predecessor left running.
        self.ledger = GroupLedger(daemon_groups_ledger(socket_dir, domid))
        # And so are the DispVMs of its calls (destroyed by a successor, or by
        # whoever halts this VM, when this daemon could not).
        self.dispvms = DispVMLedger(daemon_dispvm_ledger(socket_dir, domid))
        self.domains = domains
        self.connector = Connector(backend, timeouts, socket_dir, self.ledger, domains,
                                   max_connecting=max_connecting, dispvms=self.dispvms)
        #: This VM's live connections (its requests, and dom0's clients' calls).
        self.registry = ConnectionRegistry(cleanup_timeout=timeouts.cleanup)
        # Requests of this VM not answered yet, by ident. Only until the answer:
        # the agent's idents are fd numbers, which its next caller gets as soon
        # as the last one's socket closed, while dom0 may still run that call.
        self._pending: dict[bytes, PendingRequest] = {}
        # This VM's requests from trigger to the end of their call, answered or
        # not: what --max-calls bounds.
        self._live_calls = 0
        # A port handed out or freed: what servers of its vchans left for late
        # clients (withdrawn markers) is stale either way.
        self.ports = PortTable(domid, lambda domain, port: backend.forget_withdrawals(
            domain, domid, port))
        # Clients waiting for their port to be released, by port.
        self._port_waiters: dict[int, trio.Event] = {}
        self._control: FramedLink | None = None
        self._control_up = trio.Event()
        # Why the last attempt to connect the agent failed (for the start-up timeout's message).
        self._agent_error: str | None = None
        # Cancelled by a graceful stop: no new client, no new request of the VM.
        self._accepting = trio.CancelScope()

    @property
    def socket_path(self) -> str:
        return os.path.join(self.socket_dir, f"qrexec.{self.domid}")

    @property
    def control_path(self) -> str:
        """Where the registry of live connections is served (see ``nursery._control``)."""
        return control_socket_path(self.socket_dir, self.domid)

    # -- the control link ------------------------------------------------------

    async def _connect_agent(self, timeout: float) -> FramedLink:
        vchan = await self.backend.connect(self.domid, VCHAN_BASE_PORT, timeout=timeout)
        link = FramedLink(vchan, Direction.AGENT_TO_DAEMON)
        try:
            with trio.fail_after(self.timeouts.handshake):
                agent_version = await link.receive_hello()
                version = negotiate_version(PROTOCOL_VERSION, agent_version)
                # The reference echoes the agent's HELLO rather than sending its own.
                await link.send_hello(agent_version)
        except BaseException:
            with trio.CancelScope(shield=True):
                await link.aclose()
            raise
        link.version = version
        log.info("agent connected", version=version)
        return link

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect to the agent, then serve clients until cancelled.

        Raises :class:`VchanConnectTimeout` if the agent does not show up within
        the start-up timeout; ``started`` fires once the agent is connected and
        the client socket is in place.
        """
        leftovers = self.ledger.reap_leftovers()
        if leftovers:
            log.warning("killed services a previous daemon left running", groups=leftovers)
        try:
            await self._serve(task_status)
        finally:
            self.ledger.remove_if_empty()
            self.dispvms.remove_if_empty()

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        link = await self._first_connection()
        with self._client_socket() as listener:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(
                    serve_admin, None, self.control_path,
                    request_timeout=self.timeouts.client_request,
                    methods=registry_methods(self.registry, f"qrexec-daemon:{self.name}")
                    | ports_method(self.ports.allocated)))
                task_status.started()
                # Only once started: whoever started this daemon (a domain
                # manager starting the VM) may hold what destroying takes.
                nursery.start_soon(self._destroy_leftover_dispvms)
                nursery.start_soon(self._serve_clients, listener, nursery)
                while True:
                    await self._serve_control(link, nursery)
                    link = await self._reconnect()

    async def _destroy_leftover_dispvms(self) -> None:
        """Destroy the DispVMs of the calls a killed predecessor left."""
        if self.domains is None:
            return
        destroyed = await destroy_leftovers(self.domains, self.dispvms, self.timeouts)
        if destroyed:
            log.warning("destroyed dispvms a previous daemon left", dispvms=destroyed)

    async def _first_connection(self) -> FramedLink:
        """The agent's first connection: retried as a reconnection is, up to the start-up timeout.

        So an agent whose first HELLO goes wrong is no worse off than one
        that reconnects; only an agent that never gets through ends the daemon.
        """
        # 0 means no bound, as for the backend's own connect timeout.
        with trio.move_on_after(self.timeouts.startup or math.inf):
            return await self._reconnect()
        last = f"; last attempt: {self._agent_error}" if self._agent_error else ""
        raise VchanConnectTimeout(f"the agent of {self.name} (domain {self.domid}) did not "
                                  f"connect within {self.timeouts.startup:g}s{last}")

    async def _reconnect(self) -> FramedLink:
        """Connect to the agent, retrying every failure that a better agent could avoid."""
        while True:
            try:
                return await self._connect_agent(self.timeouts.startup)
            except AGENT_CONNECT_FAILURES as exc:
                self._agent_error = str(exc) or type(exc).__name__
                log.warning("agent connection failed; retrying", error=self._agent_error)
                await trio.sleep(self.timeouts.reconnect_backoff)

    async def _serve_control(self, link: FramedLink, nursery: trio.Nursery) -> None:
        self._control = link
        self._control_up.set()
        try:
            while True:
                try:
                    event = await link.receive()
                except UndecodableMessage as exc:
                    await self._bad_agent_message(exc)
                    continue
                if event is None:
                    break
                await self._handle_agent_event(event, nursery)
            log.warning("agent closed the control vchan")
        except ProtocolError as exc:
            log.error("agent broke the protocol; dropping its control link", error=str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning("control vchan broke", error=str(exc) or type(exc).__name__)
        finally:
            self._control = None
            self._control_up = trio.Event()
            with trio.CancelScope(shield=True):
                await link.aclose()
            # The agent's connections died with it: free their ports, close their clients.
            for port in self.ports.clear():
                self._notify_released(port)

    async def _bad_agent_message(self, exc: UndecodableMessage) -> None:
        """A message in step but unreadable: refuse a trigger by its raw id, drop the rest."""
        if exc.raw_request_id is None:
            raise exc
        log.warning("invalid service request refused", error=str(exc))
        await self.send_to_agent(ServiceRefused(b"", raw_request_id=exc.raw_request_id))

    async def _handle_agent_event(self, event: Event, nursery: trio.Nursery) -> None:
        match event:
            case ConnectionTerminated(domain, port):
                self._terminated(domain, port)
            case TriggerService():
                await self._new_request(event, nursery)
            case _:  # the reader lets nothing else through on this link
                raise AssertionError(f"unexpected {event!r}")

    def _terminated(self, domain: int, port: int) -> None:
        if not FIRST_DATA_PORT <= port <= LAST_DATA_PORT:
            raise RemoteProtocolError("connection_terminated.port", f"{port} is not a data port")
        if self.ports.release(domain, port):
            log.debug("port released", port=port)
            self._notify_released(port)
        else:
            # A source agent reports ports its peer's daemon allocated (VM->VM).
            log.debug("terminate for a port we did not allocate", port=port, domain=domain)

    async def _new_request(self, request: TriggerService, nursery: trio.Nursery) -> None:
        if self._accepting.cancel_called:
            log.warning("request refused: daemon stopping", request=request.request_id.decode(),
                        service=request.service_name.decode())
            await self.refuse(request.request_id)
            return
        if request.request_id in self._pending:
            log.warning("request refused: its id is already in use",
                        request=request.request_id.decode())
            await self.refuse(request.request_id)
            return
        if self._live_calls >= self.max_calls:
            # Refuse at once rather than queue: a VM cannot make dom0 wait for it.
            log.warning(TOO_MANY_CALLS, calls=self._live_calls, limit=self.max_calls,
                        service=request.service_name.decode(),
                        request=request.request_id.decode())
            await self.refuse(request.request_id)
            return
        pending = self._pending[request.request_id] = PendingRequest(request)
        self._live_calls += 1
        nursery.start_soon(self._handle_request, pending)

    async def _handle_request(self, pending: PendingRequest) -> None:
        request = pending.request
        ident = request.request_id
        target = request.target.decode() or "@default"
        with structlog.contextvars.bound_contextvars(
            request=ident.decode(), service=request.service_name.decode(),
            target=target, source=self.name,
        ):
            try:
                async with self.registry.open(
                    call_id(self.domid, ident), kind="vm-request", source=self.name,
                    target=target, service=request.service_name.decode(),
                ) as conn:
                    await self._run_request(pending, conn)
                if conn.cancelled:
                    log.info("call cancelled")
            except CALL_FAILURES as exc:
                log.warning("call failed", error=str(exc) or type(exc).__name__)
            finally:
                self._live_calls -= 1
                with trio.CancelScope(shield=True):
                    if not pending.answered.is_set():
                        with contextlib.suppress(ControlLinkDown, trio.BrokenResourceError,
                                                 trio.ClosedResourceError):
                            await self.refuse(ident)
                log.debug("request ended", calls=self._live_calls)

    async def _run_request(self, pending: PendingRequest, conn: Connection) -> None:
        request = pending.request
        target = request.target.decode() or "@default"
        call_name = request.service_name.decode()
        if self.policy_exec is not None:
            await self._run_policy_exec(self.policy_exec, pending, target, call_name)
            return
        if self.decider is None:
            log.warning("no policy configured; refusing request")
            return
        # The decision and the call's turn to be connected share one bound,
        # which leaves the connection time before the agent stops waiting.
        decided_by = trio.current_time() + self.timeouts.policy
        with trio.fail_at(decided_by):
            verdict = await self.decider.decide(self.name, target, call_name)
        if not verdict.allowed or verdict.target is None:
            log.info("request denied")
            return
        log.info("request allowed", target=verdict.target, user=verdict.user)

        async def accept_source() -> tuple[int, int]:
            return self.domid, await self.answer(pending)

        goal = Target(verdict.target, verdict.user or "DEFAULT",
                      verdict.requested_target or target, autostart=verdict.autostart)
        try:
            await self.connector.connect(conn, accept_source, goal, call_name, self.name,
                                         turn_by=decided_by)
        except ConnectError:
            if isinstance(self.decider, EngineDecider):
                # As the reference: the policy agent hears of an allowed call that failed.
                await self.decider.call_failed(self.name, verdict.target, call_name)
            raise
        log.info("call finished")

    async def _run_policy_exec(self, program: str, pending: PendingRequest, target: str,
                               call_name: str) -> None:
        """R2: the policy program decides and makes the connection itself.

        It answers through our client socket (MSG_SERVICE_CONNECT with the
        request's ident) and lives as long as the call. If it exits, or takes
        longer than the answer timeout, without answering, we refuse.
        """
        argv = [program, "--", self.name, target, call_name,
                pending.request.request_id.decode()]
        async with child_process(argv, timeouts=self.timeouts, stdin=subprocess.DEVNULL,
                                 stdout=None, stderr=None) as proc:
            with trio.move_on_after(self.timeouts.request_answer):
                async with trio.open_nursery() as race:

                    async def exited() -> None:
                        await proc.wait()
                        race.cancel_scope.cancel()

                    race.start_soon(exited)
                    await pending.answered.wait()
                    race.cancel_scope.cancel()
            if not pending.answered.is_set():
                log.warning("policy program did not answer", status=proc.returncode)
                return  # leaving the scope kills it; _handle_request refuses
            status = await proc.wait()
            log.info("policy program finished", status=status)

    async def answer(self, pending: PendingRequest) -> int:
        """Connect a pending request: a port for dom0, MSG_SERVICE_CONNECT to the agent."""
        if pending.answered.is_set():
            raise ConnectError("request already answered")
        port = self.ports.allocate(0)
        if port is None:
            raise ConnectError(f"no free data port: {self.ports.exhausted(0)}")
        # Answered before the send's checkpoint, so that no second answer
        # (another client's SERVICE_CONNECT) gets in meanwhile.
        self._answered(pending)
        try:
            await self.send_to_agent(ServiceConnect(0, port, pending.request.request_id))
        except BaseException:
            self.ports.release(0, port)
            raise
        return port

    async def send_to_agent(self, event: Event) -> None:
        link = self._control
        if link is None:
            raise ControlLinkDown(f"agent of {self.name} is not connected")
        await link.send(event)

    async def refuse(self, request_id: bytes) -> None:
        """MSG_SERVICE_REFUSED for ``request_id``; a request pending under it is answered."""
        pending = self._pending.get(request_id)
        if pending is not None:
            self._answered(pending)
        await self.send_to_agent(ServiceRefused(request_id))

    def _answered(self, pending: PendingRequest) -> None:
        """Mark ``pending`` answered: its ident is free for the VM's next request."""
        pending.answered.set()
        ident = pending.request.request_id
        if self._pending.get(ident) is pending:
            del self._pending[ident]

    def _notify_released(self, port: int) -> None:
        waiter = self._port_waiters.pop(port, None)
        if waiter is not None:
            waiter.set()

    # -- the client socket -------------------------------------------------------

    @contextlib.contextmanager
    def _client_socket(self) -> Iterator[trio.socket.SocketType]:
        os.makedirs(self.socket_dir, exist_ok=True)
        path = self.socket_path
        # World-connectable, as the reference: the directory's mode guards it.
        with listening_socket(path, mode=0o666) as sock, contextlib.ExitStack() as links:
            aliases = [f"qrexec.{self.name}"]
            if self.uuid:
                aliases.append(f"qrexec.uuid:{self.uuid}")
            for alias in aliases:
                link_path = os.path.join(self.socket_dir, alias)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link_path)
                os.symlink(os.path.basename(path), link_path)
                links.callback(_unlink_our_link, link_path, path)
            log.info("serving clients", socket=path)
            yield sock

    async def _serve_clients(
        self, listener: trio.socket.SocketType, nursery: trio.Nursery
    ) -> None:
        numbers = itertools.count(1)

        async def client(stream: trio.SocketStream) -> None:
            await self._client(stream, next(numbers))

        # Stopping ends serve_socket, which closes the listener: a new client
        # is refused at once.
        with self._accepting:
            await serve_socket(listener, client, nursery)

    def stop_accepting(self) -> None:
        """A graceful stop: new clients and new VM requests are refused."""
        self._accepting.cancel()

    async def reload(self) -> str:
        """SIGHUP: read the policy again now (a policy program has nothing cached)."""
        await trio.lowlevel.checkpoint()
        if isinstance(self.decider, EngineDecider):
            return f"policy ({self.decider.reload()} rules)"
        return ""

    async def _client(self, stream: trio.SocketStream, number: int) -> None:
        with structlog.contextvars.bound_contextvars(client=number):
            try:
                async with stream:
                    await self._serve_client(stream)
            except (QrexecError, trio.TooSlowError) as exc:
                log.warning("client dropped", error=str(exc) or type(exc).__name__)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("client went away")

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        """One client, as the reference daemon serves it: HELLO, one request, then RUNNING.

        Whatever the client does wrong ends this client only, logged; a port
        is allocated only once a whole valid request is in.
        """
        link = FramedLink(stream, Direction.CLIENT_TO_DAEMON)
        request: Event | None = None
        with trio.move_on_after(self.timeouts.client_request) as deadline:
            request = await self._client_request(link)
            if request is not None:
                # The agent may be reconnecting: the request waits for it, as long.
                await self._control_up.wait()
        if deadline.cancelled_caught:
            waited_for = "a request" if request is None else "the agent"
            log.warning("client dropped", error=f"waited {self.timeouts.client_request:g}s "
                        f"for {waited_for}")
            return
        match request:
            case None:
                return
            case ServiceConnect():
                await self._client_service_connect(link, request)
            case ExecCmdline() | JustExec():
                await self._client_exec(link, request)
            case _:  # the reader lets nothing else through on this link
                raise AssertionError(f"unexpected {request!r}")

    async def _client_request(self, link: FramedLink) -> Event | None:
        """The HELLO exchange and the client's one request (None: nothing to do, logged)."""
        await link.send_hello(CLIENT_PROTOCOL_VERSION)
        version = await link.receive_hello()
        link.version = negotiate_version(CLIENT_PROTOCOL_VERSION, version,
                                         CLIENT_PROTOCOL_VERSION)
        if version != CLIENT_PROTOCOL_VERSION:
            # The reference takes version 3 and nothing else (handle_client_hello).
            raise RemoteProtocolError(
                "hello.version",
                f"client speaks version {version}, need exactly {CLIENT_PROTOCOL_VERSION}")
        try:
            request = await link.receive()
        except UndecodableMessage as exc:
            if (exc.msg_type, exc.field) != (MsgType.SERVICE_CONNECT, "request_id"):
                raise
            # An id no request can have (over 31 bytes, or a byte no id has): to
            # the reference it is just one that matches nothing pending.
            log.warning("SERVICE_CONNECT for a request that is not pending", error=str(exc))
            return None
        if request is None:
            log.debug("client closed before its request")
        return request

    async def _client_exec(self, link: FramedLink, request: ExecCmdline | JustExec) -> None:
        if request.connect_port != 0:
            log.info("client asked for a port; allocating one anyway", asked=request.connect_port)
        # Build what goes to the agent first: DEFAULT: substitution can make it
        # too long, and that must fail before a port is promised to the client.
        forward = replace(request, connect_port=0,
                          cmdline=substitute_default_user(request.cmdline, self.default_user))
        forward.encode()
        domain = request.connect_domain
        port = self.ports.allocate(domain)
        if port is None:
            # As the reference: the client is closed, which it reports as a refusal.
            log.error("client refused: no free data port", reason=self.ports.exhausted(domain))
            return
        released = self._port_waiters[port] = trio.Event()
        with structlog.contextvars.bound_contextvars(port=port, domain=domain):
            await self._run_client_call(link, forward, port, released)

    async def _run_client_call(self, link: FramedLink, forward: ExecCmdline | JustExec,
                               port: int, released: trio.Event) -> None:
        domain = forward.connect_domain
        async with self.registry.open(
            call_id(self.domid, port), kind="client", source=f"domain {domain}",
            target=self.name, service=_what(forward.cmdline),
        ) as conn:
            try:
                await link.send(PortAssigned(forward.msg_type, self.domid, port))
                await self.send_to_agent(replace(forward, connect_port=port))
            except BaseException as exc:
                # The agent never heard of this port: nobody else will free it.
                self.ports.release(domain, port)
                self._port_waiters.pop(port, None)
                log.info("request not forwarded; port freed", error=str(exc) or type(exc).__name__)
                raise
            log.info("request forwarded", type=forward.msg_type.name)
            conn.running()
            await _wait_running(link.stream, released)

    async def _client_service_connect(self, link: FramedLink, connect: ServiceConnect) -> None:
        """A pending request answered through our socket (policy program, ``qrexec-client -c``).

        The agent always gets the 32-byte form of the id, however the client
        sent it (see :class:`ServiceConnect`).
        """
        port = connect.connect_port
        if port != 0 and not FIRST_DATA_PORT <= port <= LAST_DATA_PORT:
            # Checked before the id (the reference checks after it), so that a
            # bad answer leaves the request pending for a good one or a refusal,
            # rather than marked answered with nothing sent.
            log.warning("client dropped", error=f"SERVICE_CONNECT to port {port}, not a data "
                        f"port ({FIRST_DATA_PORT}..{LAST_DATA_PORT})")
            return
        ident = connect.request_id
        pending = self._pending.get(ident)
        if pending is None:
            log.warning("SERVICE_CONNECT for a request that is not pending",
                        request=ident.decode())
            return
        if port == 0:
            # dom0 serves the call: the port is ours, and so is telling the client it ended.
            port = await self.answer(pending)
            released = self._port_waiters[port] = trio.Event()
            await link.send(PortAssigned(connect.msg_type, self.domid, port))
            await _wait_running(link.stream, released)
            return
        # A VM-to-VM answer (the reference's qrexec-client -c): the target's
        # daemon allocated the port, so there is no reply and no port of ours.
        # Answered before the send, so that no second answer gets in meanwhile.
        self._answered(pending)
        await self.send_to_agent(ServiceConnect(connect.connect_domain, port, ident))
        log.info("request answered by a client", request=ident.decode(),
                 domain=connect.connect_domain, port=port)
        # As the reference (CLIENT_RUNNING): open until the client closes it.
        await _wait_running(link.stream, None)


async def _wait_running(stream: trio.abc.Stream, released: trio.Event | None) -> None:
    """A client in RUNNING state: it may only close.

    With ``released``, we close it ourselves when its port is freed.
    """
    async with trio.open_nursery() as nursery:

        async def close_on_release(released: trio.Event) -> None:
            await released.wait()
            nursery.cancel_scope.cancel()

        if released is not None:
            nursery.start_soon(close_on_release, released)
        data = await stream.receive_some(1)
        if data:
            log.warning("client sent data after its request; closing it")
        nursery.cancel_scope.cancel()


def _what(cmdline: bytes) -> str:
    """A client's command line as a listing names it: the service, or the command."""
    try:
        command = parse_cmdline(cmdline).command
    except ProtocolError:
        return "(malformed command line)"
    if isinstance(command, RpcCall):
        return command.descriptor
    return command.command


def _unlink_our_link(path: str, target: str) -> None:
    """Remove our link to ``target``, but nothing a successor put there."""
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(path).st_mode) and os.readlink(path) == os.path.basename(target):
            os.unlink(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-daemon",
        description="dom0 qrexec daemon for one VM.",
    )
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="do not print progress while waiting for the agent")
    parser.add_argument("-D", "--direct", action="store_true",
                        help="stay in the foreground (otherwise return once the agent connected)")
    policy = parser.add_argument_group(
        "policy", "how VM-initiated calls are decided (default: the engine, in-process)")
    policy.add_argument("--policy-dir", default=DEFAULT_R2_DIR, metavar="D",
                        help=f"R2 per-service policy files (default {DEFAULT_R2_DIR})")
    policy.add_argument("--policy-d", default=DEFAULT_POLICY_D, metavar="D",
                        help=f"*.policy files (default {DEFAULT_POLICY_D})")
    policy.add_argument("--system-info", metavar="FILE.json",
                        help="the domains for the policy from this file (see qrexec-policy "
                        "--help) instead of from qubesd")
    policy.add_argument("--qubesd-internal-socket", metavar="PATH",
                        default=DEFAULT_QUBESD_INTERNAL_SOCKET,
                        help="where the policy asks qubesd for the domains (internal."
                        "GetSystemInfo; answers are reused for up to 1 s; without an answer "
                        f"every call is denied) (default {DEFAULT_QUBESD_INTERNAL_SOCKET}; a "
                        "local world passes its admin socket); '' for none: the policy then "
                        "knows only the request's names, as AppVMs without tags (test rigs)")
    policy.add_argument("--policy-agent", metavar="DOMAIN", default=DEFAULT_POLICY_AGENT,
                        help="where 'ask' rules are asked (policy.Ask) and notifications go "
                        "(policy.Notify) for a source whose guivm the domains' facts do not "
                        f"name (default {DEFAULT_POLICY_AGENT}: dom0's own services); '' for "
                        "none: such asks are denied, as the reference does")
    policy.add_argument("--ask-program", metavar="PROG",
                        help="program answering 'ask' rules instead of the policy agent")
    policy.add_argument("--assume-yes-for-ask", action="store_true",
                        help="answer 'ask' rules with their default target")
    policy.add_argument("-p", "--policy-program", metavar="PROGRAM",
                        help="external evaluator instead of the engine, run as "
                        "'PROGRAM -- SOURCE TARGET SERVICE[+ARG]' (a policy response on stdout)")
    policy.add_argument("--policy-exec", metavar="PROGRAM",
                        help="R2 mode: run 'PROGRAM -- SOURCE TARGET SERVICE[+ARG] IDENT', "
                        "which decides and connects the call itself (e.g. qrexec-policy)")
    policy.add_argument("--qubesd-socket", metavar="PATH", default=DEFAULT_QUBESD_SOCKET,
                        help="the domain manager's admin socket, for DispVMs and autostart "
                        f"(default qubesd's {DEFAULT_QUBESD_SOCKET}; a local world passes its "
                        "own); '' for none")
    policy.add_argument("--max-calls", type=int, default=DEFAULT_MAX_CALLS, metavar="N",
                        help="VM-initiated calls of this VM at once; more are refused at once "
                        f"(default {DEFAULT_MAX_CALLS})")
    policy.add_argument("--max-connecting", type=_count, default=DEFAULT_MAX_CONNECTING,
                        metavar="N",
                        help="VM-to-VM calls of this VM being connected at once; the others "
                        "wait their turn, and are refused if none comes within the policy "
                        f"timeout (default {DEFAULT_MAX_CONNECTING}; 0: no bound)")
    parser.add_argument("--socket-dir", default=DEFAULT_SOCKET_DIR,
                        help=f"where qrexec.<domid> lives (default {DEFAULT_SOCKET_DIR})")
    parser.add_argument("-u", "--uuid", help="the VM's UUID (adds a qrexec.uuid:<uuid> link)")
    parser.add_argument("domid", type=int, help="the VM's domain id")
    parser.add_argument("name", help="the VM's name")
    parser.add_argument("default_user", nargs="?", default="user",
                        help="user for DEFAULT: (default 'user')")
    add_logging_options(parser)
    add_lifecycle_options(parser)
    return finish_parser(
        parser,
        "qrexec-daemon 12 work            # the daemon for VM 'work', domain id 12",
        "qrexec-daemon -D -q 12 work user # in the foreground (a unit), quietly")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a count (0 or more)")
    return value


def _decider(args: argparse.Namespace, timeouts: Timeouts) -> Decider:
    if args.policy_program is not None:
        return ProgramDecider(args.policy_program)
    return EngineDecider(
        args.policy_dir, args.policy_d, system_info=system_info_from_args(args, timeouts),
        ask_program=[args.ask_program] if args.ask_program else None,
        assume_yes_for_ask=args.assume_yes_for_ask,
        policy_agent=PolicyAgentCaller(args.policy_agent, socket_dir=args.socket_dir,
                                       timeouts=timeouts),
    )


async def _run_daemon(args: argparse.Namespace, life: Lifecycle) -> int:
    timeouts = Timeouts.from_env()
    daemon = Daemon(
        get_backend(send_finish=timeouts.send_finish),
        domid=args.domid,
        name=args.name,
        default_user=args.default_user,
        socket_dir=args.socket_dir,
        uuid=args.uuid,
        timeouts=timeouts,
        decider=_decider(args, timeouts),
        policy_exec=args.policy_exec,
        max_calls=args.max_calls,
        max_connecting=args.max_connecting,
        domains=(QubesdDomains(args.qubesd_socket, call_timeout=timeouts.admin_call)
                 if args.qubesd_socket else None),
    )
    ready_fd = os.environ.pop(READY_FD_ENV, None)
    life.track(daemon.registry)
    life.on_stop(daemon.stop_accepting)
    life.on_reload(daemon.reload)

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await daemon.run(task_status)

    async with trio.open_nursery() as nursery:
        if isinstance(daemon.decider, EngineDecider):
            daemon.decider.attach(nursery)  # notifications to the policy agent
        try:
            with one_error():
                await nursery.start(serve)
        except VchanConnectTimeout as exc:
            log.error("agent did not connect", error=str(exc))
            return 3
        if ready_fd is not None:
            os.write(int(ready_fd), b"1")
            os.close(int(ready_fd))
        life.ready()
    return 0


def _start_in_background(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Re-run ourselves with --direct, wait until the agent is connected, then return.

    Re-executing rather than forking keeps the background daemon a fresh
    process (no inherited trio state, no atexit surprises).
    """
    read_fd, write_fd = os.pipe()
    log_dir = os.environ.get("QREXEC_LOG_DIR", DEFAULT_LOG_DIR)
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"qrexec.{args.name}.log")
    env = dict(os.environ, **{READY_FD_ENV: str(write_fd)})
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "qrexec_trio.roles.daemon", "--direct", *argv],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            env=env, pass_fds=(write_fd,), start_new_session=True,
        )
    os.close(write_fd)
    timeout = Timeouts.from_env().startup
    with os.fdopen(read_fd, "rb") as ready:
        readable, _, _ = select.select([ready], [], [], timeout)
        if readable and ready.read(1) == b"1":
            return 0
    if child.poll() is None:
        child.terminate()
        child.wait(5)
        print(f"qrexec-daemon: the agent of {args.name} did not connect within {timeout:g}s",
              file=sys.stderr)
        return 3
    print(f"qrexec-daemon: failed to start, see {log_path}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.domid <= 0:
        print("qrexec-daemon: DOMID must be a VM's domain id (> 0)", file=sys.stderr)
        return 1
    if not valid_agent_name(args.policy_agent):
        print(f"qrexec-daemon: --policy-agent {args.policy_agent!r} is not a domain name",
              file=sys.stderr)
        return 1
    if not args.direct:
        return _start_in_background(args, argv)
    setup_logging(args, "qrexec-daemon")
    structlog.contextvars.bind_contextvars(vm=args.name, domid=args.domid)
    return run_long_lived(lambda life: _run_daemon(args, life), stop_grace=args.stop_grace)


if __name__ == "__main__":
    sys.exit(main())
