"""qrexec-agent: the VM side.

It offers the control vchan to dom0 (port 512), says HELLO, and for each
MSG_EXEC_CMDLINE / MSG_JUST_EXEC runs one connection: connect the data vchan,
HELLO, run the command, pump data, report the exit code, and tell dom0 with
MSG_CONNECTION_TERMINATED. Every connection is a nursery task of the agent;
cancelling it kills the command's process group.

When dom0's daemon goes away the agent keeps its running connections and
offers the control vchan again, as the reference does.

Calls that programs in this VM make go the other way; they come in on the
trigger socket, the fdpass socket and the trigger FIFO, served by
:mod:`._vm_requests` in the agent's nursery (see there, and :mod:`..protocol._vm_local`
for why the FIFO sits beside today's socket rather than at its path).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

import structlog
import trio

from .._config import Timeouts
from .._errors import QrexecError
from .._help import finish_parser
from .._ledgers import agent_groups_ledger
from .._logging import get_logger
from ..domains import serve_admin
from ..nursery import (
    Connection,
    ConnectionRegistry,
    FramedLink,
    GroupLedger,
    PeerGone,
    call_id,
    just_exec_service,
    one_error,
    registry_methods,
    spawn_detached,
)
from ..protocol import (
    CONTROL_RING_SIZE,
    PROTOCOL_VERSION,
    VCHAN_BASE_PORT,
    ConnectionTerminated,
    Direction,
    Event,
    ExecCmdline,
    ExitCode,
    ExitStatus,
    JustExec,
    ProtocolError,
    ServiceConnect,
    ServiceRefused,
    UndecodableMessage,
    negotiate_version,
)
from ..protocol._vm_local import DEFAULT_RUNTIME_DIR, DEFAULT_SOCKET_NAME
from ..services import (
    LaunchError,
    Plan,
    ProgramPlan,
    Runner,
    rpc_config_path,
    service_path,
)
from ..xen import VchanBackend, get_backend
from ._cli import (
    Lifecycle,
    add_lifecycle_options,
    add_logging_options,
    run_long_lived,
    setup_logging,
)
from ._launch import hold_for_session, prepare, serve_prepared
from ._vm_requests import RequestPaths, SetupError, VmRequests

log = get_logger(__name__)


class Agent:
    def __init__(
        self,
        backend: VchanBackend,
        runner: Runner,
        *,
        timeouts: Timeouts,
        runtime_dir: str = DEFAULT_RUNTIME_DIR,
        agent_socket: str | None = None,
    ) -> None:
        self.backend = backend
        self.runner = runner
        self.timeouts = timeouts
        #: Where per-service configuration lives ($QUBES_RPC_CONFIG_PATH).
        self.config_dirs = rpc_config_path()
        self.runtime_dir = runtime_dir
        self._control: FramedLink | None = None
        self._ready_sent = False
        # A graceful stop began: dom0's new calls are refused, live ones go on.
        self._stopping = False
        socket_path = agent_socket or os.path.join(runtime_dir, DEFAULT_SOCKET_NAME)
        # Services this agent starts are written down, so that an agent
        # restarted after a SIGKILL can end what its predecessor left running.
        # Like every runtime file, the record sits beside the agent socket: the
        # reference's command line names that one path only, and an agent run
        # as a user may have no other writable directory.
        self.ledger = GroupLedger(agent_groups_ledger(socket_path))
        #: Live connections: services running for dom0, and this VM's own calls.
        self.registry = ConnectionRegistry(cleanup_timeout=timeouts.cleanup)
        self.paths = RequestPaths.beside(socket_path)
        self.requests = VmRequests(backend, self, self.paths, timeouts=timeouts,
                                   registry=self.registry)

    @property
    def control_version(self) -> int | None:
        return self._control.version if self._control is not None else None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve dom0 until cancelled. ``started`` fires once the first daemon is connected.

        Raises :class:`SetupError` if the request side's sockets cannot be made.
        """
        leftovers = self.ledger.reap_leftovers()
        if leftovers:
            log.warning("killed services a previous agent left running", groups=leftovers)
        try:
            await self._serve(task_status)
        finally:
            self.ledger.remove_if_empty()

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as connections:
            # Local programs may connect as soon as the files exist; their
            # requests are refused until dom0 is there.
            await connections.start(self.requests.serve)
            await connections.start(functools.partial(
                serve_admin, None, self.paths.control,
                request_timeout=self.timeouts.client_request,
                methods=registry_methods(self.registry, "qrexec-agent")))
            while True:
                await self._serve_control_link(connections, task_status)

    async def _serve_control_link(
        self, connections: trio.Nursery, task_status: trio.TaskStatus[None]
    ) -> None:
        listener = self.backend.listen(
            0, VCHAN_BASE_PORT, read_min=CONTROL_RING_SIZE, write_min=CONTROL_RING_SIZE
        )
        log.info("offering control vchan", port=VCHAN_BASE_PORT)
        # Waiting for dom0 has no end by design: the agent exists to be reached.
        vchan = await listener.accept(timeout=0)
        link = FramedLink(vchan, Direction.DAEMON_TO_AGENT)
        try:
            with trio.fail_after(self.timeouts.handshake):
                await link.send_hello(PROTOCOL_VERSION)
                version = negotiate_version(PROTOCOL_VERSION, await link.receive_hello())
            link.version = version
            log.info("dom0 connected", version=version)
            self._control = link
            if not self._ready_sent:
                self._ready_sent = True
                task_status.started()
            while True:
                try:
                    event = await link.receive()
                except UndecodableMessage as exc:
                    # In step, but unreadable: an answer naming no request we
                    # could match, or a request we cannot run. dom0 is not
                    # hostile, but one bad message must not cost every call.
                    log.warning("unreadable message from dom0; ignored", error=str(exc))
                    continue
                if event is None:
                    break
                self._dispatch(connections, event)
            log.info("dom0 closed the control vchan; offering it again")
        except (ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.error("control link dropped", error=str(exc))
        finally:
            self._control = None
            self.requests.control_lost()
            with trio.CancelScope(shield=True):
                await link.aclose()

    def stop_accepting(self) -> None:
        """A graceful stop: new calls, dom0's and this VM's own, are refused from now on."""
        self._stopping = True
        self.requests.stop_accepting()

    def _dispatch(self, connections: trio.Nursery, event: Event) -> None:
        match event:
            case ExecCmdline() | JustExec():
                connections.start_soon(self._connection, connections, event)
            case ServiceConnect():
                self.requests.connect(event)
            case ServiceRefused(request_id):
                self.requests.refuse(request_id)
            case _:  # the reader lets nothing else through on this link
                raise AssertionError(f"unexpected {event!r}")

    async def send_control(self, event: Event) -> bool:
        """Send to dom0; ``False`` (logged) if there is no control link to send on."""
        link = self._control
        if link is None:
            log.warning("no control link; dropping message", type=event.msg_type.name)
            return False
        try:
            await link.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.warning("control link gone; dropping message", type=event.msg_type.name)
            return False
        return True

    async def _connection(
        self, background: trio.Nursery, params: ExecCmdline | JustExec
    ) -> None:
        just_exec = isinstance(params, JustExec)
        with structlog.contextvars.bound_contextvars(
            domain=params.connect_domain, port=params.connect_port,
        ):
            try:
                async with self.registry.open(
                    call_id(self.backend.own_domain, params.connect_port), kind="service",
                    source=f"domain {params.connect_domain}",
                    target=f"domain {self.backend.own_domain}",
                ) as conn:
                    await self._run_connection(conn, background, params, just_exec=just_exec)
                if conn.cancelled:
                    log.info("connection cancelled")
            except PeerGone as exc:
                log.warning("caller went away; service stopped", reason=str(exc))
            except (QrexecError, trio.TooSlowError) as exc:
                log.error("connection failed", error=str(exc) or type(exc).__name__)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("data vchan broke", error=str(exc) or type(exc).__name__)
            except Exception:
                # A bug, but in one connection: it must not cost the others.
                log.exception("connection crashed")
            finally:
                with trio.CancelScope(shield=True):
                    await self.send_control(
                        ConnectionTerminated(params.connect_domain, params.connect_port))

    async def _run_connection(
        self, conn: Connection, background: trio.Nursery, params: ExecCmdline | JustExec, *,
        just_exec: bool,
    ) -> None:
        # What to run is decided first: wait-for-session holds the request
        # before the data vchan connects, as the reference does. A command
        # that cannot run is refused only on the data vchan, with its status.
        if self._stopping:
            # Refused as a command that cannot run: on the data vchan, with a
            # status, so that the caller knows at once.
            log.warning("agent stopping; call refused")
        prepared = (LaunchError(ExitStatus.PROBLEM, "the agent is stopping") if self._stopping
                    else prepare(self.runner, self.config_dirs, conn, params.cmdline))
        await hold_for_session(prepared, self.runner, timeouts=self.timeouts,
                               ledger=self.ledger)
        vchan = await conn.enter(await self.backend.connect(
            params.connect_domain, params.connect_port, timeout=self.timeouts.data_vchan_connect
        ))
        link = FramedLink(vchan, Direction.CALLER_TO_SERVICE)
        with trio.fail_after(self.timeouts.handshake):
            await link.exchange_hello(PROTOCOL_VERSION, send_first=True)
        if not just_exec:
            await serve_prepared(conn, link, prepared, timeouts=self.timeouts,
                                 ledger=self.ledger)
            return
        if isinstance(prepared, LaunchError):
            log.warning("cannot run command", status=prepared.status, reason=prepared.reason)
            await link.send(ExitCode(prepared.status))
            return
        log.info("running", what=prepared.plan.what, just_exec=True)
        await self._just_exec(background, link, prepared.plan)

    async def _just_exec(self, background: trio.Nursery, link: FramedLink, plan: Plan) -> None:
        if isinstance(plan, ProgramPlan):
            # The command outlives its connection, but not the agent's nursery.
            await background.start(spawn_detached, plan, self.timeouts, self.ledger)
        else:
            # A socket service is told the descriptor, and left to it.
            await just_exec_service(plan, self.timeouts)
        await link.send(ExitCode(0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-agent",
        description="qrexec agent: serves dom0's qrexec-daemon inside a VM.",
    )
    parser.add_argument("--runtime-dir", default=DEFAULT_RUNTIME_DIR,
                        help="where the agent socket goes when --agent-socket is not given "
                        f"(default {DEFAULT_RUNTIME_DIR})")
    parser.add_argument("--agent-socket", metavar="PATH",
                        help="trigger socket for qrexec-client-vm (default "
                        "RUNTIME_DIR/qrexec-agent); the agent's other runtime files (R2 "
                        "fdpass socket and fifo, control socket, process-group record) "
                        "go beside it as PATH-fdpass, PATH-fifo, PATH-control, PATH-groups")
    parser.add_argument("--no-fork-server", action="store_true",
                        help="accepted for compatibility; this agent has no fork server")
    parser.add_argument("--fork-server-socket", metavar="FMT",
                        help="accepted for compatibility; this agent has no fork server")
    add_logging_options(parser)
    add_lifecycle_options(parser)
    return finish_parser(
        parser,
        "qrexec-agent                      # as the VM's unit starts it",
        "qrexec-agent --agent-socket /run/qrexec-trio/vm1/qrexec-agent --log-level debug")


async def run_agent(args: argparse.Namespace, life: Lifecycle) -> int:
    timeouts = Timeouts.from_env()
    backend = get_backend(send_finish=timeouts.send_finish)
    try:
        # A handler file without the x bit is an R2 command file: it runs with
        # /bin/sh, as R2's qubes-rpc-multiplexer ran it (the reference says 125).
        runner = Runner(service_path(), allow_scripts=True)
        agent = Agent(backend, runner, timeouts=timeouts,
                      runtime_dir=args.runtime_dir, agent_socket=args.agent_socket)
    except OSError as exc:  # beside the agent socket, where the service ledger lives
        log.error("cannot start", error=f"{exc.filename}: {exc.strerror}")
        return 1
    log.info("qrexec-agent starting", domain=backend.own_domain, backend=backend.name,
             pid=os.getpid())
    life.track(agent.registry)
    life.on_stop(agent.stop_accepting)
    # Nothing to reload: services and their configuration are looked up per call.
    try:
        with one_error():
            async with trio.open_nursery() as nursery:
                # Ready once dom0 is connected, as the reference's agent.
                await nursery.start(agent.run)
                life.ready()
    except SetupError as exc:
        log.error("cannot start", error=str(exc))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args, "qrexec-agent")
    return run_long_lived(lambda life: run_agent(args, life), stop_grace=args.stop_grace)


if __name__ == "__main__":
    sys.exit(main())
