"""The protocol layer's errors: who broke the rule, and what it cost.

As in h11, a rule broken by the *peer* (:class:`RemoteProtocolError`) is
input to handle: log it and drop what the peer sent. A rule broken by *us*
(:class:`LocalProtocolError`) means we tried to build a message no peer would
accept: a bug, or local input (a user's command line) that cannot be sent.
Both derive from :class:`ProtocolError`, so a caller that only wants to know
"did the protocol fail" catches one type.
"""

from __future__ import annotations

from .._errors import QrexecError
from .._light import final


class ProtocolError(QrexecError):
    """A message, payload or command line broke a rule of the wire protocol.

    ``field`` names what was wrong (``"header.type"``, ``"cmdline.user"``, ...)
    and ``rule`` says which rule it broke, so that a log line names the
    offending field without a traceback.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes the protocol does not allow."""


@final
class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol does not allow."""


@final
class UndecodableMessage(RemoteProtocolError):
    """One well-framed message whose payload is bad; the stream is still in step.

    The link may go on: the reader has consumed exactly this message. For a
    trigger, ``raw_request_id`` is its request-id field as sent (32 bytes), so
    that the receiver can refuse the request by the id the VM will recognise.
    """

    def __init__(self, field: str, rule: str, *, msg_type: int,
                 raw_request_id: bytes | None = None) -> None:
        super().__init__(field, rule)
        self.msg_type = msg_type
        self.raw_request_id = raw_request_id
