#!/usr/bin/env python3
"""Fuzz the cmdline parser (what a VM agent makes of MSG_EXEC_CMDLINE).

Input: bit 0 of byte 0 chooses the agent's view (``user:`` prefix expected) or
dom0's view (no user); the rest is the cmdline. RemoteProtocolError is the
expected refusal; any other exception (a LocalProtocolError too), or a broken
invariant (:class:`Finding`), is a bug.
The invariants: the parse loses and invents nothing (the fields reassemble to
the input), and every length limit of the grammar holds.

Run: ``.venv/bin/python fuzz/fuzz_cmdline.py [libFuzzer options] [corpus dirs]``
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    with atheris.instrument_imports():
        from stream_support import require

        from qrexec_trio import protocol
else:
    from stream_support import require

    from qrexec_trio import protocol

# Limits from the specification, in bytes.
_MAX_DESCRIPTOR = 65000
_MAX_SERVICE_NAME = 255


def _wire(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _reassemble(parsed: protocol.Cmdline) -> bytes:
    text = "" if parsed.user is None else parsed.user + ":"
    text += "nogui:" if parsed.nogui else ""
    if isinstance(parsed.command, protocol.RpcCall):
        text += "QUBESRPC " + parsed.command.text
    else:
        text += parsed.command.command
    return _wire(text)


def _check_rpc_call(call: protocol.RpcCall, parsed: protocol.Cmdline, with_user: bool) -> None:
    require(0 < len(_wire(call.descriptor)) <= _MAX_DESCRIPTOR, "descriptor length")
    require(0 < len(_wire(call.service_name)) <= _MAX_SERVICE_NAME, "service name length")
    require("+" not in call.service_name, "service name holds a '+'")
    expected = call.service_name + ("" if call.argument is None else "+" + call.argument)
    require(call.descriptor == expected, "descriptor is not name[+argument]")
    require(call.lookup_names == (f"{call.service_name}+{call.argument or ''}",
                                  call.service_name), "lookup names")
    require(bool(call.source), "empty source")
    for token in (call.descriptor, call.source, call.target_type or "", call.target or ""):
        require(" " not in token, f"token {token[:40]!r} holds a space")
    require((call.target_type is None) == (call.target is None), "half a target")
    require(call.target_type in (None, "name", "keyword"), "bad target type")
    require(call.target is None or bool(call.target), "empty target")
    if parsed.user is not None and call.target is None:
        rebuilt = protocol.build_rpc_cmdline(parsed.user, call.descriptor, call.source,
                                             nogui=parsed.nogui)
        require(protocol.parse_cmdline(rebuilt) == parsed, "build_rpc_cmdline round trip")


def exercise(data: bytes) -> int:
    """Run one input; return 1 if it parsed, 0 if it was refused or empty."""
    if not data:
        return 0
    with_user = bool(data[0] & 1)
    cmdline = data[1:]
    try:
        parsed = protocol.parse_cmdline(cmdline, with_user=with_user)
    except protocol.RemoteProtocolError:
        return 0
    require((parsed.user is not None) == with_user, "user presence")
    if parsed.user is not None:
        require(bool(parsed.user) and ":" not in parsed.user, "bad user part")
        # The daemon's DEFAULT: rewrite keeps every byte after the user.
        substituted = protocol.substitute_default_user(b"DEFAULT:" + cmdline.partition(b":")[2],
                                                       "qtest")
        require(substituted == b"qtest:" + cmdline.partition(b":")[2], "DEFAULT: rewrite")
    require(_reassemble(parsed) == cmdline, "fields do not reassemble to the input")
    if isinstance(parsed.command, protocol.RpcCall):
        _check_rpc_call(parsed.command, parsed, with_user)
    else:
        require(bool(parsed.command.command), "empty shell command")
        require(not parsed.command.command.startswith("QUBESRPC"),
                "a QUBESRPC line taken for a shell command")
    return 1


def test_one_input(data: bytes) -> None:
    exercise(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
