"""Loading a world's config: TOML in, a fully checked WorldConfig out.

The format is documented in the package docstring (``qrexec_trio.world``).
Everything is checked here, before the world starts anything, and the first
problem is raised as a WorldConfigError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import getpass
import grp
import os
import pwd
import re
import tomllib
from typing import Final

from ..protocol import is_qube_name
from ._errors import WorldConfigError
from ._policy import ADMIN_VM, parse_policy
from ._services import parse_services
from ._source import ConfigSource, Table, dotted
from ._spec import ServiceSpec, VMSpec, WorldConfig
from ._system_info import system_info_json
from ._toml_lines import KeyPath, TomlLines

# The package re-exports these; they are listed here too for modules of the
# package that import them from this one.
__all__ = [
    "ServiceSpec",
    "VMSpec",
    "WorldConfig",
    "WorldConfigError",
    "load_world_config",
    "system_info_json",
]

_TOP_KEYS: Final = frozenset({"world", "dom0", "vm", "policy"})
_WORLD_KEYS: Final = frozenset({"user", "group"})
_DOM0_KEYS: Final = frozenset({"services"})
_VM_KEYS: Final = frozenset({
    "domid", "type", "tags", "default_dispvm", "template_for_dispvms", "autostart",
    "default_user", "services",
})

#: The names the world gives DispVMs; a declared VM must not be mistaken for one.
_DISPVM_NAME: Final = re.compile(r"disp[0-9]+")
_TAG: Final = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_USER_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
#: Group names follow the same rule as user names.
_GROUP_NAME: Final = _USER_NAME
_VM_TYPES: Final = ("AppVM", "StandaloneVM", "TemplateVM")
_DEFAULT_VM_TYPE: Final = "AppVM"
#: dom0 and DispVMs exist in every world but are never declared under [vm].
_MADE_BY_THE_WORLD: Final = frozenset({"AdminVM", "DispVM"})

FIRST_DEFAULT_DOMID: Final = 10
MAX_DOMID: Final = 32767  # Xen's domid space below DOMID_FIRST_RESERVED

_TOML_POSITION: Final = re.compile(
    r"^(?P<what>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$"
)
_TOML_AT_END: Final = " (at end of document)"


def load_world_config(path: str | os.PathLike[str]) -> WorldConfig:
    """Read and check the world config at ``path``; raises WorldConfigError."""
    path_text = os.fspath(path)
    text = _read_text(path_text)
    source = ConfigSource(path_text, TomlLines.of(text))
    root = _parse_toml(source, text)
    source.check_keys(root, (), _TOP_KEYS)
    world = source.table(root, (), "world")
    source.check_keys(world, ("world",), _WORLD_KEYS)
    user = _world_user(source, world)
    vms = _parse_vms(source, root, user)
    dom0 = source.table(root, (), "dom0")
    source.check_keys(dom0, ("dom0",), _DOM0_KEYS)
    dom0_services = parse_services(source, dom0, ("dom0",))
    policy_files, policy_origins = parse_policy(source, root, vms)
    return WorldConfig(
        path=path_text,
        user=user,
        group=_world_group(source, world),
        vms=vms,
        dom0_services=dom0_services,
        policy_files=policy_files,
        policy_origins=policy_origins,
        policy_agent=_policy_agent(source, root, vms),
    )


def _policy_agent(source: ConfigSource, root: Table, vms: tuple[VMSpec, ...]) -> str | None:
    """``[policy] agent``: dom0 or a VM of the world that starts with it."""
    where = ("policy", "agent")
    agent = source.string(source.table(root, (), "policy"), ("policy",), "agent")
    if agent is None or agent == ADMIN_VM:
        return agent
    by_name = {vm.name: vm for vm in vms}
    vm = by_name.get(agent)
    if vm is None:
        raise source.error(where, f"policy agent {agent!r} is neither dom0 nor a VM of this world")
    if not vm.autostart:
        raise source.error(
            where, f"policy agent {agent!r} must start with the world (autostart = true)")
    return agent


# --- the file and its syntax --------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise WorldConfigError(path, 1, f"cannot read the world config: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise WorldConfigError(path, line, "not UTF-8 text") from None


def _parse_toml(source: ConfigSource, text: str) -> Table:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, message = _toml_error_position(source, str(exc))
        raise WorldConfigError(source.path, line, f"invalid TOML: {message}") from None


def _toml_error_position(source: ConfigSource, message: str) -> tuple[int, str]:
    """tomllib puts the position at the end of its message; move it to the front."""
    match = _TOML_POSITION.match(message)
    if match is not None:
        return int(match["line"]), f"{match['what']} (column {match['column']})"
    if message.endswith(_TOML_AT_END):
        return source.lines.clamp(len(source.lines.lines)), message.removesuffix(_TOML_AT_END)
    return 1, message


# --- [world] ------------------------------------------------------------------------


def _world_user(source: ConfigSource, world: Table) -> str:
    user = source.string(world, ("world",), "user")
    if user is None:
        return _current_user(source)
    _check_user(source, ("world", "user"), user)
    return user


def _current_user(source: ConfigSource) -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        pass  # a uid without a passwd entry (some containers): try the environment
    try:
        return getpass.getuser()
    except OSError:
        raise WorldConfigError(
            source.path, 1, "cannot tell who runs the world: set [world] user"
        ) from None


def _check_user(source: ConfigSource, where: KeyPath, user: str) -> None:
    if _USER_NAME.fullmatch(user) is None:
        raise source.error(where, f"{dotted(where)}: invalid user name {user!r}")
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise source.error(where, f"{dotted(where)}: no such user {user!r}") from None


def _world_group(source: ConfigSource, world: Table) -> str | None:
    """``[world] group``: the group that may use the world besides its user."""
    where = ("world", "group")
    group = source.string(world, ("world",), "group")
    if group is None:
        return None
    if _GROUP_NAME.fullmatch(group) is None:
        raise source.error(where, f"{dotted(where)}: invalid group name {group!r}")
    try:
        grp.getgrnam(group)
    except KeyError:
        raise source.error(where, f"{dotted(where)}: no such group {group!r}") from None
    return group


# --- [vm.NAME] ----------------------------------------------------------------------


def _parse_vms(source: ConfigSource, root: Table, user: str) -> tuple[VMSpec, ...]:
    table = source.table(root, (), "vm")
    if not table:
        raise WorldConfigError(source.path, 1, "a world needs at least one [vm.NAME] table")
    drafts = [_parse_vm(source, name, raw, user) for name, raw in table.items()]
    _check_default_dispvms(source, [vm for vm, _ in drafts])
    domids = _assign_domids(source, drafts)
    return tuple(dataclasses.replace(vm, domid=domids[vm.name]) for vm, _ in drafts)


def _parse_vm(
    source: ConfigSource, name: str, raw: object, user: str
) -> tuple[VMSpec, int | None]:
    """The VM (its domid still 0) and the domid the config asked for, if any."""
    where = ("vm", name)
    _check_vm_name(source, where, name)
    if not isinstance(raw, dict):
        raise source.error(where, f"{dotted(where)} must be a table")
    source.check_keys(raw, where, _VM_KEYS)
    domid = _explicit_domid(source, raw, where)
    vm_type = _vm_type(source, raw, where)
    template_for_dispvms = source.boolean(raw, where, "template_for_dispvms", False)
    if template_for_dispvms and vm_type == "TemplateVM":
        raise source.error(
            (*where, "template_for_dispvms"),
            "a TemplateVM cannot be a template for DispVMs (use an AppVM)",
        )
    default_user = source.string(raw, where, "default_user")
    if default_user is None:
        default_user = user
    else:
        _check_user(source, (*where, "default_user"), default_user)
    vm = VMSpec(
        name=name,
        domid=0,
        type=vm_type,
        tags=_tags(source, raw, where),
        default_dispvm=source.string(raw, where, "default_dispvm"),
        template_for_dispvms=template_for_dispvms,
        autostart=source.boolean(raw, where, "autostart", True),
        services=parse_services(source, raw, where),
        default_user=default_user,
    )
    return vm, domid


def _check_vm_name(source: ConfigSource, where: KeyPath, name: str) -> None:
    if name == ADMIN_VM:
        raise source.error(
            where, "dom0 is the admin VM and cannot be a [vm]; its services go in [dom0.services]"
        )
    if not is_qube_name(name):
        raise source.error(
            where,
            f"invalid VM name {name!r}: a letter, then up to 30 of A-Z a-z 0-9 _ . -",
        )
    if _DISPVM_NAME.fullmatch(name) is not None:
        raise source.error(where, f"VM name {name!r} is reserved for DispVMs (dispN)")


def _explicit_domid(source: ConfigSource, raw: Table, where: KeyPath) -> int | None:
    domid = source.integer(raw, where, "domid")
    if domid is not None and not 1 <= domid <= MAX_DOMID:
        raise source.error(
            (*where, "domid"), f"domid must be from 1 to {MAX_DOMID} (0 is dom0), not {domid}"
        )
    return domid


def _vm_type(source: ConfigSource, raw: Table, where: KeyPath) -> str:
    vm_type = source.string(raw, where, "type")
    if vm_type is None:
        return _DEFAULT_VM_TYPE
    if vm_type in _MADE_BY_THE_WORLD:
        raise source.error(
            (*where, "type"), f"type {vm_type!r} cannot be declared: the world makes those itself"
        )
    if vm_type not in _VM_TYPES:
        raise source.error(
            (*where, "type"), f"unknown type {vm_type!r} (expected {', '.join(_VM_TYPES)})"
        )
    return vm_type


def _tags(source: ConfigSource, raw: Table, where: KeyPath) -> tuple[str, ...]:
    tags = source.string_list(raw, where, "tags")
    for tag in tags:
        if _TAG.fullmatch(tag) is None:
            raise source.error(
                (*where, "tags"), f"invalid tag {tag!r} (allowed: A-Z a-z 0-9 _ . -)"
            )
    return tuple(dict.fromkeys(tags))  # a repeated tag means nothing more


def _check_default_dispvms(source: ConfigSource, vms: list[VMSpec]) -> None:
    by_name = {vm.name: vm for vm in vms}
    for vm in vms:
        if vm.default_dispvm is None:
            continue
        where = ("vm", vm.name, "default_dispvm")
        template = by_name.get(vm.default_dispvm)
        if template is None:
            raise source.error(
                where, f"default_dispvm {vm.default_dispvm!r} is not a VM of this world"
            )
        if not template.template_for_dispvms:
            raise source.error(
                where,
                f"default_dispvm {template.name!r} is not a template for DispVMs "
                f"(set template_for_dispvms = true in [{dotted(('vm', template.name))}])",
            )


def _assign_domids(
    source: ConfigSource, drafts: list[tuple[VMSpec, int | None]]
) -> dict[str, int]:
    """Explicit domids (unique), then the free ones from FIRST_DEFAULT_DOMID in file order."""
    domids: dict[str, int] = {}
    owners: dict[int, str] = {}
    for vm, domid in drafts:
        if domid is None:
            continue
        if domid in owners:
            raise source.error(
                ("vm", vm.name, "domid"),
                f"domid {domid} is already the domid of {owners[domid]!r}",
            )
        owners[domid] = vm.name
        domids[vm.name] = domid
    candidate = FIRST_DEFAULT_DOMID
    for vm, domid in drafts:
        if domid is not None:
            continue
        while candidate in owners:
            candidate += 1
        if candidate > MAX_DOMID:
            raise source.error(("vm", vm.name), "no domid left for this VM")
        owners[candidate] = vm.name
        domids[vm.name] = candidate
    return domids
