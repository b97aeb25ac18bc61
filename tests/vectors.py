"""Golden wire transcripts of the reference C programs (tests/data/vectors).

Loads the records and gives the tests what they need to replay one side of a
link and check the other: exact bytes where the vectors' README says they must
match, and the allowed variations (chunking, EOF order, HELLO order) elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path


def _find_vectors() -> Path:
    """``$QREXEC_VECTORS``, else the copy in the repository, ``tests/data/vectors``."""
    if "QREXEC_VECTORS" in os.environ:
        return Path(os.environ["QREXEC_VECTORS"])
    in_repository = Path(__file__).resolve().parent / "data" / "vectors"
    if in_repository.is_dir():
        return in_repository
    # A missing vector folder must fail the replay tests, never skip them.
    raise FileNotFoundError(
        f"golden vectors not found at {in_repository}; set QREXEC_VECTORS to their folder"
    )


VECTORS = _find_vectors()

MSG_DATA_STDIN = 0x190
MSG_DATA_STDOUT = 0x191
MSG_DATA_STDERR = 0x192
MSG_DATA_EXIT_CODE = 0x193
MSG_JUST_EXEC = 0x201
MSG_HELLO = 0x300


@dataclass(frozen=True)
class Record:
    seq: int
    link: str
    sender: str
    receiver: str
    kind: str  # "message", "raw", "event" or "log" (a service's log line, README 8.1)
    type: int | None
    name: str
    payload: bytes
    vchan: str | None
    socket: str | None
    conn: int | None

    @property
    def is_event(self) -> bool:
        return self.kind == "event"


def _payload(raw: dict) -> bytes:
    data = bytes.fromhex(raw["payload_hex"])
    if "payload_len" not in raw:
        return data
    # Long data payloads are stored as a prefix and a hash. The ones in these
    # vectors are all zeros (head -c N /dev/zero): rebuild and verify that.
    rebuilt = bytes(raw["payload_len"])
    if hashlib.sha256(rebuilt).hexdigest() != raw["payload_sha256"]:
        raise ValueError(f"record {raw['seq']}: cannot rebuild its truncated payload")
    return rebuilt


def load(scenario: str) -> list[Record]:
    records = []
    for line in (VECTORS / f"{scenario}.jsonl").read_text().splitlines():
        raw = json.loads(line)
        kind = {"event": "event", "raw": "raw", "log": "log"}.get(raw["type"], "message")
        records.append(Record(
            seq=raw["seq"], link=raw["link"], sender=raw["from"], receiver=raw["to"],
            kind=kind, type=int(raw["type"], 16) if kind == "message" else None,
            name=raw["name"], payload=_payload(raw), vchan=raw.get("vchan"),
            socket=raw.get("socket"), conn=raw.get("conn"),
        ))
    return sorted(records, key=lambda r: r.seq)


def scenario_info(scenario: str) -> dict:
    return json.loads((VECTORS / "scenarios.json").read_text())[scenario]


def stream_bytes(records: list[Record], msg_type: int) -> bytes:
    return b"".join(r.payload for r in records if r.type == msg_type)


class Peer:
    """One end of a framed link, played by the test with a blocking socket."""

    def __init__(self, sock: socket.socket, timeout: float = 20.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buffer = b""

    def send(self, msg_type: int, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack("<II", msg_type, len(payload)) + payload)

    def _fill(self, size: int) -> bool:
        deadline = time.monotonic() + self.timeout
        while len(self._buffer) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"waited {self.timeout}s for {size - len(self._buffer)} bytes")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def receive(self) -> tuple[int, bytes] | None:
        """The next message, or None at end of stream."""
        if not self._fill(8):
            assert not self._buffer, f"stream ended inside a header: {self._buffer!r}"
            return None
        msg_type, length = struct.unpack("<II", self._buffer[:8])
        assert self._fill(8 + length), "stream ended inside a payload"
        payload = self._buffer[8 : 8 + length]
        self._buffer = self._buffer[8 + length :]
        return msg_type, payload

    def receive_raw(self, size: int) -> bytes:
        assert self._fill(size)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def expect(self, record: Record) -> None:
        got = self.receive()
        assert got is not None, f"EOF where seq {record.seq} {record.name} was expected"
        assert got == (record.type, record.payload), (
            f"seq {record.seq}: expected {record.name} {record.payload.hex()}, "
            f"got 0x{got[0]:x} {got[1].hex()}"
        )

    def expect_eof(self) -> None:
        got = self.receive()
        assert got is None, f"expected EOF, got 0x{got[0]:x} {got[1].hex()}"

    def close(self) -> None:
        self.sock.close()


def connect_unix(path: Path, timeout: float = 20.0) -> socket.socket:
    """Connect, waiting for the socket to appear (as a vchan client polls)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        return sock


def listen_unix(path: Path) -> socket.socket:
    """A vchan server's socket; a stale one from an earlier call on the port is replaced."""
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    sock.settimeout(20)
    return sock
