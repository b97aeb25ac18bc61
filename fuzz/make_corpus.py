#!/usr/bin/env python3
"""Write the seed corpora in fuzz/corpus/<target>/ (run from anywhere).

Each seed is a valid input of its harness (a few deliberately invalid ones are
marked ``bad-``), built with the protocol's own encoders and byte-checked
against the reference layouts in tests/protocol. The first byte of every seed
is the harness's set-up byte; see each harness's docstring.
Files left in a corpus directory that this script does not produce are removed,
so the directories always match this list.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qrexec_trio.protocol import (
    ExecParams,
    MsgType,
    TriggerRequest,
    encode_exit_code,
    encode_hello,
    encode_message,
)

CORPUS = Path(__file__).resolve().parent / "corpus"

# Set-up bytes (bits 0-1 version choice, bit 2 HELLO already done, bits 3-7 piece size - 1).
DATA_V2, DATA_V3 = 0, 1
CONTROL_V2, CONTROL_V3, CONTROL_V4 = 0, 1, 2
HELLO_DONE = 4


def piece(size: int) -> int:
    return (size - 1) << 3


def msg(msg_type: MsgType, payload: bytes = b"") -> bytes:
    return encode_message(msg_type, payload)


def hello(version: int) -> bytes:
    return msg(MsgType.HELLO, encode_hello(version))


def trigger(version: int, service: bytes, target: bytes = b"dom0", source: bytes = b"",
            ident: bytes = b"SOCKET13") -> bytes:
    request = TriggerRequest(version, source, target, ident, service)
    return msg(request.msg_type, request.encode())


def terminated(domain: int, port: int) -> bytes:
    return msg(MsgType.CONNECTION_TERMINATED, ExecParams(domain, port).encode())


STDOUT, STDERR, STDIN, EXIT = (MsgType.DATA_STDOUT, MsgType.DATA_STDERR, MsgType.DATA_STDIN,
                               MsgType.DATA_EXIT_CODE)

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
        + msg(STDOUT, b"arg=arg src=dom0\n") + msg(STDOUT, b"ping\n") + msg(STDOUT) + msg(STDERR)
        + msg(EXIT, encode_exit_code(0)),
        "service-v2-full-chunk": bytes([DATA_V2 | piece(32)]) + hello(2)
        + msg(STDOUT, b"\0" * 4096) + msg(STDOUT) + msg(STDERR) + msg(EXIT, encode_exit_code(0)),
        "service-not-found": bytes([DATA_V3 | piece(1)]) + hello(4) + msg(STDOUT) + msg(STDERR)
        + msg(EXIT, encode_exit_code(127)),
        "service-killed-stderr": bytes([DATA_V3 | piece(3)]) + hello(3)
        + msg(STDERR, b"\x1b[31merr\n") + msg(STDERR) + msg(STDOUT)
        + msg(EXIT, encode_exit_code(143)),
        "service-short-exit-code": bytes([DATA_V3 | HELLO_DONE | piece(8)]) + msg(STDOUT)
        + msg(EXIT, b"\x05"),
        "caller-stdin": bytes([DATA_V3 | piece(2)]) + hello(4) + msg(STDIN, b"hello\n")
        + msg(STDIN),
        "caller-stdin-after-hello": bytes([DATA_V2 | HELLO_DONE | piece(16)])
        + msg(STDIN, b"to-dom0\n") + msg(STDIN),
        "bad-oversized-chunk": bytes([DATA_V2 | piece(32)]) + hello(2)
        + encode_message(STDOUT, b"")[:4] + (4097).to_bytes(4, "little"),
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
        + msg(MsgType.TRIGGER_SERVICE4, bytes(64) + b"dom0".ljust(64, b"\0")
              + b"SOCKET13".ljust(32, b"\0") + b"../../bin/sh\0"),
        "bad-trigger2-on-v4": bytes([CONTROL_V4 | piece(32)]) + hello(4)
        + trigger(2, b"qubes.VMShell"),
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
