#!/usr/bin/env python3
"""Fuzz the control links: above all what a hostile VM's agent can send the daemon.

agent->daemon on the control vchan is dom0's attack surface: the bytes come
from a VM. Input: byte 0 sets up the reader (bits 0-1: our version 2, 3 or 4;
bit 2: HELLO already done; bits 3-7: feeding piece size 1..32), the rest is
the stream. It is read, with ``MessageReader.next_event()`` as the roles do,
as agent->daemon, and the same bytes also as daemon->agent, client->daemon,
daemon->client and qrexec-client-vm->agent (the trigger socket), each in
small pieces and in one piece. RemoteProtocolError is the expected refusal
(UndecodableMessage: one message refused, the stream read on); any other
exception, or a broken invariant (:class:`Finding`), is a bug.

Run: ``.venv/bin/python fuzz/fuzz_control.py [libFuzzer options] [corpus dirs]``
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    with atheris.instrument_imports():
        from stream_support import Finding, OnEvent, read_both_ways, require, setup_from

        from qrexec_trio import protocol
else:
    from stream_support import Finding, OnEvent, read_both_ways, require, setup_from

    from qrexec_trio import protocol

D = protocol.Direction
T = protocol.MsgType
_TRIGGER_TYPE = {2: T.TRIGGER_SERVICE, 3: T.TRIGGER_SERVICE3, 4: T.TRIGGER_SERVICE4}
# What may reach the policy, written out again here so that the harness does
# not trust the character sets it is checking.
_DOMAIN = re.compile(rb"[A-Za-z0-9_.@:-]*")
_SERVICE = re.compile(rb"[A-Za-z0-9_.-][A-Za-z0-9_.+-]*")
_IDENT = re.compile(rb"[A-Za-z0-9_. -]{0,31}")
_MAX_REQUEST = 65535  # a whole EXEC_CMDLINE / JUST_EXEC payload
_DIRECTIONS = (D.AGENT_TO_DAEMON, D.DAEMON_TO_AGENT, D.CLIENT_TO_DAEMON, D.DAEMON_TO_CLIENT,
               D.CLIENT_VM_TO_AGENT)


def _check_trigger(request: protocol.TriggerService, frame: bytes, version: int | None,
                   direction: protocol.Direction) -> None:
    if direction is D.CLIENT_VM_TO_AGENT:
        require(request.version == 4, f"a v{request.version} trigger from qrexec-client-vm")
        require(request.request_id == b"", "the client chose the request id")
    else:
        # v2 on a v2 link; from v3 on, v3 or anything up to the negotiated version.
        require(version is not None, "a trigger got through before the HELLO")
        assert version is not None  # for the type checker; require() has raised otherwise
        allowed = request.version == 2 if version < 3 else 3 <= request.version <= version
        require(allowed, f"a v{request.version} trigger got through at version {version}")
        require(_IDENT.fullmatch(request.request_id) is not None, "bad request id got through")
    require(int.from_bytes(frame[:4], "little") == _TRIGGER_TYPE[request.version],
            "trigger decoded as another version")
    domain_limit = 31 if request.version == 2 else 63
    for name, value in (("target", request.target), ("source", request.source)):
        require(len(value) <= domain_limit, f"{name} longer than its field allows")
        require(_DOMAIN.fullmatch(value) is not None, f"{name} {value!r} has a bad byte")
    require(request.version == 4 or request.source == b"", "source outside a v4 trigger")
    require(_SERVICE.fullmatch(request.service_name) is not None,
            f"service name {request.service_name[:80]!r} has a bad byte or a leading '+'")
    require(len(request.service_name) < 65000, "service name over the limit")
    require(request.version != 2 or len(request.service_name) <= 63, "v2 name too long")
    _check_descriptor_reaches_the_target(request.service_name)


def _check_descriptor_reaches_the_target(service_name: bytes) -> None:
    """The daemon passes an accepted name on as ``QUBESRPC name source``; it must
    come out of the target's parser as the same descriptor, or be refused there."""
    descriptor = service_name.decode("ascii")
    cmdline = protocol.build_rpc_cmdline("DEFAULT", descriptor, "vm1")
    try:
        parsed = protocol.parse_cmdline(cmdline)
    except protocol.RemoteProtocolError:
        return  # e.g. a name longer than NAME_MAX: refused at the target
    require(isinstance(parsed.command, protocol.RpcCall)
            and parsed.command.descriptor == descriptor
            and parsed.command.source == "vm1", "descriptor changed on its way to the target")


def _check_exec(request: protocol.ExecCmdline | protocol.JustExec, direction: D) -> None:
    require(b"\0" not in request.cmdline, "a NUL inside a cmdline")
    require(8 + len(request.cmdline) + 1 <= _MAX_REQUEST, "cmdline over the limit")
    if direction is D.DAEMON_TO_AGENT:
        # What the agent does next: the cmdline grammar may refuse it, nothing else.
        with contextlib.suppress(protocol.RemoteProtocolError):
            protocol.parse_cmdline(request.cmdline)


#: Which events may come out of each link (restated from the specification).
_CARRIES: dict[protocol.Direction, tuple[type, ...]] = {
    D.AGENT_TO_DAEMON: (protocol.ConnectionTerminated, protocol.TriggerService),
    D.DAEMON_TO_AGENT: (protocol.ExecCmdline, protocol.JustExec, protocol.ServiceConnect,
                        protocol.ServiceRefused),
    D.CLIENT_TO_DAEMON: (protocol.ExecCmdline, protocol.JustExec, protocol.ServiceConnect),
    D.DAEMON_TO_CLIENT: (protocol.PortAssigned,),
    D.CLIENT_VM_TO_AGENT: (protocol.TriggerService,),
}


def _checker(direction: protocol.Direction) -> OnEvent:
    def check(event: protocol.Event, frame: bytes, version: int | None) -> None:
        require(isinstance(event, _CARRIES[direction]),
                f"{type(event).__name__} got through {direction.value}")
        match event:
            case protocol.TriggerService():
                _check_trigger(event, frame, version, direction)
            case protocol.ExecCmdline() | protocol.JustExec():
                _check_exec(event, direction)
            case protocol.ServiceConnect(request_id=ident) | protocol.ServiceRefused(ident):
                require(_IDENT.fullmatch(ident) is not None, "bad request id got through")
            case protocol.PortAssigned(request_type):
                require(request_type in (T.EXEC_CMDLINE, T.JUST_EXEC, T.SERVICE_CONNECT),
                        "a reply to something that is no request")
            case protocol.ConnectionTerminated():
                pass
            case _:
                raise Finding(f"{event!r} got through {direction.value}")

    return check


def exercise(data: bytes) -> int:
    """Run one input; return how many events got through on all links (for corpus checks)."""
    if not data:
        return 0
    setup = setup_from(data[0], versions=(2, 3, 4))
    accepted = 0
    for direction in _DIRECTIONS:
        outcome = read_both_ways(direction, data[1:], setup, _checker(direction))
        accepted += sum(not isinstance(e, protocol.Hello) for e in outcome.events)
    return accepted


def test_one_input(data: bytes) -> None:
    exercise(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
