"""Constants and message types of the qrexec wire protocol (versions 2 to 4)."""

from __future__ import annotations

from .._light import IntEnum


class MsgType(IntEnum):
    """Message types; the values are the u32 ``type`` field of the header."""

    DATA_STDIN = 0x190
    DATA_STDOUT = 0x191
    DATA_STDERR = 0x192
    DATA_EXIT_CODE = 0x193
    EXEC_CMDLINE = 0x200
    JUST_EXEC = 0x201
    SERVICE_CONNECT = 0x202
    SERVICE_REFUSED = 0x203
    TRIGGER_SERVICE = 0x210
    CONNECTION_TERMINATED = 0x211
    TRIGGER_SERVICE3 = 0x212
    TRIGGER_SERVICE4 = 0x213
    HELLO = 0x300


#: Version spoken on the control and data vchans.
PROTOCOL_VERSION = 4
#: Version spoken between qrexec-client and qrexec-daemon on the unix socket.
CLIENT_PROTOCOL_VERSION = 3
#: The oldest version any vchan peer may negotiate (v1 had no HELLO at all).
MIN_PROTOCOL_VERSION = 2

#: The control vchan port; data ports are the MAX_DATA_PORTS ports after it.
VCHAN_BASE_PORT = 512
FIRST_DATA_PORT = VCHAN_BASE_PORT + 1
#: The reference has 256 (513..768), shared by dom0's and VM peers' calls, and
#: a VM pair gets half of them per direction (the parity split). 1024 lets 256
#: calls of one VM (to dom0, or to one peer VM) run with room to spare. The
#: first port (513) and the parity rule are unchanged.
MAX_DATA_PORTS = 1024
LAST_DATA_PORT = FIRST_DATA_PORT + MAX_DATA_PORTS - 1

MAX_DATA_CHUNK_V2 = 4096
MAX_DATA_CHUNK_V3 = 65536

#: Largest service descriptor / trigger service name, NUL included.
MAX_SERVICE_NAME_LEN = 65000
#: Largest EXEC_CMDLINE / JUST_EXEC / SERVICE_CONNECT payload from a client.
MAX_QREXEC_CMD_LEN = 65535
#: Linux NAME_MAX: the longest service name (the part before ``+``).
MAX_SERVICE_BASENAME_LEN = 255

HEADER_SIZE = 8
EXEC_PARAMS_SIZE = 8
SERVICE_PARAMS_SIZE = 32
IDENT_SIZE = 32
TRIGGER_V2_SIZE = 128
TRIGGER_V3_FIXED_SIZE = 96
TRIGGER_V4_FIXED_SIZE = 160
DOMAIN_NAME_SIZE_V2 = 32
DOMAIN_NAME_SIZE = 64

#: Ring sizes the reference asks for.
CONTROL_RING_SIZE = 4096
DATA_RING_SIZE = 65536


class ExitStatus(IntEnum):
    """Exit statuses with a meaning fixed by qrexec."""

    OK = 0
    PROBLEM = 125
    REFUSED = 126
    SERVICE_NOT_FOUND = 127
    #: ``qrexec-client -c`` to a VM failed.
    CLIENT_CONNECT_FAILED = 137
    #: The data vchan went away before an exit code arrived.
    CONNECTION_LOST = 255


def max_data_chunk(version: int) -> int:
    """Largest data payload for a negotiated data-vchan version."""
    return MAX_DATA_CHUNK_V2 if version < 3 else MAX_DATA_CHUNK_V3
