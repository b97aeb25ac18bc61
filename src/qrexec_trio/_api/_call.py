"""``call``: one qrexec call from inside a Python (trio) program, no subprocess.

Where the call is made from decides how it is asked for:

* **In a VM**, through the agent's trigger socket, as ``qrexec-client-vm
  --use-trigger-socket`` does: one MSG_TRIGGER_SERVICE4, the agent's 8-byte
  answer (end of file: refused), then we serve the data vchan and run the
  caller's side of the call ourselves.
* **In dom0**, through the target's qrexec-daemon socket, as ``qrexec-client
  -d TARGET USER:QUBESRPC SVC+ARG SOURCE`` does (no policy: dom0 asks
  directly).

The environment read (``VCHAN_DOMAIN``, ``VCHAN_SOCKET_DIR``, ``QREXEC_VCHAN``,
``QREXEC_TIMEOUT_*``) is the ``env`` argument's, ``os.environ`` by default,
so that one process can make calls as several domains of a local world
without touching its own environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

import trio

from .._config import Timeouts
from .._defaults import DAEMON_SOCKET_DIR
from .._errors import QrexecError
from ..blocking._vm_call import AgentMissing, ClientVmError, Refused, trigger_frame
from ..nursery import CallerEnd, call_data, open_caller_link
from ..protocol import (
    ExecCmdline,
    ProtocolError,
    build_rpc_cmdline,
    parse_cmdline,
)
from ..protocol._vm_local import DEFAULT_AGENT_SOCKET
from ..roles import _connect
from ..roles._client_vm_trio import ask_agent
from ..xen import VchanBackend, get_backend
from ..xen._local import LocalBackend
from ..xen._registry import default_backend_name
from ._errors import AgentNotRunning, CallError, CallLost, CallRefused, TargetNotRunning
from ._streams import Discard

#: Where dom0's qrexec-daemons listen (``qrexec.NAME``), as ``qrexec-client --socket-dir``.
#: The user a dom0 call's service runs as: the target's default user.
DEFAULT_USER: Final = "DEFAULT"
#: Our request id on the trigger socket; the agent replaces it with its own.
_TRIGGER_IDENT: Final = b"SOCKET"
#: Xen's word for "this is the control domain" (dom0) in /proc/xen/capabilities.
_XEN_CAPABILITIES: Final = "/proc/xen/capabilities"

Input = bytes | trio.abc.ReceiveStream | None


async def call(
    target: str,
    service: str,
    argument: str | None = None,
    *,
    stdin: Input = None,
    stdout: trio.abc.SendStream | None = None,
    stderr: trio.abc.SendStream | None = None,
    source: str | None = None,
    user: str | None = None,
    agent_socket: str | None = None,
    socket_dir: str | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Call ``service`` (with ``argument``) in ``target``; returns its exit status.

    ``stdin`` is sent to the service (bytes, or a stream read until its end;
    ``None``: nothing), its stdout and stderr go to ``stdout`` and ``stderr``
    (``None``: dropped). Streams are never closed: they are the caller's.
    The call is over, and returns, once the exit status came, even if
    ``stdin`` has not ended.

    In a VM (the default) the call goes through the agent at ``agent_socket``
    (default ``/var/run/qubes/qrexec-agent``); ``target`` may be a keyword
    (``@default``, ``@dispvm``, ...) and ``source`` asks on behalf of another
    qube. In dom0 (``socket_dir`` given, or ``VCHAN_DOMAIN=0``, or a Xen
    control domain) it goes through the target's daemon in ``socket_dir``
    (default ``/var/run/qubes``); ``source`` is what the service sees as its
    caller (default ``dom0``) and ``user`` who it runs as (default: the
    target's default user).

    Raises :class:`CallRefused`, :class:`AgentNotRunning` (VM),
    :class:`TargetNotRunning` (dom0), :class:`CallLost` (no exit status
    came), :class:`CallError` (anything else that kept the call from being
    made), and :class:`ValueError` for arguments no qrexec would take.
    Cancelling it ends the call and releases everything it opened.
    """
    descriptor = _descriptor(service, argument)
    environ = os.environ if env is None else env
    timeouts = Timeouts.from_env(dict(environ))
    end = _caller_end(stdin, stdout, stderr)
    try:
        if _in_dom0(environ, agent_socket, socket_dir):
            if agent_socket is not None:
                raise ValueError("agent_socket is for calls from a VM")
            status = await _call_from_dom0(
                socket_dir or DAEMON_SOCKET_DIR, target,
                _dom0_cmdline(user or DEFAULT_USER, descriptor, source or "dom0"),
                backend=_backend(environ, timeouts), end=end, timeouts=timeouts)
        else:
            if user is not None:
                raise ValueError("user is for calls from dom0 (in a VM the policy decides)")
            status = await _call_from_vm(
                agent_socket or DEFAULT_AGENT_SOCKET,
                _trigger_frame(source or "", target, descriptor),
                backend=_backend(environ, timeouts), end=end, timeouts=timeouts)
    except CallError:
        raise
    except (QrexecError, trio.TooSlowError) as exc:
        raise CallError(str(exc) or type(exc).__name__) from exc
    if status < 0:
        raise CallLost(f"{target}: the call ended before the service's exit status came")
    return status & 0xFF


# -- arguments -------------------------------------------------------------------------


def _descriptor(service: str, argument: str | None) -> str:
    if argument is None:
        return service
    if "+" in service:
        raise ValueError(f"{service!r} has its argument already; do not pass another")
    return f"{service}+{argument}"


def _caller_end(stdin: Input, stdout: trio.abc.SendStream | None,
                stderr: trio.abc.SendStream | None) -> CallerEnd:
    if isinstance(stdin, bytes | bytearray | memoryview):
        # Bytes go as the pump's prefix: sent first, then the input's end.
        return CallerEnd(input=None, output=stdout or Discard(), errors=stderr,
                         prefix=bytes(stdin))
    return CallerEnd(input=stdin, output=stdout or Discard(), errors=stderr)


def _trigger_frame(source: str, target: str, descriptor: str) -> bytes:
    """MSG_TRIGGER_SERVICE4; names the agent or dom0 would refuse raise ValueError here."""
    try:
        return trigger_frame(_raw(source), _raw(target or "@default"), _raw(descriptor),
                             _TRIGGER_IDENT)
    except ProtocolError as exc:
        raise ValueError(f"invalid call: {exc}") from None


def _dom0_cmdline(user: str, descriptor: str, source: str) -> bytes:
    cmdline = build_rpc_cmdline(user, descriptor if "+" in descriptor else f"{descriptor}+",
                                source)
    try:
        parse_cmdline(cmdline)  # the target's agent would reject what this rejects
    except ProtocolError as exc:
        raise ValueError(f"invalid call: {exc}") from None
    return cmdline


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# -- where we are ----------------------------------------------------------------------


def _in_dom0(environ: Mapping[str, str], agent_socket: str | None,
             socket_dir: str | None) -> bool:
    """Explicit paths say it; else the local backends' ``VCHAN_DOMAIN``; else Xen does."""
    if socket_dir is not None or agent_socket is not None:
        return socket_dir is not None
    domain = environ.get("VCHAN_DOMAIN")
    if domain is not None:
        return _domain_id(domain) == 0
    try:
        with open(_XEN_CAPABILITIES, encoding="ascii") as file:
            return "control_d" in file.read()
    except OSError:
        return False  # no Xen: a VM of a local world, or a test


def _domain_id(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise CallError(f"VCHAN_DOMAIN={raw!r} is not a domain id") from None


def _backend(environ: Mapping[str, str], timeouts: Timeouts) -> VchanBackend:
    """The vchan backend ``environ`` names, for the domain ``environ`` says we are."""
    backend = get_backend(environ.get("QREXEC_VCHAN") or default_backend_name(),
                          send_finish=timeouts.send_finish)
    if isinstance(backend, LocalBackend):
        # get_backend reads VCHAN_DOMAIN and VCHAN_SOCKET_DIR from os.environ;
        # the call's environment may name another domain.
        backend = type(backend)(environ.get("VCHAN_SOCKET_DIR"),
                                _domain_id(environ.get("VCHAN_DOMAIN", "0")),
                                send_finish=timeouts.send_finish)
    return backend


# -- in a VM: the agent's trigger socket -------------------------------------------------


async def _call_from_vm(agent_socket: str, frame: bytes, *, backend: VchanBackend,
                        end: CallerEnd, timeouts: Timeouts) -> int:
    try:
        stream, domain, port = await ask_agent(agent_socket, frame, timeouts)
    except AgentMissing as exc:
        raise AgentNotRunning(str(exc)) from exc
    except ClientVmError as exc:
        raise CallError(str(exc)) from exc
    except Refused:
        raise CallRefused("Request refused") from None
    # Open for the whole call: closing it tells the agent we are done.
    async with stream:
        return await _serve_call(backend, domain, port, end, timeouts,
                                 accept_timeout=timeouts.data_vchan_connect)


# -- in dom0: the target's daemon ----------------------------------------------------------


async def _call_from_dom0(socket_dir: str, target: str, cmdline: bytes, *,
                          backend: VchanBackend, end: CallerEnd, timeouts: Timeouts) -> int:
    if target in _connect.DOM0_NAMES:
        raise ValueError("a call from dom0 to dom0 is not a qrexec call: run the service")
    try:
        stream, domain, port = await _connect.request_port(
            socket_dir, target, ExecCmdline(0, 0, cmdline), timeouts)
    except _connect.TargetNotRunning as exc:
        raise TargetNotRunning(str(exc)) from exc
    # Open for the whole call: the daemon closes it once the agent is done.
    async with stream:
        return await _serve_call(backend, domain, port, end, timeouts,
                                 accept_timeout=timeouts.data_vchan_accept)


# -- both: the data vchan --------------------------------------------------------------------


async def _serve_call(backend: VchanBackend, domain: int, port: int, end: CallerEnd,
                      timeouts: Timeouts, *, accept_timeout: float) -> int:
    """Serve the data vchan at (domain, port) and run the caller's side of the call."""
    link = await open_caller_link(backend, domain, port, accept_timeout=accept_timeout,
                                  handshake_timeout=timeouts.handshake)
    async with link.stream:
        return await call_data(link, end, finish_timeout=timeouts.send_finish)
