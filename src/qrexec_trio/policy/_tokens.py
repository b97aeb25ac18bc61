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
``@dispvm``           no      yes     the caller asked for ``@dispvm`` (a new DispVM
                                      from its default template)
``@dispvm:VM``        no      yes     a new DispVM from template VM, asked for by name
                                      or as ``@dispvm`` when VM is the caller's default
``@dispvm:@tag:T``    no      yes     a new DispVM from a template tagged T (by name,
                                      or the caller's default for ``@dispvm``)
====================  ======  ======  ==============================================

The two DispVM spellings are matched as the reference matches them, which is not
symmetrical: a rule for ``@dispvm:VM`` also covers a request for ``@dispvm`` whose
default template is VM, but a rule for ``@dispvm`` covers only requests that say
``@dispvm``. A caller that names its template explicitly has asked for something
else than "my default", and a policy that allows only the latter must not be
read as allowing the former.

For the ask prompt, ``expand`` lists what a token stands for, as the reference's
``collect_targets_for_ask`` expands it: domain names, ``@dispvm:VM`` for usable
templates, and the bare ``@dispvm`` (the caller's default, resolved later).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ..protocol import is_qube_name
from ._lines import LineError
from ._names import DOMAIN_TYPES, describe_qube_problem, is_tag, quoted
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

#: In an ask expansion: "a new DispVM from the caller's default template", kept
#: apart from "@dispvm:VM" until every rule has been applied (as the reference does).
DISPVM_KEYWORD: Final = "@dispvm"


def dispvm_choice(template: str) -> str:
    return f"{DISPVM_KEYWORD}:{template}"


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

    def expand(self, system_info: SystemInfo) -> frozenset[str]:
        return _all_targets(system_info, admin=True)


def _all_targets(system_info: SystemInfo, *, admin: bool) -> frozenset[str]:
    names = {d.name for d in system_info.domains.values() if admin or not d.is_admin}
    return frozenset(names | _usable_templates(system_info) | {DISPVM_KEYWORD})


def _usable_templates(system_info: SystemInfo, tag: str | None = None) -> set[str]:
    return {
        dispvm_choice(d.name) for d in system_info.domains.values()
        if d.template_for_dispvms and (tag is None or tag in d.tags)
    }


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

    def expand(self, system_info: SystemInfo) -> frozenset[str]:
        return _all_targets(system_info, admin=False)


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

    def expand(self, system_info: SystemInfo) -> frozenset[str]:
        # As the reference: every domain the token describes, the admin VM
        # included (an explicit tag or type on dom0 is the policy author's).
        return frozenset(d.name for d in system_info.domains.values() if self.matches_domain(d))


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

    def expand(self, system_info: SystemInfo) -> frozenset[str]:
        return frozenset()


@dataclass(frozen=True)
class DispVMToken(_TargetOnlyToken):
    def __str__(self) -> str:
        return "@dispvm"

    def matches_target(
        self, target: RequestTarget, source: DomainInfo, system_info: SystemInfo
    ) -> bool:
        # Only the request that says "@dispvm", never "@dispvm:VM" (see above).
        return isinstance(target, DispVMTarget) and target.template is None

    def expand(self, system_info: SystemInfo) -> frozenset[str]:
        return frozenset({DISPVM_KEYWORD})


@dataclass(frozen=True)
class DispVMTemplateToken(_TargetOnlyToken):
    template: str

    def __str__(self) -> str:
        return f"@dispvm:{self.template}"

    def matches_target(
        self, target: RequestTarget, source: DomainInfo, system_info: SystemInfo
    ) -> bool:
        if not isinstance(target, DispVMTarget):
            return False
        # By name, as the reference: a default that is no usable template still
        # selects this rule, and the decision then denies (nothing to start).
        name = target.template if target.template is not None else source.default_dispvm
        return name == self.template

    def expand(self, system_info: SystemInfo) -> frozenset[str]:
        usable = system_info.dispvm_template(self.template) is not None
        return frozenset({dispvm_choice(self.template)} if usable else ())


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

    def expand(self, system_info: SystemInfo) -> frozenset[str]:
        return frozenset(_usable_templates(system_info, self.tag))


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
        raise TokenError(f"{quoted(text)} can only be a target, not a source")
    return token


def _parse_r2(text: str) -> Token:
    if text == "$anyvm":
        return AnyVMToken()
    if text == "$dispvm":
        return DispVMToken()
    if text.startswith("$"):
        raise TokenError(f"unknown keyword {quoted(text)} (R2 files know $anyvm and $dispvm)")
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
                f"unknown domain type in {quoted(text)} (known: {', '.join(sorted(DOMAIN_TYPES))})"
            )
        return TypeToken(domain_type)
    if text.startswith("@dispvm:@tag:"):
        return DispVMTagToken(_parse_tag(text, text.removeprefix("@dispvm:@tag:")))
    if text.startswith("@dispvm:"):
        template = text.removeprefix("@dispvm:")
        problem = describe_qube_problem(template)
        if problem is not None:
            raise TokenError(f"{quoted(text)}: {problem}")
        return DispVMTemplateToken(template)
    raise TokenError(f"unknown keyword {quoted(text)}")


_SIMPLE_KEYWORDS: Final[dict[str, Token]] = {
    "@anyvm": AnyVMToken(),
    "@adminvm": AdminVMToken(),
    "@default": DefaultToken(),
    "@dispvm": DispVMToken(),
}


def _parse_name(text: str) -> NameToken:
    if not is_qube_name(text):
        problem = describe_qube_problem(text)
        raise TokenError(problem or f"invalid qube name {quoted(text)}")
    return NameToken(text)


def _parse_tag(token: str, tag: str) -> str:
    if not is_tag(tag):
        raise TokenError(f"invalid tag in {quoted(token)} (allowed: A-Z a-z 0-9 _ . -)")
    return tag
