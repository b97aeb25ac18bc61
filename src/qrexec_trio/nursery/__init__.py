"""Structured-concurrency building blocks: framed links, the data pump, child processes."""

from ._errors import one_error as one_error
from ._glue import glue as glue
from ._link import FramedLink as FramedLink
from ._process import GroupLedger as GroupLedger
from ._process import child_process as child_process
from ._process import exit_status as exit_status
from ._process import terminate_group as terminate_group
from ._pump import CallerEnd as CallerEnd
from ._pump import PeerGone as PeerGone
from ._pump import ServiceEnd as ServiceEnd
from ._pump import call_data as call_data
from ._pump import caller_exit_code as caller_exit_code
from ._pump import send_spawn_failure as send_spawn_failure
from ._pump import serve_data as serve_data
from ._service_end import open_service as open_service
from ._service_end import spawn_detached as spawn_detached
from ._streams import EofWatch as EofWatch
