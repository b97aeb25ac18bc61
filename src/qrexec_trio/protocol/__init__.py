"""The qrexec wire protocol, sans-IO.

Constants, typed events, HELLO negotiation, per-direction validation and the
cmdline grammar: pure functions and small state machines on bytes. No trio,
no sockets; the fuzzers and property tests hit this layer directly, and both
I/O drivers (trio for the long-lived programs, a blocking one for the
clients) use it the same way: feed bytes into a :class:`MessageReader`, take
events out; build events and send their :meth:`encode`.
"""

from ._bounds import payload_bounds as payload_bounds
from ._caller import CLOSE_OUTPUT as CLOSE_OUTPUT
from ._caller import FINISHED as FINISHED
from ._caller import NO_STATUS as NO_STATUS
from ._caller import WRITE_ERRORS as WRITE_ERRORS
from ._caller import WRITE_OUTPUT as WRITE_OUTPUT
from ._caller import CallerSession as CallerSession
from ._caller import caller_exit_code as caller_exit_code
from ._cmdline import Cmdline as Cmdline
from ._cmdline import RpcCall as RpcCall
from ._cmdline import ShellCommand as ShellCommand
from ._cmdline import build_rpc_cmdline as build_rpc_cmdline
from ._cmdline import parse_cmdline as parse_cmdline
from ._cmdline import substitute_default_user as substitute_default_user
from ._constants import CLIENT_PROTOCOL_VERSION as CLIENT_PROTOCOL_VERSION
from ._constants import CONTROL_RING_SIZE as CONTROL_RING_SIZE
from ._constants import DATA_RING_SIZE as DATA_RING_SIZE
from ._constants import FIRST_DATA_PORT as FIRST_DATA_PORT
from ._constants import HEADER_SIZE as HEADER_SIZE
from ._constants import IDENT_SIZE as IDENT_SIZE
from ._constants import LAST_DATA_PORT as LAST_DATA_PORT
from ._constants import MAX_DATA_PORTS as MAX_DATA_PORTS
from ._constants import MAX_QREXEC_CMD_LEN as MAX_QREXEC_CMD_LEN
from ._constants import MAX_SERVICE_BASENAME_LEN as MAX_SERVICE_BASENAME_LEN
from ._constants import MIN_PROTOCOL_VERSION as MIN_PROTOCOL_VERSION
from ._constants import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._constants import VCHAN_BASE_PORT as VCHAN_BASE_PORT
from ._constants import ExitStatus as ExitStatus
from ._constants import MsgType as MsgType
from ._constants import max_data_chunk as max_data_chunk
from ._direction import Direction as Direction
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import UndecodableMessage as UndecodableMessage
from ._events import ConnectionTerminated as ConnectionTerminated
from ._events import Data as Data
from ._events import Event as Event
from ._events import ExecCmdline as ExecCmdline
from ._events import ExecRequest as ExecRequest
from ._events import ExitCode as ExitCode
from ._events import Hello as Hello
from ._events import JustExec as JustExec
from ._events import PortAssigned as PortAssigned
from ._events import ServiceConnect as ServiceConnect
from ._events import ServiceRefused as ServiceRefused
from ._events import Stream as Stream
from ._events import TriggerAnswer as TriggerAnswer
from ._events import TriggerService as TriggerService
from ._events import decode_event as decode_event
from ._filter import filter_escape_chars as filter_escape_chars
from ._framing import MessageReader as MessageReader
from ._framing import check_header as check_header
from ._names import MAX_QUBE_NAME_LEN as MAX_QUBE_NAME_LEN
from ._names import is_qube_name as is_qube_name
from ._structs import Message as Message
from ._structs import decode_header as decode_header
from ._structs import encode_frame as encode_frame
from ._structs import encode_header as encode_header
from ._structs import negotiate_version as negotiate_version
