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
import os
import select
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final

import structlog
import trio

from .._config import Timeouts
from .._logging import get_logger
from ..nursery import FramedLink, one_error
from ..protocol import (
    CLIENT_PROTOCOL_VERSION,
    FIRST_DATA_PORT,
    LAST_DATA_PORT,
    PROTOCOL_VERSION,
    VCHAN_BASE_PORT,
    Direction,
    ExecParams,
    Message,
    MsgType,
    ProtocolError,
    TriggerRequest,
    decode_exec_params,
    decode_exec_request,
    decode_service_connect,
    decode_trigger,
    negotiate_version,
    substitute_default_user,
)
from ..xen import VchanBackend, VchanConnectTimeout, get_backend
from ._cli import add_logging_options, run_long_lived, setup_logging
from ._ports import PortTable

log = get_logger(__name__)

DEFAULT_SOCKET_DIR: Final = "/var/run/qubes"
DEFAULT_LOG_DIR: Final = "/var/log/qubes"
#: Set in the environment of the background daemon: the fd to report readiness on.
READY_FD_ENV: Final = "QREXEC_TRIO_READY_FD"

#: Decides a VM's service request. It answers on the control link itself.
RequestHandler = Callable[["Daemon", TriggerRequest], Awaitable[None]]


async def refuse_all(daemon: Daemon, request: TriggerRequest) -> None:
    """The handler used when no policy is configured: every request is refused."""
    log.warning(
        "no policy configured; refusing request",
        service=request.service_name.decode(),
        target=request.target.decode(),
    )
    await daemon.refuse(request.request_id)


class ControlLinkDown(Exception):
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
        request_handler: RequestHandler = refuse_all,
    ) -> None:
        self.backend = backend
        self.domid = domid
        self.name = name
        self.default_user = default_user
        self.socket_dir = socket_dir
        self.uuid = uuid
        self.timeouts = timeouts
        self.request_handler = request_handler
        self.ports = PortTable(domid)
        # Clients waiting for their port to be released, by port.
        self._port_waiters: dict[int, trio.Event] = {}
        self._control: FramedLink | None = None
        self._control_up = trio.Event()

    @property
    def socket_path(self) -> str:
        return os.path.join(self.socket_dir, f"qrexec.{self.domid}")

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
        link = await self._connect_agent(self.timeouts.startup)
        with self._client_socket() as listener:
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_clients, listener, nursery)
                while True:
                    await self._serve_control(link, nursery)
                    link = await self._reconnect()

    async def _reconnect(self) -> FramedLink:
        while True:
            try:
                return await self._connect_agent(self.timeouts.startup)
            except (VchanConnectTimeout, ProtocolError, trio.TooSlowError,
                    trio.BrokenResourceError) as exc:
                log.warning("agent not back yet", error=str(exc))
                await trio.sleep(self.timeouts.reconnect_backoff)

    async def _serve_control(self, link: FramedLink, nursery: trio.Nursery) -> None:
        self._control = link
        self._control_up.set()
        try:
            while (message := await link.receive()) is not None:
                await self._handle_agent_message(message, nursery)
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

    async def _handle_agent_message(self, message: Message, nursery: trio.Nursery) -> None:
        if message.type == MsgType.CONNECTION_TERMINATED:
            params = decode_exec_params(message.payload)
            if not FIRST_DATA_PORT <= params.connect_port <= LAST_DATA_PORT:
                raise ProtocolError(
                    "connection_terminated.port", f"{params.connect_port} is not a data port"
                )
            if self.ports.release(params.connect_domain, params.connect_port):
                log.debug("port released", port=params.connect_port)
                self._notify_released(params.connect_port)
            else:
                # A source agent reports ports its peer's daemon allocated (VM->VM).
                log.debug("terminate for a port we did not allocate", port=params.connect_port,
                          domain=params.connect_domain)
            return
        # The reader only lets triggers through otherwise.
        try:
            request = decode_trigger(message.type, message.payload)
        except ProtocolError as exc:
            log.warning("invalid service request refused", error=str(exc))
            await self.refuse_raw(_raw_ident(message))
            return
        nursery.start_soon(self._handle_request, request)

    async def _handle_request(self, request: TriggerRequest) -> None:
        with structlog.contextvars.bound_contextvars(
            request=request.request_id.decode(), service=request.service_name.decode(),
            target=request.target.decode(),
        ):
            try:
                await self.request_handler(self, request)
            except (ControlLinkDown, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("could not answer request", error=str(exc) or type(exc).__name__)

    async def send_to_agent(self, msg_type: MsgType, payload: bytes) -> None:
        link = self._control
        if link is None:
            raise ControlLinkDown(f"agent of {self.name} is not connected")
        await link.send(msg_type, payload)

    async def refuse(self, ident: bytes) -> None:
        await self.refuse_raw(ident.ljust(32, b"\0"))

    async def refuse_raw(self, raw_ident: bytes) -> None:
        await self.send_to_agent(MsgType.SERVICE_REFUSED, raw_ident)

    def _notify_released(self, port: int) -> None:
        waiter = self._port_waiters.pop(port, None)
        if waiter is not None:
            waiter.set()

    # -- the client socket -------------------------------------------------------

    @contextlib.contextmanager
    def _client_socket(self) -> Iterator[trio.socket.SocketType]:
        os.makedirs(self.socket_dir, exist_ok=True)
        path = self.socket_path
        _unlink_if_socket(path)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        links: list[str] = []
        try:
            raw.bind(path)
            # World-connectable, as the reference: the directory's mode guards it.
            os.chmod(path, 0o666)
            raw.listen(64)
            aliases = [f"qrexec.{self.name}"]
            if self.uuid:
                aliases.append(f"qrexec.uuid:{self.uuid}")
            for alias in aliases:
                link_path = os.path.join(self.socket_dir, alias)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link_path)
                os.symlink(os.path.basename(path), link_path)
                links.append(link_path)
            log.info("serving clients", socket=path)
            yield trio.socket.from_stdlib_socket(raw)
        finally:
            raw.close()
            for link_path in [path, *links]:
                _unlink_ours(link_path, path)

    async def _serve_clients(
        self, listener: trio.socket.SocketType, nursery: trio.Nursery
    ) -> None:
        counter = 0
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                # Out of fds or memory: wait a little rather than die (as trio's serve_listeners).
                log.error("accept failed", error=str(exc))
                await trio.sleep(0.1)
                continue
            counter += 1
            nursery.start_soon(self._client, trio.SocketStream(sock), counter)

    async def _client(self, stream: trio.SocketStream, number: int) -> None:
        with structlog.contextvars.bound_contextvars(client=number):
            try:
                async with stream:
                    await self._serve_client(stream)
            except (ProtocolError, trio.TooSlowError, ControlLinkDown) as exc:
                log.warning("client dropped", error=str(exc) or type(exc).__name__)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("client went away")

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        link = FramedLink(stream, Direction.CLIENT_TO_DAEMON)
        with trio.fail_after(self.timeouts.client_request):
            await link.send_hello(CLIENT_PROTOCOL_VERSION)
            link.version = negotiate_version(
                CLIENT_PROTOCOL_VERSION, await link.receive_hello(), CLIENT_PROTOCOL_VERSION
            )
            message = await link.receive()
            if message is None:
                return
            if not self._control_up.is_set():
                await self._control_up.wait()
        if message.type == MsgType.SERVICE_CONNECT:
            await self._client_service_connect(link, message)
            return
        params = decode_exec_request(message.payload)
        assert params.cmdline is not None
        if params.connect_port != 0:
            log.info("client asked for a port; allocating one anyway", asked=params.connect_port)
        # Build what goes to the agent first: DEFAULT: substitution can make it
        # too long, and that must fail before a port is promised to the client.
        cmdline = substitute_default_user(params.cmdline, self.default_user)
        ExecParams(params.connect_domain, 0, cmdline).encode()
        port = self.ports.allocate(params.connect_domain)
        if port is None:
            log.error("no free data port; closing client")
            return
        released = self._port_waiters[port] = trio.Event()
        with structlog.contextvars.bound_contextvars(port=port, domain=params.connect_domain):
            try:
                await link.send(message.type, ExecParams(self.domid, port).encode())
                forward = ExecParams(params.connect_domain, port, cmdline)
                await self.send_to_agent(MsgType(message.type), forward.encode())
            except BaseException:
                # The agent never heard of this port: nobody else will free it.
                self.ports.release(params.connect_domain, port)
                self._port_waiters.pop(port, None)
                raise
            log.info("request forwarded", type=MsgType(message.type).name)
            await _wait_running(stream, released)

    async def _client_service_connect(self, link: FramedLink, message: Message) -> None:
        connect = decode_service_connect(message.payload)
        if connect.connect_port == 0:
            # Answering a VM's pending request: only the request handler can know
            # of pending requests, and none are kept without a policy engine.
            log.warning("SERVICE_CONNECT for an unknown request", ident=connect.ident.decode())
            return
        await self.send_to_agent(MsgType.SERVICE_CONNECT, message.payload)


async def _wait_running(stream: trio.SocketStream, released: trio.Event) -> None:
    """A client in RUNNING state: it may only close; we close it when its port is freed."""
    async with trio.open_nursery() as nursery:

        async def close_on_release() -> None:
            await released.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(close_on_release)
        data = await stream.receive_some(1)
        if data:
            log.warning("client sent data after its request; closing it")
        nursery.cancel_scope.cancel()


def _raw_ident(message: Message) -> bytes:
    offsets = {MsgType.TRIGGER_SERVICE: 96, MsgType.TRIGGER_SERVICE3: 64,
               MsgType.TRIGGER_SERVICE4: 128}
    start = offsets.get(MsgType(message.type), 0)
    return message.payload[start : start + 32].ljust(32, b"\0")


def _unlink_if_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def _unlink_ours(path: str, target: str) -> None:
    """Remove our socket or a link to it, but nothing a successor put there."""
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            if os.readlink(path) == os.path.basename(target):
                os.unlink(path)
        elif stat.S_ISSOCK(info.st_mode):
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
    parser.add_argument("-p", "--policy-program", metavar="PROGRAM",
                        help="external policy evaluator (used from the VM-initiated-call release)")
    parser.add_argument("--socket-dir", default=DEFAULT_SOCKET_DIR,
                        help=f"where qrexec.<domid> lives (default {DEFAULT_SOCKET_DIR})")
    parser.add_argument("-u", "--uuid", help="the VM's UUID (adds a qrexec.uuid:<uuid> link)")
    parser.add_argument("domid", type=int, help="the VM's domain id")
    parser.add_argument("name", help="the VM's name")
    parser.add_argument("default_user", nargs="?", default="user",
                        help="user for DEFAULT: (default 'user')")
    add_logging_options(parser)
    return parser


async def _run_daemon(args: argparse.Namespace) -> int:
    timeouts = Timeouts.from_env()
    daemon = Daemon(
        get_backend(send_finish=timeouts.send_finish),
        domid=args.domid,
        name=args.name,
        default_user=args.default_user,
        socket_dir=args.socket_dir,
        uuid=args.uuid,
        timeouts=timeouts,
    )
    ready_fd = os.environ.pop(READY_FD_ENV, None)

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await daemon.run(task_status)

    async with trio.open_nursery() as nursery:
        try:
            with one_error():
                await nursery.start(serve)
        except VchanConnectTimeout as exc:
            log.error("agent did not connect", error=str(exc))
            return 3
        except (ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.error("agent handshake failed", error=str(exc) or type(exc).__name__)
            return 1
        if ready_fd is not None:
            os.write(int(ready_fd), b"1")
            os.close(int(ready_fd))
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
    if not args.direct:
        return _start_in_background(args, argv)
    setup_logging(args, "qrexec-daemon")
    structlog.contextvars.bind_contextvars(vm=args.name, domid=args.domid)
    return run_long_lived(lambda: _run_daemon(args))


if __name__ == "__main__":
    sys.exit(main())
