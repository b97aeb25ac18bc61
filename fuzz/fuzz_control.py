#!/usr/bin/env python3
"""Fuzz what a hostile VM's agent can send the daemon on the control vchan.

This is dom0's attack surface: the bytes come from a VM. Input: byte 0 sets up
the reader (bits 0-1: the daemon's version 2, 3 or 4; bit 2: HELLO already
done; bits 3-7: feeding piece size 1..32), the rest is the agent->daemon
stream. Each message that gets through is decoded as the daemon would
(decode_trigger / decode_exec_params). ProtocolError, from the reader or a
decoder, is the expected refusal; any other exception, or a broken invariant
(:class:`Finding`), is a bug.

Run: ``.venv/bin/python fuzz/fuzz_control.py [libFuzzer options] [corpus dirs]``
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    with atheris.instrument_imports():
        from stream_support import read_both_ways, require, setup_from

        from qrexec_trio import protocol
else:
    from stream_support import read_both_ways, require, setup_from

    from qrexec_trio import protocol

_TRIGGER_VERSION = {
    protocol.MsgType.TRIGGER_SERVICE: 2,
    protocol.MsgType.TRIGGER_SERVICE3: 3,
    protocol.MsgType.TRIGGER_SERVICE4: 4,
}
# What may reach the policy, written out again here so that the harness does
# not trust the character sets it is checking.
_DOMAIN = re.compile(rb"[A-Za-z0-9_.@:-]*")
_SERVICE = re.compile(rb"[A-Za-z0-9_.-][A-Za-z0-9_.+-]*")
_IDENT = re.compile(rb"[A-Za-z0-9_. -]*")


def _check_trigger(message: protocol.Message, version: int) -> bool:
    """Decode a trigger as the daemon does; True if it was accepted."""
    message_version = _TRIGGER_VERSION[protocol.MsgType(message.type)]
    allowed = message_version == 2 if version < 3 else 3 <= message_version <= version
    require(allowed, f"{message.name} got through at control version {version}")
    try:
        request = protocol.decode_trigger(message.type, message.payload)
    except protocol.ProtocolError:
        return False
    require(request.version == message_version, "trigger decoded as another version")
    require(request.encode() == message.payload,
            "accepted trigger does not re-encode to its bytes (something was altered)")
    domain_limit = 31 if request.version == 2 else 63
    for name, value in (("target", request.target), ("source", request.source)):
        require(len(value) <= domain_limit, f"{name} longer than its field allows")
        require(_DOMAIN.fullmatch(value) is not None, f"{name} {value!r} has a bad byte")
    require(request.version == 4 or request.source == b"", "source outside a v4 trigger")
    require(_SERVICE.fullmatch(request.service_name) is not None,
            f"service name {request.service_name[:80]!r} has a bad byte or a leading '+'")
    require(len(request.service_name) < 65000, "service name over the limit")
    require(request.version != 2 or len(request.service_name) <= 63, "v2 name too long")
    require(_IDENT.fullmatch(request.request_id) is not None
            and len(request.request_id) <= 31, "bad request id got through")
    _check_descriptor_reaches_the_target(request.service_name)
    return True


def _check_descriptor_reaches_the_target(service_name: bytes) -> None:
    """The daemon passes an accepted name on as ``QUBESRPC name source``; it must
    come out of the target's parser as the same descriptor, or be refused there."""
    descriptor = service_name.decode("ascii")
    cmdline = protocol.build_rpc_cmdline("DEFAULT", descriptor, "vm1")
    try:
        parsed = protocol.parse_cmdline(cmdline)
    except protocol.ProtocolError:
        return  # e.g. a name longer than NAME_MAX: refused at the target
    require(isinstance(parsed.command, protocol.RpcCall)
            and parsed.command.descriptor == descriptor
            and parsed.command.source == "vm1", "descriptor changed on its way to the target")


def _check_control_message(message: protocol.Message, version: int) -> bool:
    """Decode a message as the daemon does; True if it was accepted."""
    if message.type == protocol.MsgType.CONNECTION_TERMINATED:
        params = protocol.decode_exec_params(message.payload)
        require(params.encode() == message.payload, "exec_params do not round-trip")
        return True
    require(message.type in _TRIGGER_VERSION, f"{message.name} got through agent->daemon")
    return _check_trigger(message, version)


def exercise(data: bytes) -> int:
    """Run one input; return how many messages got through and decoded."""
    if not data:
        return 0
    accepted = 0

    def on_message(message: protocol.Message, version: int) -> None:
        nonlocal accepted
        accepted += _check_control_message(message, version)

    setup = setup_from(data[0], versions=(2, 3, 4))
    read_both_ways(protocol.Direction.AGENT_TO_DAEMON, data[1:], setup, on_message)
    return accepted


def test_one_input(data: bytes) -> None:
    exercise(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
