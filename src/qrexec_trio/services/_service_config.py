"""What a service's rpc-config file says about it (one value object).

The parser (:mod:`._rpc_config`) reads ``$QUBES_RPC_CONFIG_PATH`` files into
this; the launch plans and the agent act on it.
"""

from __future__ import annotations

# A light record, not a dataclass: the multiplexer imports this on every call (issue 14).
from .._light import frozen_record


@frozen_record
class ServiceConfig:
    """A service's per-service configuration; the defaults are a service without a file."""

    #: Wait for the user's session (``qubes.WaitForSession``) before starting.
    wait_for_session: bool = False
    #: Run the service as this user, whatever the call asked for.
    force_user: str | None = None
    #: Socket and TCP services: do not send the service descriptor first.
    skip_service_descriptor: bool = False
    #: Socket and TCP services: end the call once the service's output ends.
    exit_on_service_eof: bool = False
    #: Socket and TCP services: end the call once the caller's input ends.
    exit_on_client_eof: bool = False


#: A service with no configuration file.
DEFAULT_CONFIG = ServiceConfig()
