"""The in-process call API: :func:`call` (trio) and :func:`call_blocking`.

Reached as ``qrexec_trio.call`` and friends, imported on first use so that
``import qrexec_trio`` stays cheap for the short-lived clients.
"""

from ._blocking import call_blocking as call_blocking
from ._call import call as call
from ._errors import AgentNotRunning as AgentNotRunning
from ._errors import CallError as CallError
from ._errors import CallLost as CallLost
from ._errors import CallRefused as CallRefused
from ._errors import TargetNotRunning as TargetNotRunning
from ._streams import Capture as Capture
