"""The local protocol between ``qrexec-client-vm`` and ``qrexec-agent`` inside one VM.

Sans-IO: paths and byte layouts, shared by both programs so that the two ends
cannot drift apart. The status channel's messages are protocol events, read
with ``MessageReader(Direction.AGENT_TO_CLIENT_VM)``, which enforces its
grammar.

**Paths.** Today's trigger socket lives at ``PATH`` (``--agent-socket``,
default ``<runtime-dir>/qrexec-agent``). R2 put its trigger FIFO at that very
path, but one path names one file, and today's clients expect a socket
there. So the R2 files sit beside it: the fdpass socket at ``PATH-fdpass``
and the FIFO at ``PATH-fifo``. With the default path that gives R2's own
``qrexec-agent-fdpass``.

**R2 request** (r2-design.md §4). The client connects three times to the
fdpass socket; for each connection the agent writes the number of the fd it
accepted as a raw 4-byte little-endian int. The three numbers, as the text
``"N0 N1 N2"``, are the connection id (CID): socket 0 becomes the calling
program's stdin, socket 1 its stdout, socket 2 the status channel. The client
then writes one 128-byte record to the FIFO, ``service[64] target[32]
cid[32]``, each field NUL-terminated and NUL-padded (one write of less than
PIPE_BUF bytes, so records from concurrent clients never interleave). A
socket its client closes before writing the record is released, so its CID
names nothing any more; a socket closed after the record, with nothing unread
in it, is still claimed (the agent takes the FIFO's records before it
releases a closed socket), and so is one with unread data or only its write
side shut down.

**Status channel** (socket 2; our own protocol, R2 had no way to report an
outcome). The agent writes qrexec-framed messages (8-byte header
``<type u32><len u32>``, then the payload):

* any number of ``MSG_DATA_STDERR`` (0x192) with the remote service's stderr
  (never an empty one), then
* exactly one final message: ``MSG_DATA_EXIT_CODE`` (0x193, 4 bytes, signed
  little-endian: the remote exit status, -1 if the data vchan died before one
  came) or ``MSG_SERVICE_REFUSED`` (0x203, the 32-byte NUL-padded CID: dom0
  refused the call),

and then closes all three sockets. A client that will not read the channel
(a local program that has socket 2 as its stderr) shuts down its read side,
so the agent's writes fail at once and are dropped instead of filling the
socket buffer. Bytes the client writes into socket 2 (that program's stderr)
are read and dropped by the agent: today's protocol cannot carry the caller's
stderr. The agent closing the sockets with no final message means the request
was never answered (its record was dropped, or named a socket that was no
longer unclaimed, or its sockets expired unclaimed).
"""

from __future__ import annotations

# _struct is what struct re-exports: one module fewer on the clients' start-up.
import _struct as struct
import os

from ._errors import LocalProtocolError, RemoteProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

DEFAULT_RUNTIME_DIR: Final = "/var/run/qubes"
DEFAULT_SOCKET_NAME: Final = "qrexec-agent"
DEFAULT_AGENT_SOCKET: Final = os.path.join(DEFAULT_RUNTIME_DIR, DEFAULT_SOCKET_NAME)

#: The fd number the agent hands out on each fdpass connection.
FD_NUMBER: Final = struct.Struct("<i")

_IDENT_SIZE: Final = 32
FIFO_RECORD_SIZE: Final = 128
_FIFO_FIELDS: Final = (("service", 0, 64), ("target", 64, 96), ("cid", 96, 128))

#: The most digits one number of a CID may have.
_CID_NUMBER_DIGITS: Final = 10


def fdpass_path(agent_socket: str) -> str:
    return f"{agent_socket}-fdpass"


def fifo_path(agent_socket: str) -> str:
    return f"{agent_socket}-fifo"


def control_path(agent_socket: str) -> str:
    return f"{agent_socket}-control"


# -- FIFO record ------------------------------------------------------------------


def encode_fifo_record(service: bytes, target: bytes, cid: bytes) -> bytes:
    """The 128-byte trigger record; raises :class:`LocalProtocolError` if a field does not fit."""
    fields = dict(zip(("service", "target", "cid"), (service, target, cid), strict=True))
    record = b""
    for name, start, end in _FIFO_FIELDS:
        value = fields[name]
        if b"\0" in value:
            raise LocalProtocolError(f"fifo.{name}", "contains a NUL byte")
        if len(value) >= end - start:
            raise LocalProtocolError(f"fifo.{name}", f"longer than {end - start - 1} bytes")
        record += value.ljust(end - start, b"\0")
    return record


def decode_fifo_record(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(service, target, cid) of a record; the fields' contents are checked by the caller."""
    if len(raw) != FIFO_RECORD_SIZE:
        raise RemoteProtocolError("fifo",
            f"record must be {FIFO_RECORD_SIZE} bytes, got {len(raw)}")
    values = []
    for name, start, end in _FIFO_FIELDS:
        field = raw[start:end]
        nul = field.find(b"\0")
        if nul < 0:
            raise RemoteProtocolError(f"fifo.{name}", "not NUL-terminated")
        if field[nul:].count(0) != len(field) - nul:
            raise RemoteProtocolError(f"fifo.{name}",
                "bytes after the terminating NUL are not NUL")
        values.append(field[:nul])
    return values[0], values[1], values[2]


# -- CID ----------------------------------------------------------------------------


def format_cid(fds: tuple[int, int, int]) -> bytes:
    return b" ".join(str(fd).encode() for fd in fds)


def parse_cid(text: bytes) -> tuple[int, int, int]:
    """Three distinct fd numbers, in their one canonical spelling, short enough to be
    the request's ident."""
    if len(text) >= _IDENT_SIZE:
        raise RemoteProtocolError("cid", f"longer than {_IDENT_SIZE - 1} bytes")
    numbers = text.split(b" ")
    if len(numbers) != 3 or not all(_is_canonical_number(n) for n in numbers):
        raise RemoteProtocolError("cid", "not three decimal numbers separated by single spaces")
    fds = (int(numbers[0]), int(numbers[1]), int(numbers[2]))
    if len(set(fds)) != 3:
        raise RemoteProtocolError("cid", "the three numbers are not distinct")
    return fds


def _is_canonical_number(text: bytes) -> bool:
    """Decimal digits, no sign, no leading zero, at most 10 of them (bytes methods, not re:
    the client imports this module)."""
    return (0 < len(text) <= _CID_NUMBER_DIGITS and text.isdigit()
            and (text[0] != ord("0") or len(text) == 1))
