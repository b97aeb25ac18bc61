"""What a validated world config says: plain frozen data, nothing left to check."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    """One RPC service of a VM (or of dom0)."""

    #: The handler's file name: ``SERVICE`` or ``SERVICE+ARGUMENT``.
    name: str
    #: The whole executable file to install, ``#!`` line included.
    script: str
    #: Where it was defined, for messages: ``CONFIG:LINE`` or the service file's path.
    origin: str


@dataclass(frozen=True)
class VMSpec:
    """One VM of the world (never dom0, never a DispVM: those are made at run time)."""

    name: str
    domid: int
    #: AppVM, StandaloneVM or TemplateVM.
    type: str
    tags: tuple[str, ...]
    #: The template ``@dispvm`` means for calls from this VM.
    default_dispvm: str | None
    #: Whether DispVMs may be made from this VM.
    template_for_dispvms: bool
    #: Whether the world starts this VM with itself (else on its first call).
    autostart: bool
    services: tuple[ServiceSpec, ...]
    #: The user this VM's services run as unless the policy says otherwise.
    default_user: str


@dataclass(frozen=True)
class PolicyOrigin:
    """Where a generated policy file came from, to report its lines as the user's.

    Line N of ``file_name`` is line ``first_line + N - 1`` of ``path``.
    """

    file_name: str
    path: str
    first_line: int

    def location(self, line: int) -> str:
        return f"{self.path}:{self.first_line + line - 1}"


@dataclass(frozen=True)
class WorldConfig:
    #: The config file, as it was named.
    path: str
    #: The default user of every VM.
    user: str
    vms: tuple[VMSpec, ...]
    dom0_services: tuple[ServiceSpec, ...]
    #: (file name, text) of each policy.d file to write, in evaluation order
    #: (the names sort in that order too).
    policy_files: tuple[tuple[str, str], ...]
    policy_origins: tuple[PolicyOrigin, ...]
    #: Where ``ask`` rules are asked and notifications go (``dom0`` or a VM); the
    #: world installs ``policy.Ask`` and ``policy.Notify`` there. None: dom0, with
    #: only the services the config gives it.
    policy_agent: str | None = None
    #: The group whose members may use the world (its sockets) besides the
    #: world's own user; None: nobody else may.
    group: str | None = None

    def vm(self, name: str) -> VMSpec:
        """The VM called ``name``; KeyError if there is none."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)

    def policy_location(self, file_name: str, line: int) -> str:
        """``CONFIG:LINE`` or ``POLICYFILE:LINE`` for a line of a generated policy file."""
        for origin in self.policy_origins:
            if origin.file_name == file_name:
                return origin.location(line)
        return f"{file_name}:{line}"
