"""Service lookup and launch plans, shared by the agent and the multiplexer."""

from ._lookup import DEFAULT_SERVICE_PATH as DEFAULT_SERVICE_PATH
from ._lookup import FoundService as FoundService
from ._lookup import LaunchError as LaunchError
from ._lookup import ServiceKind as ServiceKind
from ._lookup import find_service as find_service
from ._lookup import service_path as service_path
from ._lookup import tcp_address as tcp_address
from ._plan import CALL_ID_ENV as CALL_ID_ENV
from ._plan import Identity as Identity
from ._plan import Plan as Plan
from ._plan import ProgramPlan as ProgramPlan
from ._plan import Runner as Runner
from ._plan import SocketPlan as SocketPlan
from ._plan import TcpPlan as TcpPlan
from ._plan import with_call_id as with_call_id
from ._rpc_config import RpcConfigError as RpcConfigError
from ._rpc_config import load_service_config as load_service_config
from ._rpc_config import rpc_config_path as rpc_config_path
from ._rpc_config import socket_option_conflict as socket_option_conflict
from ._service_config import DEFAULT_CONFIG as DEFAULT_CONFIG
from ._service_config import ServiceConfig as ServiceConfig
