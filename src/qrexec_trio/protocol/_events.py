"""Typed protocol events: every qrexec message as a small immutable class.

Like h11's events, each class is one thing a peer can say; :func:`decode_event`
turns a validated frame into one (per direction: the same message type means
different things on different links) and :meth:`encode` turns one back into
the bytes on the wire. Roles dispatch on these classes with ``match`` and
never see byte offsets; one grep for a class name finds every place that
message is handled.

Decoding raises :class:`UndecodableMessage` (the peer's fault; the stream is
still in step); encoding raises :class:`LocalProtocolError` (ours).
"""

from __future__ import annotations

from .._light import IntEnum, frozen_record
from ._bounds import payload_bounds
from ._constants import (
    DOMAIN_NAME_SIZE,
    DOMAIN_NAME_SIZE_V2,
    EXEC_PARAMS_SIZE,
    IDENT_SIZE,
    MAX_QREXEC_CMD_LEN,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    TRIGGER_V3_FIXED_SIZE,
    TRIGGER_V4_FIXED_SIZE,
    MsgType,
)
from ._direction import Direction
from ._errors import LocalProtocolError, RemoteProtocolError, UndecodableMessage
from ._structs import (
    PORT_PAIR,
    U32,
    check_ident_text,
    check_u32,
    decode_domain,
    decode_ident,
    decode_padded_service_name,
    decode_service_name,
    decode_status,
    encode_domain,
    encode_frame,
    encode_ident,
    encode_status,
    service_name_problem,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from struct import error as StructError
    from typing import ClassVar, Final, TypeAlias
else:
    # What struct re-exports (typeshed knows it there only): one module fewer on the
    # clients' start-up.
    from _struct import error as StructError


class Stream(IntEnum):
    """The three byte streams of a call, by the message type that carries them."""

    STDIN = MsgType.DATA_STDIN
    STDOUT = MsgType.DATA_STDOUT
    STDERR = MsgType.DATA_STDERR


def _ports(connect_domain: int, connect_port: int) -> bytes:
    check_u32("exec_params.connect_domain", connect_domain)
    check_u32("exec_params.connect_port", connect_port)
    return PORT_PAIR.pack(connect_domain, connect_port)


def _cmdline(cmdline: bytes) -> bytes:
    if b"\0" in cmdline:
        raise LocalProtocolError("exec_params.cmdline", "must not contain a NUL byte")
    if EXEC_PARAMS_SIZE + len(cmdline) + 1 > MAX_QREXEC_CMD_LEN:
        raise LocalProtocolError("exec_params.cmdline", f"longer than {MAX_QREXEC_CMD_LEN} bytes")
    return cmdline + b"\0"


@frozen_record
class Hello:
    """MSG_HELLO: the highest protocol version the sender speaks."""

    version: int
    msg_type: ClassVar[MsgType] = MsgType.HELLO

    def encode(self) -> bytes:
        check_u32("hello.version", self.version)
        return encode_frame(self.msg_type, U32.pack(self.version))


@frozen_record
class ExecCmdline:
    """MSG_EXEC_CMDLINE: run ``cmdline`` and serve its data vchan at (domain, port).

    Also what a client sends its daemon, with ports the daemon fills in.
    """

    connect_domain: int
    connect_port: int
    cmdline: bytes  # without the terminating NUL
    msg_type: ClassVar[MsgType] = MsgType.EXEC_CMDLINE

    def encode(self) -> bytes:
        payload = _ports(self.connect_domain, self.connect_port) + _cmdline(self.cmdline)
        return encode_frame(self.msg_type, payload)


@frozen_record
class JustExec:
    """MSG_JUST_EXEC: start ``cmdline`` detached; only its start is reported."""

    connect_domain: int
    connect_port: int
    cmdline: bytes
    msg_type: ClassVar[MsgType] = MsgType.JUST_EXEC

    def encode(self) -> bytes:
        payload = _ports(self.connect_domain, self.connect_port) + _cmdline(self.cmdline)
        return encode_frame(self.msg_type, payload)


#: A request to run something, in either form.
ExecRequest: TypeAlias = ExecCmdline | JustExec


@frozen_record
class PortAssigned:
    """The daemon's reply to a client's request: the data vchan to use.

    It travels as the request's own message type with an 8-byte payload.
    """

    request_type: MsgType
    connect_domain: int
    connect_port: int

    @property
    def msg_type(self) -> MsgType:
        return self.request_type

    def encode(self) -> bytes:
        if self.request_type not in _REQUEST_TYPES:
            raise LocalProtocolError("reply.type", f"{self.request_type.name} is not a request")
        return encode_frame(self.msg_type, _ports(self.connect_domain, self.connect_port))


_REQUEST_TYPES: Final = (MsgType.EXEC_CMDLINE, MsgType.JUST_EXEC, MsgType.SERVICE_CONNECT)


@frozen_record
class ServiceConnect:
    """MSG_SERVICE_CONNECT: request ``request_id`` is allowed; serve (domain, port).

    ``raw_request_id`` is set only on an event read from a client, when the
    bytes after exec_params are not the 32-byte NUL-padded form: the reference
    daemon reads them as a C string, so a client may send the short form
    (``b"SOCKET13\\0"``) or put anything after the NUL. It keeps those bytes so
    that the event encodes back to exactly what was read; ``request_id`` is
    what they mean. What goes to an agent never has one (the agent takes only
    the 32-byte form): build a new event from ``request_id``.
    """

    connect_domain: int
    connect_port: int
    request_id: bytes  # without padding
    raw_request_id: bytes | None = None
    msg_type: ClassVar[MsgType] = MsgType.SERVICE_CONNECT

    def encode(self) -> bytes:
        ports = _ports(self.connect_domain, self.connect_port)
        ident = encode_ident(self.request_id)
        raw = self.raw_request_id
        if raw is None:
            return encode_frame(self.msg_type, ports + ident)
        if not raw.endswith(b"\0") or raw[:raw.index(b"\0")] != self.request_id:
            raise LocalProtocolError("request_id", "raw form must be the id, a NUL, "
                                     "and anything ending in a NUL")
        if EXEC_PARAMS_SIZE + len(raw) > MAX_QREXEC_CMD_LEN:
            raise LocalProtocolError("request_id", f"raw form longer than "
                                     f"{MAX_QREXEC_CMD_LEN - EXEC_PARAMS_SIZE} bytes")
        return encode_frame(self.msg_type, ports + raw)


@frozen_record
class ServiceRefused:
    """MSG_SERVICE_REFUSED: request ``request_id`` is refused.

    ``raw_request_id`` refuses by a request-id field exactly as a VM sent it
    (one that did not even decode): then ``request_id`` is not used.
    """

    request_id: bytes
    raw_request_id: bytes | None = None
    msg_type: ClassVar[MsgType] = MsgType.SERVICE_REFUSED

    def encode(self) -> bytes:
        if self.raw_request_id is not None:
            if len(self.raw_request_id) != IDENT_SIZE:
                raise LocalProtocolError("request_id", f"raw form must be {IDENT_SIZE} bytes")
            return encode_frame(self.msg_type, self.raw_request_id)
        return encode_frame(self.msg_type, encode_ident(self.request_id))


_TRIGGER_TYPES: Final = {2: MsgType.TRIGGER_SERVICE, 3: MsgType.TRIGGER_SERVICE3,
                         4: MsgType.TRIGGER_SERVICE4}


@frozen_record
class TriggerService:
    """A VM's request to call a service (MSG_TRIGGER_SERVICE, _SERVICE3 or _SERVICE4).

    ``request_id`` is the validated id text; ``source`` is empty unless the VM
    relayed a call for another qube (v4 only).
    """

    version: int
    source: bytes
    target: bytes
    request_id: bytes
    service_name: bytes

    @property
    def msg_type(self) -> MsgType:
        try:
            return _TRIGGER_TYPES[self.version]
        except KeyError:
            raise LocalProtocolError(
                "trigger.version", f"no trigger message for v{self.version}") from None

    def encode(self) -> bytes:
        msg_type = self.msg_type
        # The receiver's rules, checked here: no receiver would take the message.
        problem = service_name_problem(self.service_name)
        if problem is not None:
            raise LocalProtocolError("trigger.service_name", problem)
        ident = encode_ident(self.request_id)
        if self.source and self.version != 4:
            raise LocalProtocolError("trigger.source", f"v{self.version} cannot carry a source")
        if self.version == 2:
            if len(self.service_name) >= 64:
                raise LocalProtocolError("trigger.service_name", "longer than 63 bytes (v2)")
            payload = (self.service_name.ljust(64, b"\0")
                       + encode_domain("trigger.target", self.target, DOMAIN_NAME_SIZE_V2)
                       + ident)
        else:
            payload = encode_domain("trigger.target", self.target, DOMAIN_NAME_SIZE) + ident
            if self.version == 4:
                payload = encode_domain("trigger.source", self.source, DOMAIN_NAME_SIZE) + payload
            payload += self.service_name + b"\0"
        return encode_frame(msg_type, payload)


@frozen_record
class ConnectionTerminated:
    """MSG_CONNECTION_TERMINATED: the data vchan (domain, port) is done with."""

    connect_domain: int
    connect_port: int
    msg_type: ClassVar[MsgType] = MsgType.CONNECTION_TERMINATED

    def encode(self) -> bytes:
        return encode_frame(self.msg_type, _ports(self.connect_domain, self.connect_port))


@frozen_record
class Data:
    """MSG_DATA_STDIN/STDOUT/STDERR: bytes of one stream; empty means its EOF."""

    stream: Stream
    data: bytes

    @property
    def msg_type(self) -> MsgType:
        return MsgType(self.stream)

    def encode(self) -> bytes:
        return encode_frame(self.stream, self.data)


@frozen_record
class ExitCode:
    """MSG_DATA_EXIT_CODE: how the remote end of a call finished."""

    status: int
    msg_type: ClassVar[MsgType] = MsgType.DATA_EXIT_CODE

    def encode(self) -> bytes:
        return encode_frame(self.msg_type, encode_status(self.status))


@frozen_record
class TriggerAnswer:
    """The agent's answer on today's trigger socket: where to serve the data vchan.

    Unlike everything else it is not framed: the bare 8-byte exec_params.
    """

    connect_domain: int
    connect_port: int
    SIZE: ClassVar[int] = EXEC_PARAMS_SIZE

    def encode(self) -> bytes:
        return _ports(self.connect_domain, self.connect_port)

    @classmethod
    def decode(cls, raw: bytes) -> TriggerAnswer:
        if len(raw) != EXEC_PARAMS_SIZE:
            raise RemoteProtocolError(
                "trigger_answer", f"must be {EXEC_PARAMS_SIZE} bytes, got {len(raw)}")
        return cls(*_decode_ports(raw))


Event: TypeAlias = (Hello | ExecCmdline | JustExec | PortAssigned | ServiceConnect
                    | ServiceRefused | TriggerService | ConnectionTerminated | Data | ExitCode)


# -- decoding ------------------------------------------------------------------------


def _decode_hello(msg_type: MsgType, payload: bytes) -> Hello:
    return Hello(int(U32.unpack(payload)[0]))


def _decode_ports(payload: bytes) -> tuple[int, int]:
    domain, port = PORT_PAIR.unpack_from(payload)
    return int(domain), int(port)


def _decode_exec(msg_type: MsgType, payload: bytes) -> ExecRequest:
    if len(payload) <= EXEC_PARAMS_SIZE:
        raise RemoteProtocolError("exec_params.cmdline", "missing")
    if payload[-1] != 0:
        raise RemoteProtocolError("exec_params.cmdline", "not NUL-terminated")
    cmdline = payload[EXEC_PARAMS_SIZE:-1]
    # The reference daemon passes such a cmdline on unchanged and its agent
    # runs the C string up to the first NUL, silently dropping the rest. We
    # refuse it, from a client as from a daemon: no reference program builds
    # one (a cmdline comes from argv), and a request that means less than
    # the bytes it carries (logged, listed, checked in one form, run in
    # another) is a confusion we do not need.
    if b"\0" in cmdline:
        raise RemoteProtocolError("exec_params.cmdline", "contains a NUL byte before its end")
    domain, port = _decode_ports(payload)
    if msg_type == MsgType.JUST_EXEC:
        return JustExec(domain, port, cmdline)
    return ExecCmdline(domain, port, cmdline)


def _decode_port_reply(msg_type: MsgType, payload: bytes) -> PortAssigned:
    return PortAssigned(msg_type, *_decode_ports(payload))


def _decode_service_connect(msg_type: MsgType, payload: bytes) -> ServiceConnect:
    domain, port = _decode_ports(payload)
    return ServiceConnect(domain, port, decode_ident(payload[EXEC_PARAMS_SIZE:]))


def _decode_client_connect(msg_type: MsgType, payload: bytes) -> ServiceConnect:
    """A client's SERVICE_CONNECT, taken as the reference daemon takes it.

    Its only rules are those of every client request (8 < len <= 65535, the
    reader's bounds, and a NUL last); it then matches the bytes after
    exec_params against its pending ids with ``strncmp``: the text up to the
    first NUL is the id, whether 32 bytes of padding follow it or one NUL
    (the short form) or anything at all.
    """
    # "service_params" for the framing of the id, "request_id" for the id
    # itself: the daemon logs the second kind as a request that is not pending.
    if len(payload) <= EXEC_PARAMS_SIZE:
        raise RemoteProtocolError("service_params", "missing")
    if payload[-1] != 0:
        raise RemoteProtocolError("service_params", "not NUL-terminated")
    raw = payload[EXEC_PARAMS_SIZE:]
    # An id the daemon would not have taken from its agent can never be
    # pending: refused here (the daemon logs it as not pending), so that
    # every request_id handed out is one an agent would accept.
    text = check_ident_text(raw[:raw.index(b"\0")])
    domain, port = _decode_ports(payload)
    canonical = raw == text.ljust(IDENT_SIZE, b"\0")
    return ServiceConnect(domain, port, text, None if canonical else raw)


def _decode_service_refused(msg_type: MsgType, payload: bytes) -> ServiceRefused:
    return ServiceRefused(decode_ident(payload))


def _decode_terminated(msg_type: MsgType, payload: bytes) -> ConnectionTerminated:
    return ConnectionTerminated(*_decode_ports(payload))


def _decode_data(msg_type: MsgType, payload: bytes) -> Data:
    return Data(Stream(msg_type), payload)


def _decode_exit_code(msg_type: MsgType, payload: bytes) -> ExitCode:
    return ExitCode(decode_status(payload))


#: Where each trigger version keeps its request id.
_TRIGGER_ID_FIELD: Final = {MsgType.TRIGGER_SERVICE: slice(96, 128),
                            MsgType.TRIGGER_SERVICE3: slice(64, 96),
                            MsgType.TRIGGER_SERVICE4: slice(128, 160)}


def _decode_trigger(msg_type: MsgType, payload: bytes) -> TriggerService:
    request_id = decode_ident(payload[_TRIGGER_ID_FIELD[msg_type]])
    return _trigger_fields(msg_type, payload, request_id)


def _decode_client_trigger(msg_type: MsgType, payload: bytes) -> TriggerService:
    # The agent gives every request its own id: whatever the client put in
    # that field (the reference's client writes "SOCKET") is never used.
    return _trigger_fields(msg_type, payload, b"")


def _trigger_fields(msg_type: MsgType, payload: bytes, request_id: bytes) -> TriggerService:
    if msg_type == MsgType.TRIGGER_SERVICE:
        return TriggerService(2, b"", decode_domain("trigger.target", payload[64:96]),
                              request_id, decode_padded_service_name(payload[:64]))
    if msg_type == MsgType.TRIGGER_SERVICE3:
        return TriggerService(3, b"", decode_domain("trigger.target", payload[0:64]),
                              request_id, decode_service_name(payload[TRIGGER_V3_FIXED_SIZE:]))
    return TriggerService(4, decode_domain("trigger.source", payload[0:64]),
                          decode_domain("trigger.target", payload[64:128]),
                          request_id, decode_service_name(payload[TRIGGER_V4_FIXED_SIZE:]))


if TYPE_CHECKING:
    _Decoder: TypeAlias = Callable[[MsgType, bytes], Event]

_TRIGGERS: Final[dict[MsgType, _Decoder]] = {
    MsgType.TRIGGER_SERVICE: _decode_trigger,
    MsgType.TRIGGER_SERVICE3: _decode_trigger,
    MsgType.TRIGGER_SERVICE4: _decode_trigger,
}

#: What each message type means on each link. The framing layer has already
#: checked that the type may travel this way and that its length is in bounds.
_DECODERS: Final[dict[Direction, dict[MsgType, _Decoder]]] = {
    Direction.DAEMON_TO_AGENT: {
        MsgType.EXEC_CMDLINE: _decode_exec,
        MsgType.JUST_EXEC: _decode_exec,
        MsgType.SERVICE_CONNECT: _decode_service_connect,
        MsgType.SERVICE_REFUSED: _decode_service_refused,
    },
    Direction.AGENT_TO_DAEMON: {
        MsgType.CONNECTION_TERMINATED: _decode_terminated,
        **_TRIGGERS,
    },
    Direction.CLIENT_TO_DAEMON: {
        MsgType.EXEC_CMDLINE: _decode_exec,
        MsgType.JUST_EXEC: _decode_exec,
        MsgType.SERVICE_CONNECT: _decode_client_connect,
    },
    Direction.DAEMON_TO_CLIENT: dict.fromkeys(_REQUEST_TYPES, _decode_port_reply),
    Direction.CALLER_TO_SERVICE: {MsgType.DATA_STDIN: _decode_data},
    Direction.SERVICE_TO_CALLER: {
        MsgType.DATA_STDOUT: _decode_data,
        MsgType.DATA_STDERR: _decode_data,
        MsgType.DATA_EXIT_CODE: _decode_exit_code,
    },
    Direction.CLIENT_VM_TO_AGENT: {MsgType.TRIGGER_SERVICE4: _decode_client_trigger},
    Direction.AGENT_TO_CLIENT_VM: {
        MsgType.DATA_STDERR: _decode_data,
        MsgType.DATA_EXIT_CODE: _decode_exit_code,
        MsgType.SERVICE_REFUSED: _decode_service_refused,
    },
}


def decode_event(direction: Direction, msg_type: int, payload: bytes) -> Event:
    """The event a frame carries on ``direction``.

    Raises :class:`UndecodableMessage` for a payload that breaks a rule (the
    frame itself was fine, so the stream stays in step), naming the field.
    """
    try:
        kind = MsgType(msg_type)
        if kind == MsgType.HELLO and not direction.has_hello:
            raise KeyError(kind)
        decoder = _HELLO_DECODER if kind == MsgType.HELLO else _DECODERS[direction][kind]
    except (ValueError, KeyError):
        raise UndecodableMessage("header.type", f"0x{msg_type:x} may not be sent "
                                 f"{direction.value}", msg_type=msg_type) from None
    try:
        event = decoder(kind, payload)
    except RemoteProtocolError as exc:
        raise UndecodableMessage(exc.field, exc.rule, msg_type=msg_type,
                                 raw_request_id=_raw_request_id(kind, payload)) from None
    except StructError as exc:  # a payload shorter than its layout: the peer's bytes
        raise UndecodableMessage("payload", f"cannot be decoded ({exc})",
                                 msg_type=msg_type) from None
    # The reader checked the length already; called alone (a fuzzer, a test),
    # we check it here too, so that every event we hand out encodes back.
    if not _length_allowed(direction, kind, len(payload)):
        raise UndecodableMessage("header.len", f"{kind.name} may not carry {len(payload)} "
                                 f"bytes {direction.value}", msg_type=msg_type)
    return event


_HELLO_DECODER: Final[_Decoder] = _decode_hello
_HELLO_SIZE: Final = 4


def _length_allowed(direction: Direction, kind: MsgType, length: int) -> bool:
    if kind == MsgType.HELLO:
        return length == _HELLO_SIZE
    for version in range(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1):
        bounds = payload_bounds(direction, kind, version)
        if bounds is not None and bounds[0] <= length <= bounds[1]:
            return True
    return False


def _raw_request_id(kind: MsgType, payload: bytes) -> bytes | None:
    field = _TRIGGER_ID_FIELD.get(kind)
    if field is None:
        return None
    return payload[field].ljust(IDENT_SIZE, b"\0")
