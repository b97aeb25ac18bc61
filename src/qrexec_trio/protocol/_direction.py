"""The links of qrexec and the direction of travel on each: who may send what."""

from __future__ import annotations

from .._light import Enum


class Direction(Enum):
    """A link and the direction of travel on it."""

    DAEMON_TO_AGENT = "daemon->agent (control vchan)"
    AGENT_TO_DAEMON = "agent->daemon (control vchan)"
    CLIENT_TO_DAEMON = "client->daemon (qrexec socket)"
    DAEMON_TO_CLIENT = "daemon->client (qrexec socket)"
    CALLER_TO_SERVICE = "caller->service (data vchan)"
    SERVICE_TO_CALLER = "service->caller (data vchan)"
    CLIENT_VM_TO_AGENT = "client-vm->agent (trigger socket)"
    #: Our own local link: the agent tells an R2 qrexec-client-vm how its call
    #: went (remote stderr, then the exit status or the refusal).
    AGENT_TO_CLIENT_VM = "agent->client-vm (status channel)"

    @property
    def has_hello(self) -> bool:
        """Every link but the two local VM links starts with a HELLO each way."""
        return self not in (Direction.CLIENT_VM_TO_AGENT, Direction.AGENT_TO_CLIENT_VM)
