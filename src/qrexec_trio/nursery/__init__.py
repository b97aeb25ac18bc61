"""Structured-concurrency building blocks: the Connection and its registry, framed
links, the data pump, the glue, child processes."""

from ..protocol import caller_exit_code as caller_exit_code  # the pump's rule, sans-IO
from ._connection import Connection as Connection
from ._connection import ConnectionInfo as ConnectionInfo
from ._connection import ConnectionRegistry as ConnectionRegistry
from ._connection import Meter as Meter
from ._connection import State as State
from ._connection import call_id as call_id
from ._control import CONNECTIONS as CONNECTIONS
from ._control import KILL as KILL
from ._control import PORTS as PORTS
from ._control import UNKNOWN_CONNECTION as UNKNOWN_CONNECTION
from ._control import control_socket_path as control_socket_path
from ._control import gather_connections as gather_connections
from ._control import gathering_methods as gathering_methods
from ._control import kill_everywhere as kill_everywhere
from ._control import parse_connections as parse_connections
from ._control import ports_method as ports_method
from ._control import registry_methods as registry_methods
from ._errors import CALL_FAILURES as CALL_FAILURES
from ._errors import one_error as one_error
from ._glue import glue as glue
from ._link import FramedLink as FramedLink
from ._link import open_caller_link as open_caller_link
from ._process import GroupLedger as GroupLedger
from ._process import child_process as child_process
from ._process import exit_status as exit_status
from ._process import terminate_group as terminate_group
from ._pump import CallerEnd as CallerEnd
from ._pump import PeerGone as PeerGone
from ._pump import ServiceEnd as ServiceEnd
from ._pump import call_data as call_data
from ._pump import send_spawn_failure as send_spawn_failure
from ._pump import serve_data as serve_data
from ._service_end import connect_service as connect_service
from ._service_end import just_exec_service as just_exec_service
from ._service_end import open_service as open_service
from ._service_end import spawn_detached as spawn_detached
from ._streams import EofWatch as EofWatch
