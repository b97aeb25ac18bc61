"""Source and target tokens of policy rules, and what they match.

Keywords (the ``$`` spelling of each is read as ``@`` in the multi-file format):

====================  ======  ======  ==============================================
token                 source  target  matches
====================  ======  ======  ==============================================
``*``                 yes     yes     anything, the admin VM (dom0) included
``@anyvm``            yes     yes     any domain except the admin VM; as a target also
                                      ``@default`` and new DispVMs (never dom0)
``@adminvm``          yes     yes     the admin VM
``NAME``              yes     yes     the domain called NAME (``dom0`` is a name too)
``@tag:T``            yes     yes     an existing domain tagged T
``@type:T``           yes     yes     an existing domain of class T
``@default``          no      yes     the caller named no target
``@dispvm``           no      yes     a new DispVM from the caller's default template
``@dispvm:VM``        no      yes     a new DispVM from template VM
``@dispvm:@tag:T``    no      yes     a new DispVM from a template tagged T
====================  ======  ======  ==============================================

``@dispvm`` and ``@dispvm:VM`` describe the same DispVM when VM is the caller's
default DispVM template, so each matches the other spelling of it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ..protocol import is_qube_name
from ._lines import LineError
from ._names import DOMAIN_TYPES, describe_qube_problem, is_tag
from ._system_info import DomainInfo, SystemInfo

# --- what a request asks for, once validated -------------------------------------


@dataclass(frozen=True)
class NamedTarget:
    """An existing domain (``@adminvm`` is resolved to the admin VM's name)."""

    name: str


@dataclass(frozen=True)
class DefaultTarget:
    """The caller named no target (``@default``)."""


@dataclass(frozen=True)
class DispVMTarget:
    """A new DispVM; ``template`` None means the caller's default template."""

    template: str | None


RequestTarget = NamedTarget | DefaultTarget | DispVMTarget


def effective_dispvm_template(
    target: DispVMTarget, source: DomainInfo, system_info: SystemInfo
) -> DomainInfo | None:
    """The template the new DispVM would be made from, if it is a usable one."""
    name = target.template if target.template is not None else source.default_dispvm
    return system_info.dispvm_template(name)


# --- tokens ----------------------------------------------------------------------


class Dialect(enum.Enum):
    """R2 per-service files know only ``$anyvm``, ``$dispvm`` and names."""

    R2 = "r2"
    MULTIFILE = "multifile"


class Position(enum.Enum):
    SOURCE = "source"
    TARGET = "target"


class TokenError(LineError):
    """A token is malformed; the caller turns it into a PolicySyntaxError."""


@dataclass(frozen=True)
class AnyToken:
    def __str__(self) -> str:
        return "*"

    def matches_source(self, source: DomainInfo) -> bool:
        return True

    def matches_target(
        self, target: RequestTarget, source: DomainInfo, system_info: SystemInfo
    ) -> bool:
        return True


@dataclass(frozen=True)
class AnyVMToken:
    def __str__(self) -> str:
        return "@anyvm"

    def matches_source(self, source: DomainInfo) -> bool:
        return not source.is_admin

    def matches_target(
        self, target: RequestTarget, source: DomainInfo, system_info: SystemInfo
    ) -> bool:
        if isinstance(target, NamedTarget):
            domain = system_info.domains.get(target.name)
            return domain is not None and not domain.is_admin
        # @default and new DispVMs can never turn out to be the admin VM.
        return True


class _DomainToken:
    """Tokens that match an existing domain by what it is (name, tag, type, role).

    They match a caller that is such a domain, and a target that names one;
    never ``@default`` or a new DispVM, which name no existing domain.
    """

    def matches_domain(self, domain: DomainInfo) -> bool:
        raise NotImplementedError

    def matches_source(self, source: DomainInfo) -> bool:
        return self.matches_domain(source)

    def matches_target(
        self, target: RequestTarget, source: DomainInfo, system_info: SystemInfo
    ) -> bool:
        if not isinstance(target, NamedTarget):
            return False
        domain = system_info.domains.get(target.name)
        return domain is not None and self.matches_domain(domain)


@dataclass(frozen=True)
class AdminVMToken(_DomainToken):
    def __str__(self) -> str:
        return "@adminvm"

    def matches_domain(self, domain: DomainInfo) -> bool:
        return domain.is_admin


@dataclass(frozen=True)
class NameToken(_DomainToken):
    name: str

    def __str__(self) -> str:
        return self.name

    def matches_domain(self, domain: DomainInfo) -> bool:
        return domain.name == self.name


@dataclass(frozen=True)
class TagToken(_DomainToken):
    tag: str

    def __str__(self) -> str:
        return f"@tag:{self.tag}"

    def matches_domain(self, domain: DomainInfo) -> bool:
        return self.tag in domain.tags


@dataclass(frozen=True)
class TypeToken(_DomainToken):
    domain_type: str

    def __str__(self) -> str:
        return f"@type:{self.domain_type}"

    def matches_domain(self, domain: DomainInfo) -> bool:
        return domain.type == self.domain_type


class _TargetOnlyToken:
    """Keywords that name a kind of target; they never match a caller."""

    def matches_source(self, source: DomainInfo) -> bool:
        return False


def _dispvm_template(
    target: RequestTarget, source: DomainInfo, system_info: SystemInfo
) -> DomainInfo | None:
    """The template a new-DispVM request would use; None for any other request."""
    if not isinstance(target, DispVMTarget):
        return None
    return effective_dispvm_template(target, source, system_info)


@dataclass(frozen=True)
class DefaultToken(_TargetOnlyToken):
    def __str__(self) -> str:
        return "@default"

    def matches_target(
        self, target: RequestTarget, source: DomainInfo, system_info: SystemInfo
    ) -> bool:
        return isinstance(target, DefaultTarget)


@dataclass(frozen=True)
class DispVMToken(_TargetOnlyToken):
    def __str__(self) -> str:
        return "@dispvm"

    def matches_target(
        self, target: RequestTarget, source: DomainInfo, system_info: SystemInfo
    ) -> bool:
        if not isinstance(target, DispVMTarget):
            return False
        return target.template is None or target.template == source.default_dispvm


@dataclass(frozen=True)
class DispVMTemplateToken(_TargetOnlyToken):
    template: str

    def __str__(self) -> str:
        return f"@dispvm:{self.template}"

    def matches_target(
        self, target: RequestTarget, source: DomainInfo, system_info: SystemInfo
    ) -> bool:
        template = _dispvm_template(target, source, system_info)
        return template is not None and template.name == self.template


@dataclass(frozen=True)
class DispVMTagToken(_TargetOnlyToken):
    tag: str

    def __str__(self) -> str:
        return f"@dispvm:@tag:{self.tag}"

    def matches_target(
        self, target: RequestTarget, source: DomainInfo, system_info: SystemInfo
    ) -> bool:
        template = _dispvm_template(target, source, system_info)
        return template is not None and self.tag in template.tags


Token = (
    AnyToken
    | AnyVMToken
    | AdminVMToken
    | NameToken
    | TagToken
    | TypeToken
    | DefaultToken
    | DispVMToken
    | DispVMTemplateToken
    | DispVMTagToken
)

_TARGET_ONLY: Final = (DefaultToken, DispVMToken, DispVMTemplateToken, DispVMTagToken)


def parse_token(text: str, position: Position, dialect: Dialect) -> Token:
    """Parse one SRC or DST column; raises TokenError."""
    token = _parse_r2(text) if dialect is Dialect.R2 else _parse_multifile(text)
    if position is Position.SOURCE and isinstance(token, _TARGET_ONLY):
        raise TokenError(f"{text!r} can only be a target, not a source")
    return token


def _parse_r2(text: str) -> Token:
    if text == "$anyvm":
        return AnyVMToken()
    if text == "$dispvm":
        return DispVMToken()
    if text.startswith("$"):
        raise TokenError(f"unknown keyword {text!r} (R2 files know $anyvm and $dispvm)")
    return _parse_name(text)


def _parse_multifile(text: str) -> Token:
    if text.startswith("$"):
        # The old "$" spelling of keywords ("$anyvm", "$dispvm:$tag:T") is read as
        # "@"; names cannot contain either character, so nothing else changes.
        text = text.replace("$", "@")
    if text == "*":
        return AnyToken()
    if not text.startswith("@"):
        return _parse_name(text)
    simple = _SIMPLE_KEYWORDS.get(text)
    if simple is not None:
        return simple
    if text.startswith("@tag:"):
        return TagToken(_parse_tag(text, text.removeprefix("@tag:")))
    if text.startswith("@type:"):
        domain_type = text.removeprefix("@type:")
        if domain_type not in DOMAIN_TYPES:
            raise TokenError(
                f"unknown domain type in {text!r} (known: {', '.join(sorted(DOMAIN_TYPES))})"
            )
        return TypeToken(domain_type)
    if text.startswith("@dispvm:@tag:"):
        return DispVMTagToken(_parse_tag(text, text.removeprefix("@dispvm:@tag:")))
    if text.startswith("@dispvm:"):
        template = text.removeprefix("@dispvm:")
        problem = describe_qube_problem(template)
        if problem is not None:
            raise TokenError(f"{text!r}: {problem}")
        return DispVMTemplateToken(template)
    raise TokenError(f"unknown keyword {text!r}")


_SIMPLE_KEYWORDS: Final[dict[str, Token]] = {
    "@anyvm": AnyVMToken(),
    "@adminvm": AdminVMToken(),
    "@default": DefaultToken(),
    "@dispvm": DispVMToken(),
}


def _parse_name(text: str) -> NameToken:
    if not is_qube_name(text):
        problem = describe_qube_problem(text)
        raise TokenError(problem or f"invalid qube name {text!r}")
    return NameToken(text)


def _parse_tag(token: str, tag: str) -> str:
    if not is_tag(tag):
        raise TokenError(f"invalid tag in {token!r} (allowed: A-Z a-z 0-9 _ . -)")
    return tag
