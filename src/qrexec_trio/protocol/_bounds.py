"""Who may send which message on which link, and how long its payload may be.

One table for the framing layer (which checks each header before buffering
the payload) and for :func:`~._events.decode_event` (which refuses a payload
it could not encode back, when it is called without a reader).
"""

from __future__ import annotations

from ._constants import (
    EXEC_PARAMS_SIZE,
    MAX_QREXEC_CMD_LEN,
    MAX_SERVICE_NAME_LEN,
    SERVICE_PARAMS_SIZE,
    TRIGGER_V2_SIZE,
    TRIGGER_V3_FIXED_SIZE,
    TRIGGER_V4_FIXED_SIZE,
    MsgType,
    max_data_chunk,
)
from ._direction import Direction

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

_EXEC_REQUEST: Final = (EXEC_PARAMS_SIZE + 1, MAX_QREXEC_CMD_LEN)
# What the daemon sends the agent: exec_params and the 32-byte NUL-padded id.
_SERVICE_CONNECT: Final = (EXEC_PARAMS_SIZE + SERVICE_PARAMS_SIZE,) * 2
# What a client may send the daemon. The reference daemon has one length rule
# for all three requests (8 < len <= MAX_QREXEC_CMD_LEN, the last byte a NUL),
# and reads a SERVICE_CONNECT's id as a C string: "SOCKET13\0" (17 bytes in
# all) is as good as the 40-byte padded form. See _events._decode_client_connect.
_CLIENT_REQUEST: Final = _EXEC_REQUEST
_PORT_REPLY: Final = (EXEC_PARAMS_SIZE, EXEC_PARAMS_SIZE)
_TRIGGER4: Final = (TRIGGER_V4_FIXED_SIZE + 1, TRIGGER_V4_FIXED_SIZE + MAX_SERVICE_NAME_LEN)

# Bounds that do not depend on the negotiated version.
_FIXED_BOUNDS: Final[dict[Direction, dict[int, tuple[int, int]]]] = {
    Direction.DAEMON_TO_AGENT: {
        MsgType.EXEC_CMDLINE: _EXEC_REQUEST,
        MsgType.JUST_EXEC: _EXEC_REQUEST,
        MsgType.SERVICE_CONNECT: _SERVICE_CONNECT,
        MsgType.SERVICE_REFUSED: (SERVICE_PARAMS_SIZE, SERVICE_PARAMS_SIZE),
    },
    Direction.CLIENT_TO_DAEMON: {
        MsgType.EXEC_CMDLINE: _CLIENT_REQUEST,
        MsgType.JUST_EXEC: _CLIENT_REQUEST,
        MsgType.SERVICE_CONNECT: _CLIENT_REQUEST,
    },
    Direction.DAEMON_TO_CLIENT: {
        MsgType.EXEC_CMDLINE: _PORT_REPLY,
        MsgType.JUST_EXEC: _PORT_REPLY,
        MsgType.SERVICE_CONNECT: _PORT_REPLY,
    },
    Direction.CLIENT_VM_TO_AGENT: {MsgType.TRIGGER_SERVICE4: _TRIGGER4},
    # Remote stderr in non-empty chunks, then the exit status or the refusal.
    Direction.AGENT_TO_CLIENT_VM: {
        MsgType.DATA_STDERR: (1, max_data_chunk(4)),
        MsgType.DATA_EXIT_CODE: (4, 4),
        MsgType.SERVICE_REFUSED: (SERVICE_PARAMS_SIZE, SERVICE_PARAMS_SIZE),
    },
}

# The trigger message a VM may send, by the lowest control version that allows it.
_TRIGGER_BOUNDS: Final[dict[int, tuple[range, tuple[int, int]]]] = {
    MsgType.TRIGGER_SERVICE: (range(0, 3), (TRIGGER_V2_SIZE, TRIGGER_V2_SIZE)),
    MsgType.TRIGGER_SERVICE3: (
        range(3, 1 << 32),
        (TRIGGER_V3_FIXED_SIZE + 1, TRIGGER_V3_FIXED_SIZE + MAX_SERVICE_NAME_LEN),
    ),
    MsgType.TRIGGER_SERVICE4: (range(4, 1 << 32), _TRIGGER4),
}

_DATA_TYPES: Final[dict[Direction, frozenset[int]]] = {
    Direction.CALLER_TO_SERVICE: frozenset({MsgType.DATA_STDIN}),
    Direction.SERVICE_TO_CALLER: frozenset(
        {MsgType.DATA_STDOUT, MsgType.DATA_STDERR, MsgType.DATA_EXIT_CODE}
    ),
}


def payload_bounds(direction: Direction, msg_type: int, version: int) -> tuple[int, int] | None:
    """The (min, max) payload length of ``msg_type`` sent in ``direction``.

    ``None`` means the sender may not send that type at all (at this version).
    ``version`` is the negotiated version of the link; it selects the data
    chunk limit and which trigger message a VM may send.
    """
    if direction in _FIXED_BOUNDS:
        return _FIXED_BOUNDS[direction].get(msg_type)
    if direction is Direction.AGENT_TO_DAEMON:
        if msg_type == MsgType.CONNECTION_TERMINATED:
            return _PORT_REPLY
        versions, bounds = _TRIGGER_BOUNDS.get(msg_type, (range(0), (0, 0)))
        return bounds if version in versions else None
    if msg_type in _DATA_TYPES[direction]:
        return (0, max_data_chunk(version))
    return None
