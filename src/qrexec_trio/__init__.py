"""qrexec-trio: the qrexec inter-VM RPC framework, rebuilt on trio.

The layers, from the bottom up (imports point downwards only):

- :mod:`qrexec_trio.protocol`: sans-IO wire protocol (bytes in, messages out).
- :mod:`qrexec_trio.xen`: vchan backends behind one async stream interface.
- :mod:`qrexec_trio.nursery`: structured-concurrency building blocks
  (framed links, the data pump, child processes).
- :mod:`qrexec_trio.roles`: the programs (daemon, client, agent, ...).

For Python programs, the call API: :func:`call` (trio) and
:func:`call_blocking`, with :class:`Capture` and the exceptions they raise.
They are imported on first use, so that importing this package (as every
short-lived client does) does not import trio.
"""

# No __future__ or typing import (typing.TYPE_CHECKING): every client imports
# this package first, so it imports nothing but the light _lazy.
from . import _structlog_without_rich
from ._lazy import lazy_attributes

_structlog_without_rich.install()

TYPE_CHECKING = False
if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports them
    from ._api import AgentNotRunning as AgentNotRunning
    from ._api import CallError as CallError
    from ._api import CallLost as CallLost
    from ._api import CallRefused as CallRefused
    from ._api import Capture as Capture
    from ._api import TargetNotRunning as TargetNotRunning
    from ._api import call as call
    from ._api import call_blocking as call_blocking

__version__ = "0.1.0.dev0"

_API = ("call", "call_blocking", "Capture", "CallError", "CallRefused", "AgentNotRunning",
        "TargetNotRunning", "CallLost")
# The API imports trio: loaded only when used.
__getattr__ = lazy_attributes(__name__, dict.fromkeys(_API, "_api"))


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
