"""What :func:`qrexec_trio.call` raises when there is no exit status to return.

A call that reached its service returns the service's exit status, whatever
it is (including qrexec's own 125 "could not start" and 127 "no such
service", which the target's agent reports as exit statuses). Everything
else is an exception, so that a caller never mistakes a local failure for
a status its service chose.
"""

from __future__ import annotations

from .._errors import QrexecError


class CallError(QrexecError):
    """The call could not be made, or died; the message says why."""


class CallRefused(CallError):
    """The policy (or dom0 on its behalf) refused the call (``qrexec-client-vm``'s 126)."""


class AgentNotRunning(CallError):
    """In a VM: there is no qrexec-agent at the trigger socket."""


class TargetNotRunning(CallError):
    """In dom0: the target has no qrexec-daemon (the VM is not running)."""


class CallLost(CallError):
    """The data vchan ended before the service's exit status came (the CLIs' 255)."""
