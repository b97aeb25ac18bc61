"""``[vm.NAME.services]`` and ``[dom0.services]``: names to executable scripts."""

from __future__ import annotations

import os
import re
import stat
from typing import Final

from ._source import ConfigSource, Table, dotted
from ._spec import ServiceSpec
from ._toml_lines import KeyPath

#: A handler is a file named ``SERVICE`` or ``SERVICE+ARGUMENT``, in the
#: character sets the policy and the agent accept for those parts.
_SERVICE_FILE_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+(\+[A-Za-z0-9_.+-]*)?")
_MAX_FILE_NAME: Final = 255  # NAME_MAX
_SERVICE_FORMS: Final = frozenset({"command", "file"})
_SHELL_PREFIX: Final = "#!/bin/sh\n"


def parse_services(source: ConfigSource, owner: Table, where: KeyPath) -> tuple[ServiceSpec, ...]:
    """The ``services`` table of ``owner`` (the table at ``where``)."""
    table_path = (*where, "services")
    table = source.table(owner, where, "services")
    return tuple(
        _parse_service(source, (*table_path, name), name, value) for name, value in table.items()
    )


def _parse_service(source: ConfigSource, where: KeyPath, name: str, value: object) -> ServiceSpec:
    problem = _service_name_problem(name)
    if problem is not None:
        raise source.error(where, problem)
    if isinstance(value, str):
        return _inline_service(source, where, name, value)
    if not isinstance(value, dict):
        raise source.error(
            where,
            f"{dotted(where)} must be a shell command, {{ command = \"...\" }} "
            f"or {{ file = \"PATH\" }}",
        )
    source.check_keys(value, where, _SERVICE_FORMS)
    if len(value) != 1:
        raise source.error(where, f"{dotted(where)} needs exactly one of 'command' or 'file'")
    ((form, text),) = value.items()
    if not isinstance(text, str):
        raise source.error((*where, form), f"{dotted((*where, form))} must be a string")
    if form == "command":
        return _inline_service(source, (*where, form), name, text)
    return _file_service(source, (*where, form), name, text)


def _service_name_problem(name: str) -> str | None:
    if "/" in name:
        return f"service name {name!r} contains '/': a service is one file name"
    if (
        len(name) > _MAX_FILE_NAME
        or name in {".", ".."}
        or _SERVICE_FILE_NAME.fullmatch(name) is None
    ):
        return (
            f"invalid service name {name!r}: expected SERVICE or SERVICE+ARGUMENT "
            f"(SERVICE: A-Z a-z 0-9 _ . -; ARGUMENT also +), at most {_MAX_FILE_NAME} characters"
        )
    return None


def _inline_service(source: ConfigSource, where: KeyPath, name: str, body: str) -> ServiceSpec:
    if not body.strip():
        raise source.error(where, f"service {name!r} has an empty command")
    if "\0" in body:
        raise source.error(where, f"service {name!r}: the command contains a NUL character")
    origin = f"{source.path}:{source.lines.line_of(where)}"
    return ServiceSpec(name, _script_from_body(body), origin)


def _script_from_body(body: str) -> str:
    """A body with its own ``#!`` line is a whole script; anything else is sh."""
    text = body if body.startswith("#!") else _SHELL_PREFIX + body
    return text if text.endswith("\n") else text + "\n"


def _file_service(source: ConfigSource, where: KeyPath, name: str, relative: str) -> ServiceSpec:
    path = source.resolve(relative)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise source.error(where, f"service {name!r}: {path} does not exist") from None
    except OSError as exc:
        raise source.error(where, f"service {name!r}: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise source.error(where, f"service {name!r}: {path} is not a regular file")
    # The script is copied into the VM with mode 0755, but a file without its x
    # bit was most likely never meant to be run: say so now, not at the first call.
    if not info.st_mode & 0o111:
        raise source.error(where, f"service {name!r}: {path} is not executable (chmod +x it)")
    script = _read_script(source, where, name, path)
    return ServiceSpec(name, script, path)


def _read_script(source: ConfigSource, where: KeyPath, name: str, path: str) -> str:
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise source.error(where, f"service {name!r}: {path}: {exc.strerror}") from None
    try:
        script = data.decode("utf-8")
    except UnicodeDecodeError:
        raise source.error(where, f"service {name!r}: {path} is not a text script") from None
    # Services are executed directly, never through a shell, so without a "#!"
    # line the kernel would refuse to run it (ENOEXEC) at the first call.
    if not script.startswith("#!"):
        raise source.error(where, f"service {name!r}: {path} does not start with a '#!' line")
    return script
