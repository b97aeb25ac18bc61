"""Who the VMs are, and how to start, create and destroy them.

One interface, two implementations: the local world (each VM is an agent
process on this machine) and Qubes (qubesd admin calls). dom0 programs use
only this interface, so the same daemon code makes a DispVM in both worlds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .._errors import QrexecError


@dataclass(frozen=True)
class Domain:
    """One domain as the registry knows it."""

    name: str
    #: AdminVM, AppVM, DispVM, TemplateVM or StandaloneVM.
    type: str
    #: The domain id while it runs, else None.
    domid: int | None = None
    tags: tuple[str, ...] = ()
    default_user: str = "user"
    #: The DispVM template calls from this domain use for @dispvm.
    default_dispvm: str | None = None
    #: Whether DispVMs can be made from this domain.
    template_for_dispvms: bool = False

    @property
    def running(self) -> bool:
        return self.domid is not None


class DomainsError(QrexecError):
    """A domain operation failed. ``kind`` names the failure like qubesd's
    exception types do (``QubesVMNotFoundError``, ``QubesVMError``, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Domains(Protocol):
    """The registry and lifecycle of domains. Every method checkpoints."""

    async def list(self) -> list[Domain]:
        """Every domain, dom0 included."""
        ...

    async def start(self, name: str) -> None:
        """Start ``name`` and return once its qrexec agent and daemon are ready.

        Starting a running domain is not an error.
        """
        ...

    async def create_disposable(self, template: str) -> str:
        """Create (not start) a new DispVM from ``template``; returns its name."""
        ...

    async def kill(self, name: str) -> None:
        """Stop ``name`` at once; a DispVM is removed with everything it had."""
        ...
