"""The qubesd admin-call protocol, sans-IO (wire-protocol.md §9).

One call is one connection. The client writes one request and shuts down its
write side::

    <method>[+<arg>] <source> name|keyword <dest>\\0<payload>

(a keyword destination is written without its ``@``), then reads to EOF one
reply::

    0\\0<value>                                        success
    2\\0<exception type>\\0<traceback or empty>\\0<message>\\0   failure

The functions here turn these bytes into values and back, and the values of
the few calls we use (``admin.vm.List``, ``admin.vm.property.Get``,
``admin.vm.tag.List``, ``internal.GetSystemInfo``) into Python objects and
back. Both ends use them: the Qubes implementation of ``Domains`` and the
admin server that offers any ``Domains`` over a qubesd-like socket.

Everything read is checked against a strict character set and a size bound
before use: a destination ends up in log lines and, in the local world, in
paths. Decoders raise only :class:`AdminProtocolError`, except
:func:`decode_reply`, which raises the error a well-formed error reply carries
as a plain :class:`DomainsError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from ..protocol import is_qube_name
from ._interface import Domain, DomainsError

#: The longest request and the longest reply either end accepts, in bytes.
MAX_REQUEST_SIZE: Final = 65535
MAX_REPLY_SIZE: Final = 65535
#: ...but ``internal.GetSystemInfo`` lists every domain with its facts (some
#: 400 bytes each on Qubes), so its reply may be longer.
MAX_SYSTEM_INFO_SIZE: Final = 8 << 20

#: ``kind`` of the errors a client makes up itself, never received from qubesd:
#: the reply did not follow the protocol...
PROTOCOL_ERROR: Final = "QubesDaemonProtocolError"
#: ...or there was no reply at all (no socket, connection dropped, timeout).
COMMUNICATION_ERROR: Final = "QubesDaemonCommunicationError"

MAX_METHOD_LEN: Final = 255
MAX_KEYWORD_LEN: Final = 255
MAX_KIND_LEN: Final = 255
MAX_CLASS_LEN: Final = 64
MAX_TAG_LEN: Final = 255

_METHOD: Final = re.compile(r"[A-Za-z0-9._]+")
_ARG: Final = re.compile(r"[A-Za-z0-9._+@:-]*")
# The reference addresses a domain by ``uuid:<uuid>`` when the policy gave one.
_UUID_NAME: Final = re.compile(r"uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                               r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# ``@dispvm:@tag:x`` is a keyword too, hence the inner ``@``.
_KEYWORD: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.:@-]*")
_KIND: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_CLASS: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_STATE: Final = re.compile(r"[A-Za-z]+")
# The policy's tag set, so that every listed tag can be named by ``@tag:``.
_TAG: Final = re.compile(r"[A-Za-z0-9_.-]+")
_PROPERTY_TYPE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROPERTY: Final = re.compile(r"default=(True|False) type=([^ ]*) (.*)", re.DOTALL)


class AdminProtocolError(DomainsError):
    """Bytes that break a rule of the admin protocol.

    A :class:`DomainsError` of kind ``QubesDaemonProtocolError``, so that a
    caller of ``Domains`` needs to catch only one type; ``field`` and ``rule``
    say what was wrong without a traceback.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(PROTOCOL_ERROR, f"{field}: {rule}")
        self.field = field
        self.rule = rule


def is_domain_name(text: str) -> bool:
    """A name a call may address: a qube name or ``uuid:<uuid>``."""
    return is_qube_name(text) or _UUID_NAME.fullmatch(text) is not None


# -- requests ----------------------------------------------------------------------


@dataclass(frozen=True)
class AdminRequest:
    method: str
    #: The part after the first ``+``; empty when there is none.
    arg: str
    source: str
    #: A name, or a keyword with its ``@`` (``@adminvm``) as qubesd spells it inside.
    dest: str
    payload: bytes = b""

    @property
    def dest_is_keyword(self) -> bool:
        return self.dest.startswith("@")

    @property
    def call(self) -> str:
        """``method+arg`` as it is logged and written."""
        return f"{self.method}+{self.arg}" if self.arg else self.method


def _check_method(method: str, arg: str) -> None:
    if len(method) > MAX_METHOD_LEN or not _METHOD.fullmatch(method):
        raise AdminProtocolError("request.method", "not 1-255 of [A-Za-z0-9._]")
    if not _ARG.fullmatch(arg):
        raise AdminProtocolError("request.arg", "not made of [A-Za-z0-9._+@:-]")


def _check_source(source: str) -> None:
    if not is_qube_name(source):
        raise AdminProtocolError("request.source", "not a qube name")


def _dest_words(dest: str) -> tuple[str, str]:
    """(dest-type, dest as written) for a destination as :class:`AdminRequest` holds it."""
    if dest.startswith("@"):
        keyword = dest[1:]
        if len(keyword) > MAX_KEYWORD_LEN or not _KEYWORD.fullmatch(keyword):
            raise AdminProtocolError("request.dest", "not a keyword")
        return "keyword", keyword
    if not is_domain_name(dest):
        raise AdminProtocolError("request.dest", "not a qube name or uuid:<uuid>")
    return "name", dest


def encode_request(method: str, dest: str, *, arg: str = "", payload: bytes = b"",
                   source: str = "dom0") -> bytes:
    """One request; ``dest`` starting with ``@`` is sent as a keyword."""
    _check_method(method, arg)
    _check_source(source)
    dest_type, dest_word = _dest_words(dest)
    call = f"{method}+{arg}" if arg else method
    data = f"{call} {source} {dest_type} {dest_word}".encode("ascii") + b"\0" + payload
    if len(data) > MAX_REQUEST_SIZE:
        raise AdminProtocolError("request", f"longer than {MAX_REQUEST_SIZE} bytes")
    return data


def decode_request(data: bytes) -> AdminRequest:
    """Parse a whole request as read up to the client's EOF."""
    if len(data) > MAX_REQUEST_SIZE:
        raise AdminProtocolError("request", f"longer than {MAX_REQUEST_SIZE} bytes")
    header, nul, payload = data.partition(b"\0")
    if not nul:
        raise AdminProtocolError("request", "no NUL after the header")
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        raise AdminProtocolError("request.header", "not ASCII") from None
    words = text.split(" ")
    if len(words) != 4:
        raise AdminProtocolError(
            "request.header", "not 4 words separated by single spaces"
        )
    call, source, dest_type, dest_word = words
    method, _, arg = call.partition("+")
    _check_method(method, arg)
    _check_source(source)
    if dest_type == "keyword":
        dest = "@" + dest_word
    elif dest_type == "name":
        # Checked here, not by _dest_words: "name @x" must not pass as a keyword.
        if not is_domain_name(dest_word):
            raise AdminProtocolError("request.dest", "not a qube name or uuid:<uuid>")
        dest = dest_word
    else:
        raise AdminProtocolError("request.dest_type", "neither 'name' nor 'keyword'")
    _dest_words(dest)
    return AdminRequest(method, arg, source, dest, payload)


# -- replies -----------------------------------------------------------------------


def encode_reply_ok(value: bytes, *, max_size: int = MAX_REPLY_SIZE) -> bytes:
    data = b"0\0" + value
    if len(data) > max_size:
        raise AdminProtocolError("reply", f"longer than {max_size} bytes")
    return data


def encode_reply_error(kind: str, message: str) -> bytes:
    """An error reply with an empty traceback field, as qubesd sends outside debug mode.

    A NUL in ``message`` would end the field early, so it becomes a space; an
    over-long message is cut so that the reply always fits.
    """
    if len(kind) > MAX_KIND_LEN or not _KIND.fullmatch(kind):
        raise AdminProtocolError("reply.type", "not an exception type name")
    head = b"2\0" + kind.encode("ascii") + b"\0\0"
    text = message.replace("\0", " ").encode("utf-8", errors="replace")
    room = MAX_REPLY_SIZE - len(head) - 1
    return head + text[:room] + b"\0"


def decode_reply(data: bytes, *, max_size: int = MAX_REPLY_SIZE) -> bytes:
    """The value of a success reply; raises the error of an error reply.

    Strict on the status (only ``0`` and ``2``; ``1`` is qubesd's event stream,
    which no call we make may return) and on the exception type; lenient on
    what follows it: the traceback, the message and the final NUL may be missing.
    """
    if len(data) > max_size:
        raise AdminProtocolError("reply", f"longer than {max_size} bytes")
    status = data[:2]
    if status == b"0\0":
        return data[2:]
    if status != b"2\0":
        raise AdminProtocolError("reply.status", f"not '0\\0' or '2\\0' but {status!r}")
    fields = data[2:].split(b"\0")
    try:
        kind = fields[0].decode("ascii")
    except UnicodeDecodeError:
        raise AdminProtocolError("reply.type", "not ASCII") from None
    if len(kind) > MAX_KIND_LEN or not _KIND.fullmatch(kind):
        raise AdminProtocolError("reply.type", "not an exception type name")
    message = fields[2] if len(fields) > 2 else b""
    text = message.decode("utf-8", errors="replace").strip()
    raise DomainsError(kind, text or "(no message)")


# -- values: admin.vm.List -----------------------------------------------------------


@dataclass(frozen=True)
class ListEntry:
    """One line of ``admin.vm.List``: all that call says about a domain."""

    name: str
    #: The qubesd class: AdminVM, AppVM, DispVM, TemplateVM, StandaloneVM.
    klass: str
    #: qubesd's power state: ``Running``, ``Halted``, ``Paused``, ``Transient``, ...
    state: str


def encode_vm_list(entries: Iterable[ListEntry]) -> bytes:
    """``NAME class=CLASS state=STATE\\n`` per domain."""
    lines = []
    for entry in entries:
        if not is_qube_name(entry.name):
            raise AdminProtocolError("list.name", f"{entry.name!r} is not a qube name")
        if len(entry.klass) > MAX_CLASS_LEN or not _CLASS.fullmatch(entry.klass):
            raise AdminProtocolError("list.class", f"{entry.klass!r} is not a class name")
        if not _STATE.fullmatch(entry.state):
            raise AdminProtocolError("list.state", f"{entry.state!r} is not a state")
        lines.append(f"{entry.name} class={entry.klass} state={entry.state}\n")
    return "".join(lines).encode("ascii")


def decode_vm_list(value: bytes) -> list[ListEntry]:
    text = _ascii_lines(value, "list")
    entries: list[ListEntry] = []
    seen: set[str] = set()
    for number, line in enumerate(text, 1):
        words = line.split(" ")
        if len(words) != 3 or not words[1].startswith("class=") \
                or not words[2].startswith("state="):
            raise AdminProtocolError(f"list line {number}", "not 'NAME class=X state=Y'")
        name, klass, state = words[0], words[1][len("class="):], words[2][len("state="):]
        if not is_qube_name(name):
            raise AdminProtocolError(f"list line {number}", "not a qube name")
        if name in seen:
            raise AdminProtocolError(f"list line {number}", f"{name} listed twice")
        if len(klass) > MAX_CLASS_LEN or not _CLASS.fullmatch(klass):
            raise AdminProtocolError(f"list line {number}", "not a class name")
        if not _STATE.fullmatch(state):
            raise AdminProtocolError(f"list line {number}", "not a power state")
        seen.add(name)
        entries.append(ListEntry(name, klass, state))
    return entries


def _ascii_lines(value: bytes, field: str) -> list[str]:
    """Lines of a newline-terminated list; the last newline may be missing."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise AdminProtocolError(field, "not ASCII") from None
    if not text:
        return []
    return text.removesuffix("\n").split("\n")


# -- values: admin.vm.property.Get and admin.vm.tag.List -----------------------------


@dataclass(frozen=True)
class PropertyValue:
    """``default=True|False type=TYPE VALUE``; VALUE is empty for a None."""

    type: str
    value: str
    is_default: bool = False


def encode_property(prop: PropertyValue) -> bytes:
    if not _PROPERTY_TYPE.fullmatch(prop.type):
        raise AdminProtocolError("property.type", f"{prop.type!r} is not a type name")
    return f"default={prop.is_default} type={prop.type} {prop.value}".encode()


def decode_property(value: bytes) -> PropertyValue:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise AdminProtocolError("property", "not UTF-8") from None
    match = _PROPERTY.fullmatch(text)
    if match is None:
        raise AdminProtocolError("property", "not 'default=True|False type=TYPE VALUE'")
    is_default, kind, content = match.groups()
    if not _PROPERTY_TYPE.fullmatch(kind):
        raise AdminProtocolError("property.type", "not a type name")
    return PropertyValue(kind, content, is_default == "True")


def encode_tags(tags: Iterable[str]) -> bytes:
    """One tag a line, sorted, as qubesd lists them."""
    ordered = sorted(tags)
    for tag in ordered:
        if len(tag) > MAX_TAG_LEN or not _TAG.fullmatch(tag):
            raise AdminProtocolError("tags", f"{tag!r} is not a tag")
    return "".join(f"{tag}\n" for tag in ordered).encode("ascii")


def decode_tags(value: bytes) -> tuple[str, ...]:
    tags = _ascii_lines(value, "tags")
    for number, tag in enumerate(tags, 1):
        if len(tag) > MAX_TAG_LEN or not _TAG.fullmatch(tag):
            raise AdminProtocolError(f"tags line {number}", "not a tag")
    return tuple(tags)


# -- values: internal.GetSystemInfo ----------------------------------------------------
#
# qubesd (qubes/api/internal.py) answers with ``json.dumps`` of
# ``{"domains": {NAME: {...}}}``, per domain: ``tags`` (list), ``type`` (the class
# name), ``template_for_dispvms`` (bool), ``default_dispvm`` (name or null),
# ``power_state`` (``Running``, ``Halted``, ...), ``icon``, ``label``, ``guivm``,
# ``relayvm``, ``transport_rpc``, ``internal``, ``uuid``; newer releases add keys.
# Checking the facts is the policy's business (``system_info_from_json``); here only
# the framing: UTF-8 JSON whose top is an object.


def encode_system_info(domains: Iterable[Domain]) -> bytes:
    """The answer for ``domains``, in qubesd's shape, with what a Domain knows.

    A Domain has no label, icon, GUI VM or UUID: those are left out (the
    reader takes them as unknown).
    """
    entries: dict[str, dict[str, Any]] = {}
    for domain in domains:
        if not is_qube_name(domain.name):
            raise AdminProtocolError("system info", f"{domain.name!r} is not a qube name")
        entries[domain.name] = {
            "tags": list(domain.tags),
            "type": domain.type,
            "template_for_dispvms": domain.template_for_dispvms,
            "default_dispvm": domain.default_dispvm,
            "power_state": "Running" if domain.running else "Halted",
        }
    return json.dumps({"domains": entries}).encode("ascii")


def decode_system_info(value: bytes) -> dict[str, Any]:
    """The decoded JSON object of an ``internal.GetSystemInfo`` answer."""
    try:
        data = json.loads(value.decode("utf-8"))
    except UnicodeDecodeError:
        raise AdminProtocolError("system info", "not UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise AdminProtocolError("system info", f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdminProtocolError("system info", "not a JSON object")
    return data
