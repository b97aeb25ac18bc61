"""The one exception base of qrexec-trio.

Every error a role expects and handles (a peer broke the protocol, a vchan
failed, a domain could not be made, a service could not start, a request
could not be connected) derives from :class:`QrexecError`, so that a role
catches ``QrexecError`` plus the few trio/OS errors of I/O
(``nursery.CALL_FAILURES``) instead of listing every layer's types. Anything
else reaching a role is a bug and is reported as one.
"""

from __future__ import annotations


class QrexecError(Exception):
    """Something went wrong for a reason worth a log line, not a traceback."""
