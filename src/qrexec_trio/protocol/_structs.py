"""Byte layouts of the qrexec messages (wire-protocol.md §1 and §4).

Pure functions from values to bytes and back. Every decoder checks lengths and
padding itself and raises :class:`ProtocolError` naming the field, so callers
never index into a payload they have not validated.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final

from ._constants import (
    DOMAIN_NAME_SIZE,
    DOMAIN_NAME_SIZE_V2,
    EXEC_PARAMS_SIZE,
    HEADER_SIZE,
    IDENT_SIZE,
    MAX_QREXEC_CMD_LEN,
    MAX_SERVICE_NAME_LEN,
    MIN_PROTOCOL_VERSION,
    SERVICE_PARAMS_SIZE,
    TRIGGER_V2_SIZE,
    TRIGGER_V3_FIXED_SIZE,
    TRIGGER_V4_FIXED_SIZE,
    ExitCode,
    MsgType,
)
from ._errors import ProtocolError

# x86-64 is the only platform qrexec runs on, so "host order" is little-endian.
_HEADER: Final = struct.Struct("<II")
_U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
_EXEC_PARAMS: Final = struct.Struct("<II")
_U32_MAX: Final = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Message:
    """One framed message: the header's type and the payload bytes."""

    type: int
    payload: bytes

    @property
    def name(self) -> str:
        try:
            return MsgType(self.type).name
        except ValueError:
            return f"0x{self.type:x}"


def encode_header(msg_type: int, length: int) -> bytes:
    _check_u32("header.type", msg_type)
    _check_u32("header.len", length)
    return _HEADER.pack(msg_type, length)


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    if len(data) != HEADER_SIZE:
        raise ProtocolError("header", f"must be {HEADER_SIZE} bytes, got {len(data)}")
    msg_type, length = _HEADER.unpack(data)
    return int(msg_type), int(length)


def encode_message(msg_type: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    return b"".join((encode_header(msg_type, len(payload)), payload))


def _check_u32(field: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ProtocolError(field, f"{value} does not fit in an unsigned 32-bit field")


# -- HELLO ------------------------------------------------------------------


def encode_hello(version: int) -> bytes:
    _check_u32("hello.version", version)
    return _U32.pack(version)


def decode_hello(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError("hello", f"payload must be 4 bytes, got {len(payload)}")
    return int(_U32.unpack(payload)[0])


def negotiate_version(own: int, peer: int, minimum: int = MIN_PROTOCOL_VERSION) -> int:
    """The version both sides use: the lower of the two, and at least ``minimum``."""
    version = min(own, peer)
    if version < minimum:
        raise ProtocolError("hello.version", f"peer speaks version {peer}, need >= {minimum}")
    return version


# -- exec_params --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecParams:
    """``connect_domain``/``connect_port`` and, for exec requests, the cmdline.

    ``cmdline`` excludes the terminating NUL; ``None`` means "no cmdline" (the
    8-byte form used by replies and MSG_CONNECTION_TERMINATED).
    """

    connect_domain: int
    connect_port: int
    cmdline: bytes | None = None

    def encode(self) -> bytes:
        _check_u32("exec_params.connect_domain", self.connect_domain)
        _check_u32("exec_params.connect_port", self.connect_port)
        head = _EXEC_PARAMS.pack(self.connect_domain, self.connect_port)
        if self.cmdline is None:
            return head
        if b"\0" in self.cmdline:
            raise ProtocolError("exec_params.cmdline", "must not contain a NUL byte")
        body = head + self.cmdline + b"\0"
        if len(body) > MAX_QREXEC_CMD_LEN:
            raise ProtocolError("exec_params.cmdline", f"longer than {MAX_QREXEC_CMD_LEN} bytes")
        return body


def decode_exec_params(payload: bytes) -> ExecParams:
    """The 8-byte form: replies and MSG_CONNECTION_TERMINATED."""
    if len(payload) != EXEC_PARAMS_SIZE:
        raise ProtocolError("exec_params", f"must be {EXEC_PARAMS_SIZE} bytes, got {len(payload)}")
    domain, port = _EXEC_PARAMS.unpack(payload)
    return ExecParams(int(domain), int(port))


def decode_exec_request(payload: bytes) -> ExecParams:
    """exec_params followed by a NUL-terminated cmdline (EXEC_CMDLINE, JUST_EXEC)."""
    if len(payload) <= EXEC_PARAMS_SIZE:
        raise ProtocolError("exec_params.cmdline", "missing")
    if len(payload) > MAX_QREXEC_CMD_LEN:
        raise ProtocolError("exec_params.cmdline", f"longer than {MAX_QREXEC_CMD_LEN} bytes")
    if payload[-1] != 0:
        raise ProtocolError("exec_params.cmdline", "not NUL-terminated")
    cmdline = payload[EXEC_PARAMS_SIZE:-1]
    if b"\0" in cmdline:
        raise ProtocolError("exec_params.cmdline", "contains a NUL byte before its end")
    domain, port = _EXEC_PARAMS.unpack_from(payload)
    return ExecParams(int(domain), int(port), cmdline)


# -- service_params (request idents) -------------------------------------------

_IDENT_CHARS: Final = re.compile(rb"[0-9A-Za-z_.\- ]*")


def encode_ident(ident: bytes) -> bytes:
    """A 32-byte NUL-padded request ident."""
    if len(ident) >= IDENT_SIZE:
        raise ProtocolError("ident", f"longer than {IDENT_SIZE - 1} bytes")
    return ident.ljust(IDENT_SIZE, b"\0")


def decode_ident(raw: bytes) -> bytes:
    """Validate a 32-byte ident as the daemon does and return the text before the NUL.

    The bytes before the first NUL must be ``[0-9A-Za-z_.- ]``; a NUL must exist,
    and every byte after it must be NUL too (so two idents that compare equal
    are equal on the wire).
    """
    if len(raw) != IDENT_SIZE:
        raise ProtocolError("ident", f"must be {IDENT_SIZE} bytes, got {len(raw)}")
    nul = raw.find(b"\0")
    if nul < 0:
        raise ProtocolError("ident", "not NUL-terminated")
    if raw[nul:].count(0) != IDENT_SIZE - nul:
        raise ProtocolError("ident", "bytes after the terminating NUL are not NUL")
    text = raw[:nul]
    if _IDENT_CHARS.fullmatch(text) is None:
        raise ProtocolError("ident", "has a byte outside [0-9A-Za-z_.- ]")
    return text


@dataclass(frozen=True, slots=True)
class ServiceConnect:
    """MSG_SERVICE_CONNECT: where to connect, and which request this answers."""

    connect_domain: int
    connect_port: int
    ident: bytes  # without padding

    def encode(self) -> bytes:
        return ExecParams(self.connect_domain, self.connect_port).encode() + encode_ident(
            self.ident
        )


def decode_service_connect(payload: bytes) -> ServiceConnect:
    if len(payload) != EXEC_PARAMS_SIZE + SERVICE_PARAMS_SIZE:
        raise ProtocolError(
            "service_connect",
            f"must be {EXEC_PARAMS_SIZE + SERVICE_PARAMS_SIZE} bytes, got {len(payload)}",
        )
    params = decode_exec_params(payload[:EXEC_PARAMS_SIZE])
    ident = decode_ident(payload[EXEC_PARAMS_SIZE:])
    return ServiceConnect(params.connect_domain, params.connect_port, ident)


def decode_service_refused(payload: bytes) -> bytes:
    """MSG_SERVICE_REFUSED: the 32-byte ident of the refused request."""
    return decode_ident(payload)


# -- trigger_service_params (v2, v3, v4) ----------------------------------------

# The daemon's character sets (wire-protocol.md §7.2 step 3). Where the
# reference silently rewrites other bytes to "_", we refuse: a request that is
# not what the VM asked for must not reach the policy under another name.
_DOMAIN_CHARS: Final = re.compile(rb"[A-Za-z0-9_.\-@:]*")
_SERVICE_CHARS: Final = re.compile(rb"[A-Za-z0-9_.\-+]+")


@dataclass(frozen=True, slots=True)
class TriggerRequest:
    """A VM's request to call a service (any of the three trigger versions).

    ``request_id`` is the validated ident text; ``source`` is empty unless the
    VM relayed a call for another qube (v4 only).
    """

    version: int
    source: bytes
    target: bytes
    request_id: bytes
    service_name: bytes

    def encode(self) -> bytes:
        if self.version not in (2, 3, 4):
            raise ProtocolError("trigger.version", f"no trigger message for v{self.version}")
        _decode_service_name(self.service_name + b"\0")  # the receiver's rules, checked here
        target = _encode_domain("trigger.target", self.target, DOMAIN_NAME_SIZE)
        ident = encode_ident(self.request_id)
        name = self.service_name + b"\0"
        if len(name) > MAX_SERVICE_NAME_LEN:
            # Refuse here: no receiver would accept the message.
            limit = MAX_SERVICE_NAME_LEN - 1
            raise ProtocolError("trigger.service_name", f"longer than {limit} bytes")
        if self.version == 4:
            source = _encode_domain("trigger.source", self.source, DOMAIN_NAME_SIZE)
            return source + target + ident + name
        if self.version == 3:
            return target + ident + name
        if len(self.service_name) >= 64:
            raise ProtocolError("trigger.service_name", "longer than 63 bytes (v2)")
        return (
            self.service_name.ljust(64, b"\0")
            + _encode_domain("trigger.target", self.target, DOMAIN_NAME_SIZE_V2)
            + ident
        )

    @property
    def msg_type(self) -> MsgType:
        types = {2: MsgType.TRIGGER_SERVICE, 3: MsgType.TRIGGER_SERVICE3,
                 4: MsgType.TRIGGER_SERVICE4}
        if self.version not in types:
            raise ProtocolError("trigger.version", f"no trigger message for v{self.version}")
        return types[self.version]


def _encode_domain(field: str, name: bytes, size: int) -> bytes:
    if len(name) >= size:
        raise ProtocolError(field, f"longer than {size - 1} bytes")
    return name.ljust(size, b"\0")


def _decode_domain(field: str, raw: bytes) -> bytes:
    """A NUL-terminated domain-name field; NUL padding is required after it."""
    nul = raw.find(b"\0")
    if nul < 0:
        raise ProtocolError(field, "not NUL-terminated")
    if raw[nul:].count(0) != len(raw) - nul:
        raise ProtocolError(field, "bytes after the terminating NUL are not NUL")
    name = raw[:nul]
    if _DOMAIN_CHARS.fullmatch(name) is None:
        raise ProtocolError(field, "has a byte outside [A-Za-z0-9_.-@:]")
    return name


def _decode_service_name(raw: bytes) -> bytes:
    if not raw or raw[-1] != 0:
        raise ProtocolError("trigger.service_name", "not NUL-terminated")
    name = raw[:-1]
    if not name:
        raise ProtocolError("trigger.service_name", "empty")
    if len(raw) > MAX_SERVICE_NAME_LEN:
        limit = MAX_SERVICE_NAME_LEN - 1
        raise ProtocolError("trigger.service_name", f"longer than {limit} bytes")
    if b"\0" in name:
        raise ProtocolError("trigger.service_name", "contains a NUL byte")
    if _SERVICE_CHARS.fullmatch(name) is None:
        raise ProtocolError("trigger.service_name", "has a byte outside [A-Za-z0-9_.-+]")
    if name.startswith(b"+"):
        raise ProtocolError("trigger.service_name", "starts with '+'")
    return name


def decode_trigger(msg_type: int, payload: bytes) -> TriggerRequest:
    """Decode and validate MSG_TRIGGER_SERVICE, _SERVICE3 or _SERVICE4."""
    if msg_type == MsgType.TRIGGER_SERVICE:
        if len(payload) != TRIGGER_V2_SIZE:
            raise ProtocolError("trigger", f"v2 payload must be {TRIGGER_V2_SIZE} bytes")
        return TriggerRequest(
            version=2,
            source=b"",
            target=_decode_domain("trigger.target", payload[64:96]),
            request_id=decode_ident(payload[96:128]),
            service_name=_decode_service_name(_v2_service_field(payload[:64])),
        )
    if msg_type == MsgType.TRIGGER_SERVICE3:
        fixed = TRIGGER_V3_FIXED_SIZE
        if len(payload) <= fixed:
            raise ProtocolError("trigger.service_name", "missing")
        return TriggerRequest(
            version=3,
            source=b"",
            target=_decode_domain("trigger.target", payload[0:64]),
            request_id=decode_ident(payload[64:96]),
            service_name=_decode_service_name(payload[fixed:]),
        )
    if msg_type == MsgType.TRIGGER_SERVICE4:
        fixed = TRIGGER_V4_FIXED_SIZE
        if len(payload) <= fixed:
            raise ProtocolError("trigger.service_name", "missing")
        return TriggerRequest(
            version=4,
            source=_decode_domain("trigger.source", payload[0:64]),
            target=_decode_domain("trigger.target", payload[64:128]),
            request_id=decode_ident(payload[128:160]),
            service_name=_decode_service_name(payload[fixed:]),
        )
    raise ProtocolError("trigger", f"message type 0x{msg_type:x} is not a trigger")


def _v2_service_field(raw: bytes) -> bytes:
    # The v2 field is fixed-size: the name, its NUL and NUL padding.
    nul = raw.find(b"\0")
    if nul < 0:
        raise ProtocolError("trigger.service_name", "not NUL-terminated")
    if raw[nul:].count(0) != len(raw) - nul:
        raise ProtocolError("trigger.service_name", "bytes after the terminating NUL are not NUL")
    return raw[: nul + 1]


# -- exit code -------------------------------------------------------------------


def encode_exit_code(status: int) -> bytes:
    if not -(1 << 31) <= status < (1 << 31):
        raise ProtocolError("exit_code", f"{status} does not fit in a signed 32-bit field")
    return _I32.pack(status)


def decode_exit_code(payload: bytes) -> int:
    """The reference reads the first four bytes and treats a shorter payload as 255."""
    if len(payload) < 4:
        return int(ExitCode.CONNECTION_LOST)
    return int(_I32.unpack_from(payload)[0])
