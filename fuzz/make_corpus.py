#!/usr/bin/env python3
"""Write the seed corpora in fuzz/corpus/<target>/ (run from anywhere).

Each seed is a valid input of its harness (a few deliberately invalid ones are
marked ``bad-``), built with the protocol's own events (``Event.encode()``),
whose layouts tests/protocol checks byte for byte against the reference.
The first byte of every seed is the harness's set-up byte; see each harness's
docstring.
Files left in a corpus directory that this script does not produce are removed,
so the directories always match this list.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qrexec_trio.protocol import (
    ConnectionTerminated,
    Data,
    ExecCmdline,
    ExitCode,
    Hello,
    JustExec,
    MsgType,
    PortAssigned,
    ServiceConnect,
    ServiceRefused,
    Stream,
    TriggerService,
    encode_frame,
)

CORPUS = Path(__file__).resolve().parent / "corpus"

# Set-up bytes (bits 0-1 version choice, bit 2 HELLO already done, bits 3-7 piece size - 1).
DATA_V2, DATA_V3 = 0, 1
CONTROL_V2, CONTROL_V3, CONTROL_V4 = 0, 1, 2
HELLO_DONE = 4


def piece(size: int) -> int:
    return (size - 1) << 3


def hello(version: int) -> bytes:
    return Hello(version).encode()


def trigger(version: int, service: bytes, target: bytes = b"dom0", source: bytes = b"",
            ident: bytes = b"SOCKET13") -> bytes:
    return TriggerService(version, source, target, ident, service).encode()


def terminated(domain: int, port: int) -> bytes:
    return ConnectionTerminated(domain, port).encode()


def out(data: bytes = b"") -> bytes:
    return Data(Stream.STDOUT, data).encode()


def err(data: bytes = b"") -> bytes:
    return Data(Stream.STDERR, data).encode()


def stdin(data: bytes = b"") -> bytes:
    return Data(Stream.STDIN, data).encode()


def exit_code(status: int) -> bytes:
    return ExitCode(status).encode()


#: A v4 trigger whose service name no daemon may accept.
BAD_TRIGGER4 = encode_frame(MsgType.TRIGGER_SERVICE4, bytes(64) + b"dom0".ljust(64, b"\0")
                            + b"SOCKET13".ljust(32, b"\0") + b"../../bin/sh\0")

SEEDS: dict[str, dict[str, bytes]] = {
    "cmdline": {
        "vm-shell": b"\x01qtest:read x; echo out $x; echo err >&2; exit 3",
        "vm-rpc": b"\x01qtest:QUBESRPC test.Echo+arg dom0",
        "vm-rpc-nogui-no-argument": b"\x01user:nogui:QUBESRPC qubes.WaitForSession dom0",
        "vm-rpc-empty-argument": b"\x01DEFAULT:QUBESRPC qubes.Filecopy+ work",
        "vm-rpc-four-tokens": b"\x01root:QUBESRPC admin.vm.List+ dom0 name dom0",
        "dom0-rpc-name": b"\x00QUBESRPC test.Echo+arg vm1 name dom0",
        "dom0-rpc-keyword": b"\x00nogui:QUBESRPC qubes.Gpg+ vm1 keyword default",
        "dom0-shell": b"\x00echo hello",
        "bad-glued-keyword": b"\x01user:QUBESRPCtest.Echo dom0",
        "bad-no-user": b"\x01QUBESRPC test.Echo dom0",
    },
    "data_stream": {
        "service-v3-echo": bytes([DATA_V3 | piece(5)]) + hello(4)
        + out(b"arg=arg src=dom0\n") + out(b"ping\n") + out() + err() + exit_code(0),
        "service-v2-full-chunk": bytes([DATA_V2 | piece(32)]) + hello(2)
        + out(b"\0" * 4096) + out() + err() + exit_code(0),
        "service-not-found": bytes([DATA_V3 | piece(1)]) + hello(4) + out() + err()
        + exit_code(127),
        "service-killed-stderr": bytes([DATA_V3 | piece(3)]) + hello(3)
        + err(b"\x1b[31merr\n") + err() + out() + exit_code(143),
        "service-short-exit-code": bytes([DATA_V3 | HELLO_DONE | piece(8)]) + out()
        + encode_frame(MsgType.DATA_EXIT_CODE, b"\x05"),
        "caller-stdin": bytes([DATA_V3 | piece(2)]) + hello(4) + stdin(b"hello\n") + stdin(),
        "caller-stdin-after-hello": bytes([DATA_V2 | HELLO_DONE | piece(16)])
        + stdin(b"to-dom0\n") + stdin(),
        "bad-oversized-chunk": bytes([DATA_V2 | piece(32)]) + hello(2)
        + out()[:4] + (4097).to_bytes(4, "little"),
        # The status channel (agent -> qrexec-client-vm): no HELLO, stderr, one outcome.
        "status-stderr-then-exit": bytes([DATA_V3 | HELLO_DONE | piece(3)])
        + err(b"remote: oops\n") + err(b"\x1b[2J") + exit_code(5),
        "status-refused": bytes([DATA_V3 | piece(4)]) + ServiceRefused(b"7 8 9").encode(),
    },
    "control": {
        "v4-trigger4-dom0": bytes([CONTROL_V4 | piece(7)]) + hello(4)
        + trigger(4, b"test.Echo+arg") + terminated(0, 513),
        "v4-trigger4-relayed-dispvm": bytes([CONTROL_V4 | piece(32)]) + hello(4)
        + trigger(4, b"qubes.OpenInVM", target=b"@dispvm:fedora-dvm", source=b"work"),
        "v3-trigger3": bytes([CONTROL_V3 | piece(4)]) + hello(3)
        + trigger(3, b"qubes.Filecopy+", target=b"@default", ident=b"SOCKET7")
        + terminated(43, 514),
        "v2-trigger": bytes([CONTROL_V2 | piece(9)]) + hello(2)
        + trigger(2, b"qubes.VMShell", target=b"vm2", ident=b"SOCKET5"),
        "v4-after-hello-terminations": bytes([CONTROL_V4 | HELLO_DONE | piece(1)])
        + terminated(0, 513) + terminated(42, 768),
        "v4-agent-speaks-v3": bytes([CONTROL_V4 | piece(11)]) + hello(3)
        + trigger(3, b"test.Echo+arg"),
        "bad-trigger4-traversal": bytes([CONTROL_V4 | piece(32)]) + hello(4)
        + BAD_TRIGGER4,
        "bad-trigger2-on-v4": bytes([CONTROL_V4 | piece(32)]) + hello(4)
        + trigger(2, b"qubes.VMShell"),
        # A bad trigger is refused on its own: the link reads on.
        "v4-undecodable-then-termination": bytes([CONTROL_V4 | piece(13)]) + hello(4)
        + BAD_TRIGGER4 + terminated(0, 514),
        # The same bytes are read on the other control links too: a seed for each.
        "daemon-to-agent-requests": bytes([CONTROL_V4 | piece(6)]) + hello(4)
        + ExecCmdline(0, 513, b"qtest:QUBESRPC test.Echo+arg dom0").encode()
        + JustExec(0, 514, b"qtest:echo hi").encode()
        + ServiceConnect(0, 515, b"SOCKET13").encode() + ServiceRefused(b"SOCKET14").encode(),
        "client-to-daemon-connect": bytes([CONTROL_V3 | piece(10)]) + hello(3)
        + ServiceConnect(0, 0, b"SOCKET13").encode(),
        "daemon-to-client-reply": bytes([CONTROL_V3 | HELLO_DONE | piece(2)])
        + PortAssigned(MsgType.EXEC_CMDLINE, 42, 513).encode(),
        "client-vm-trigger4": bytes([CONTROL_V4 | piece(17)])
        + trigger(4, b"test.Echo+arg", ident=b"SOCKET"),
    },
}


def main() -> int:
    for target, seeds in SEEDS.items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for stale in set(p.name for p in directory.iterdir()) - set(seeds):
            (directory / stale).unlink()
        for name, data in seeds.items():
            (directory / name).write_bytes(data)
        print(f"{directory}: {len(seeds)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
