"""What the policy needs to know about the domains: a plain data structure.

A real system fills it from the domain registry: qubesd's ``internal.GetSystemInfo``
answers with JSON of the shape below (the local world's admin socket answers the
same call from its live domains); a ``--system-info`` file holds the same JSON::

    {
      "domains": {
        "dom0":       {"type": "AdminVM"},
        "work":       {"type": "AppVM", "tags": ["trusted"], "default_dispvm": "work-dvm"},
        "work-dvm":   {"type": "AppVM", "template_for_dispvms": true},
        "disp1234":   {"type": "DispVM"}
      }
    }

Per domain: ``type`` (required; one of AdminVM, AppVM, DispVM, StandaloneVM,
TemplateVM), ``tags`` (list of tag names, default empty), ``default_dispvm`` (name
of the DispVM template ``@dispvm`` means for calls *from* this domain, or null;
default null), ``template_for_dispvms`` (whether ``@dispvm:NAME`` may name it,
default false). What qubesd adds is read and kept when it is a string (or null):
``power_state``, ``icon``, ``guivm``, ``uuid``; and accepted but not kept:
``label``, ``internal``, ``relayvm``, ``transport_rpc``.

Two readings: ``strict`` (a file someone wrote) refuses any other key, so a typo
cannot silently drop a tag that a deny rule relies on; not strict (qubesd's answer)
ignores keys it does not know, at the top and per domain, and leaves out a domain
whose type (a string) it does not know, so that a newer qubesd adding a fact or a
class does not stop every call (calls from or to a left-out domain are denied: it is
not a known domain). Either way, the facts the engine decides on (type, tags,
default_dispvm, template_for_dispvms) are checked strictly, and at most one domain
may be the AdminVM.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from ..protocol import is_qube_name
from ._names import DOMAIN_TYPES, describe_qube_problem, is_tag

ADMIN_VM_TYPE: Final = "AdminVM"
_POLICY_KEYS: Final = frozenset({"type", "tags", "default_dispvm", "template_for_dispvms"})
#: qubesd's informational facts, kept on DomainInfo (a string or null each).
_KEPT_KEYS: Final = frozenset({"power_state", "icon", "guivm", "uuid"})
#: qubesd's facts that nothing here uses; accepted, whatever their value.
_SKIPPED_KEYS: Final = frozenset({"label", "internal", "relayvm", "transport_rpc"})
_DOMAIN_KEYS: Final = _POLICY_KEYS | _KEPT_KEYS | _SKIPPED_KEYS


class SystemInfoError(ValueError):
    """The system information is malformed (not a policy problem)."""


@dataclass(frozen=True)
class DomainInfo:
    name: str
    type: str
    tags: frozenset[str] = frozenset()
    default_dispvm: str | None = None
    template_for_dispvms: bool = False
    #: What qubesd says besides (None when it did not say): ``Running``, ``Halted``...
    power_state: str | None = None
    icon: str | None = None
    guivm: str | None = None
    uuid: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.type == ADMIN_VM_TYPE


@dataclass(frozen=True)
class SystemInfo:
    domains: Mapping[str, DomainInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        admins = [d.name for d in self.domains.values() if d.is_admin]
        if len(admins) > 1:
            raise SystemInfoError(f"more than one AdminVM: {', '.join(sorted(admins))}")
        for key, domain in self.domains.items():
            if key != domain.name:
                raise SystemInfoError(f"domain listed as {key!r} is named {domain.name!r}")
        # Frozen dataclass: freeze the mapping too, so a shared SystemInfo cannot
        # be changed under a running evaluation.
        object.__setattr__(self, "domains", MappingProxyType(dict(self.domains)))

    @classmethod
    def of(cls, domains: Iterable[DomainInfo]) -> SystemInfo:
        return cls({d.name: d for d in domains})

    @property
    def admin_vm(self) -> str | None:
        for domain in self.domains.values():
            if domain.is_admin:
                return domain.name
        return None

    def dispvm_template(self, name: str | None) -> DomainInfo | None:
        """The domain ``name`` if it exists and may be a DispVM template."""
        if name is None:
            return None
        domain = self.domains.get(name)
        if domain is None or not domain.template_for_dispvms:
            return None
        return domain


def minimal_system_info(names: Iterable[str], admin_name: str = "dom0") -> SystemInfo:
    """A registry that knows only ``names``: the admin VM and AppVMs, no tags,
    no DispVM templates. Invalid names are left out (the request they came from
    is denied by validation anyway)."""
    domains = {admin_name: DomainInfo(admin_name, ADMIN_VM_TYPE)}
    for name in names:
        if name not in domains and is_qube_name(name):
            domains[name] = DomainInfo(name, "AppVM")
    return SystemInfo(domains)


def system_info_from_json(data: Any, *, strict: bool = True) -> SystemInfo:
    """Build a SystemInfo from decoded JSON; raises SystemInfoError.

    ``strict``: unknown keys are errors (a hand-written file); otherwise they
    are ignored (qubesd's answer, which grows new facts over releases).
    """
    if not isinstance(data, dict) or "domains" not in data:
        raise SystemInfoError('expected an object with the key "domains"')
    if strict and set(data) != {"domains"}:
        raise SystemInfoError('expected an object with exactly one key, "domains"')
    raw_domains = data["domains"]
    if not isinstance(raw_domains, dict):
        raise SystemInfoError('"domains" must be an object')
    domains = (_domain_from_json(name, raw, strict) for name, raw in raw_domains.items())
    return SystemInfo.of(domain for domain in domains if domain is not None)


def load_system_info(path: str) -> SystemInfo:
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemInfoError(f"{path}: {exc}") from exc
    try:
        return system_info_from_json(data)
    except SystemInfoError as exc:
        raise SystemInfoError(f"{path}: {exc}") from exc


def _domain_from_json(name: str, raw: Any, strict: bool) -> DomainInfo | None:
    """The domain; None for one of a type we do not know, when not ``strict``."""
    problem = describe_qube_problem(name)
    if problem is not None:
        raise SystemInfoError(problem)
    if not isinstance(raw, dict):
        raise SystemInfoError(f"domain {name!r}: expected an object")
    unknown = set(raw) - _DOMAIN_KEYS
    if unknown and strict:
        raise SystemInfoError(f"domain {name!r}: unknown keys {sorted(unknown)}")
    domain_type = raw.get("type")
    if not strict and isinstance(domain_type, str) and domain_type not in DOMAIN_TYPES:
        # A class a newer qubesd knows (RemoteVM...): the domain is left out, so
        # every call from or to it is denied; the other domains' calls go on.
        return None
    if domain_type not in DOMAIN_TYPES:
        raise SystemInfoError(f"domain {name!r}: type must be one of {sorted(DOMAIN_TYPES)}")
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and is_tag(t) for t in tags):
        raise SystemInfoError(f"domain {name!r}: tags must be a list of tag names")
    default_dispvm = raw.get("default_dispvm")
    if default_dispvm is not None and not (
        isinstance(default_dispvm, str) and is_qube_name(default_dispvm)
    ):
        raise SystemInfoError(f"domain {name!r}: default_dispvm must be a qube name or null")
    template_for_dispvms = raw.get("template_for_dispvms", False)
    if not isinstance(template_for_dispvms, bool):
        raise SystemInfoError(f"domain {name!r}: template_for_dispvms must be true or false")
    return DomainInfo(
        name=name,
        type=domain_type,
        tags=frozenset(tags),
        default_dispvm=default_dispvm,
        template_for_dispvms=template_for_dispvms,
        power_state=_text(name, raw, "power_state"),
        icon=_text(name, raw, "icon"),
        guivm=_text(name, raw, "guivm"),
        uuid=_text(name, raw, "uuid"),
    )


def _text(name: str, raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise SystemInfoError(f"domain {name!r}: {key} must be a string or null")
    return value
