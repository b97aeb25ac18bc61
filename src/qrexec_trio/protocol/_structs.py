"""Field layouts of the qrexec messages (wire-protocol.md §1 and §4).

Pure functions from field values to bytes and back; :mod:`._events` builds
the messages out of them. Decoders check lengths, terminators and padding and
raise :class:`RemoteProtocolError` naming the field; encoders refuse values no
receiver would accept with :class:`LocalProtocolError`.
"""

from __future__ import annotations

# _struct is what struct re-exports: one module fewer on the clients' start-up.
import _struct as struct

from .._light import frozen_record
from ._constants import (
    HEADER_SIZE,
    IDENT_SIZE,
    MAX_SERVICE_NAME_LEN,
    MIN_PROTOCOL_VERSION,
    ExitStatus,
    MsgType,
)
from ._errors import LocalProtocolError, RemoteProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

# x86-64 is the only platform qrexec runs on, so "host order" is little-endian.
_HEADER: Final = struct.Struct("<II")
U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
PORT_PAIR: Final = struct.Struct("<II")
_U32_MAX: Final = 0xFFFFFFFF


@frozen_record
class Message:
    """One framed message as read off the wire: the header's type and the payload.

    Roles never see these: :class:`~._framing.MessageReader` decodes them into
    events. They exist for the framing layer, the fuzzers and the tests.
    """

    type: int
    payload: bytes

    @property
    def name(self) -> str:
        return msg_type_name(self.type)


def msg_type_name(msg_type: int) -> str:
    try:
        return MsgType(msg_type).name
    except ValueError:
        return f"0x{msg_type:x}"


def check_u32(field: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise LocalProtocolError(field, f"{value} does not fit in an unsigned 32-bit field")


def encode_header(msg_type: int, length: int) -> bytes:
    check_u32("header.type", msg_type)
    check_u32("header.len", length)
    return _HEADER.pack(msg_type, length)


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    if len(data) != HEADER_SIZE:
        raise RemoteProtocolError("header", f"must be {HEADER_SIZE} bytes, got {len(data)}")
    msg_type, length = _HEADER.unpack(data)
    return int(msg_type), int(length)


def encode_frame(msg_type: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Header and payload: one message as it goes on the wire."""
    return b"".join((encode_header(msg_type, len(payload)), payload))


def negotiate_version(own: int, peer: int, minimum: int = MIN_PROTOCOL_VERSION) -> int:
    """The version both sides use: the lower of the two, and at least ``minimum``."""
    version = min(own, peer)
    if version < minimum:
        raise RemoteProtocolError(
            "hello.version", f"peer speaks version {peer}, need >= {minimum}")
    return version


# -- request ids (service_params) ------------------------------------------------

# The allowed bytes of each kind of name. Checked with bytes methods, not
# regexes: the short-lived clients check their names on every call and do not
# import re.
_DIGITS: Final = b"0123456789"
_LETTERS: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_IDENT_CHARS: Final = _DIGITS + _LETTERS + b"_.- "


def _only(text: bytes, allowed: bytes) -> bool:
    """Whether every byte of ``text`` is one of ``allowed`` (true for empty ``text``)."""
    return not text.translate(None, allowed)


def encode_ident(ident: bytes) -> bytes:
    """A 32-byte NUL-padded request id."""
    if len(ident) >= IDENT_SIZE:
        raise LocalProtocolError("request_id", f"longer than {IDENT_SIZE - 1} bytes")
    if not _only(ident, _IDENT_CHARS):
        raise LocalProtocolError("request_id", "has a byte outside [0-9A-Za-z_.- ]")
    return ident.ljust(IDENT_SIZE, b"\0")


def decode_ident(raw: bytes, field: str = "request_id") -> bytes:
    """Validate a 32-byte request id as the daemon does and return the text before the NUL.

    The bytes before the first NUL must be ``[0-9A-Za-z_.- ]``; a NUL must
    exist, and every byte after it must be NUL too (so two ids that compare
    equal are equal on the wire).
    """
    if len(raw) != IDENT_SIZE:
        raise RemoteProtocolError(field, f"must be {IDENT_SIZE} bytes, got {len(raw)}")
    return check_ident_text(_padded_text(field, raw), field)


def check_ident_text(text: bytes, field: str = "request_id") -> bytes:
    """``text`` if it can be a request id (the part before the NUL), else raise.

    The rules :func:`encode_ident` enforces, as a peer's fault: at most
    ``IDENT_SIZE - 1`` bytes of ``[0-9A-Za-z_.- ]``.
    """
    if len(text) >= IDENT_SIZE:
        raise RemoteProtocolError(field, f"longer than {IDENT_SIZE - 1} bytes")
    if not _only(text, _IDENT_CHARS):
        raise RemoteProtocolError(field, "has a byte outside [0-9A-Za-z_.- ]")
    return text


def _padded_text(field: str, raw: bytes) -> bytes:
    nul = raw.find(b"\0")
    if nul < 0:
        raise RemoteProtocolError(field, "not NUL-terminated")
    if raw[nul:].count(0) != len(raw) - nul:
        raise RemoteProtocolError(field, "bytes after the terminating NUL are not NUL")
    return raw[:nul]


# -- domain and service names (trigger_service_params) -----------------------------

# The daemon's character sets (wire-protocol.md §7.2 step 3). Where the
# reference silently rewrites other bytes to "_", we refuse: a request that is
# not what the VM asked for must not reach the policy under another name.
_DOMAIN_CHARS: Final = _LETTERS + _DIGITS + b"_.-@:"
_SERVICE_CHARS: Final = _LETTERS + _DIGITS + b"_.-+"


def encode_domain(field: str, name: bytes, size: int) -> bytes:
    if len(name) >= size:
        raise LocalProtocolError(field, f"longer than {size - 1} bytes")
    if not _only(name, _DOMAIN_CHARS):
        raise LocalProtocolError(field, "has a byte outside [A-Za-z0-9_.-@:]")
    return name.ljust(size, b"\0")


def decode_domain(field: str, raw: bytes) -> bytes:
    """A NUL-terminated domain-name field; NUL padding is required after it."""
    name = _padded_text(field, raw)
    if not _only(name, _DOMAIN_CHARS):
        raise RemoteProtocolError(field, "has a byte outside [A-Za-z0-9_.-@:]")
    return name


def service_name_problem(name: bytes) -> str | None:
    """Why a trigger's service name (``SVC[+ARG]``, no NUL) is not acceptable, or None."""
    if not name:
        return "empty"
    if len(name) + 1 > MAX_SERVICE_NAME_LEN:
        return f"longer than {MAX_SERVICE_NAME_LEN - 1} bytes"
    if not _only(name, _SERVICE_CHARS):
        return "has a byte outside [A-Za-z0-9_.-+]"
    if name.startswith(b"+"):
        return "starts with '+'"
    return None


def decode_service_name(raw: bytes) -> bytes:
    """A NUL-terminated service name that ends the payload."""
    if not raw or raw[-1] != 0:
        raise RemoteProtocolError("trigger.service_name", "not NUL-terminated")
    name = raw[:-1]
    if b"\0" in name:
        raise RemoteProtocolError("trigger.service_name", "contains a NUL byte")
    problem = service_name_problem(name)
    if problem is not None:
        raise RemoteProtocolError("trigger.service_name", problem)
    return name


def decode_padded_service_name(raw: bytes) -> bytes:
    """The v2 form: a fixed-size field, the name, its NUL and NUL padding."""
    name = _padded_text("trigger.service_name", raw)
    problem = service_name_problem(name)
    if problem is not None:
        raise RemoteProtocolError("trigger.service_name", problem)
    return name


# -- exit status -------------------------------------------------------------------


def encode_status(status: int) -> bytes:
    if not -(1 << 31) <= status < (1 << 31):
        raise LocalProtocolError("exit_code", f"{status} does not fit in a signed 32-bit field")
    return _I32.pack(status)


def decode_status(payload: bytes) -> int:
    """The reference reads the first four bytes and treats a shorter payload as 255."""
    if len(payload) < 4:
        return int(ExitStatus.CONNECTION_LOST)
    return int(_I32.unpack_from(payload)[0])

