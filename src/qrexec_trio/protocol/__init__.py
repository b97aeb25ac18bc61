"""The qrexec wire protocol, sans-IO.

Constants, message layouts, HELLO negotiation, per-direction validation and
the cmdline grammar: pure functions and small state machines on bytes. No
trio, no sockets; the fuzzers and property tests hit this layer directly.
"""

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
from ._constants import LAST_DATA_PORT as LAST_DATA_PORT
from ._constants import MAX_DATA_PORTS as MAX_DATA_PORTS
from ._constants import MAX_QREXEC_CMD_LEN as MAX_QREXEC_CMD_LEN
from ._constants import MAX_SERVICE_BASENAME_LEN as MAX_SERVICE_BASENAME_LEN
from ._constants import MIN_PROTOCOL_VERSION as MIN_PROTOCOL_VERSION
from ._constants import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._constants import VCHAN_BASE_PORT as VCHAN_BASE_PORT
from ._constants import ExitCode as ExitCode
from ._constants import MsgType as MsgType
from ._constants import max_data_chunk as max_data_chunk
from ._errors import ProtocolError as ProtocolError
from ._filter import filter_escape_chars as filter_escape_chars
from ._framing import Direction as Direction
from ._framing import MessageReader as MessageReader
from ._framing import check_header as check_header
from ._framing import payload_bounds as payload_bounds
from ._names import MAX_QUBE_NAME_LEN as MAX_QUBE_NAME_LEN
from ._names import is_qube_name as is_qube_name
from ._structs import ExecParams as ExecParams
from ._structs import Message as Message
from ._structs import ServiceConnect as ServiceConnect
from ._structs import TriggerRequest as TriggerRequest
from ._structs import decode_exec_params as decode_exec_params
from ._structs import decode_exec_request as decode_exec_request
from ._structs import decode_exit_code as decode_exit_code
from ._structs import decode_header as decode_header
from ._structs import decode_hello as decode_hello
from ._structs import decode_ident as decode_ident
from ._structs import decode_service_connect as decode_service_connect
from ._structs import decode_service_refused as decode_service_refused
from ._structs import decode_trigger as decode_trigger
from ._structs import encode_exit_code as encode_exit_code
from ._structs import encode_header as encode_header
from ._structs import encode_hello as encode_hello
from ._structs import encode_ident as encode_ident
from ._structs import encode_message as encode_message
from ._structs import negotiate_version as negotiate_version
