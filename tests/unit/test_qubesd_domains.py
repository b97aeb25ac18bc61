"""QubesdDomains against a fake qubesd, and serve_admin against QubesdDomains."""

from __future__ import annotations

import builtins
import dataclasses
import functools
import itertools
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from qrexec_trio.domains import (
    COMMUNICATION_ERROR,
    PROTOCOL_ERROR,
    Domain,
    DomainsError,
    QubesdDomains,
    serve_admin,
)
from qrexec_trio.domains._admin import MAX_REPLY_SIZE, MAX_REQUEST_SIZE

UUID = "uuid:12345678-9abc-def0-1234-56789abcdef0"
#: A guard against hangs only; no test asserts how long anything took.
GUARD = 10
NOT_FOUND = b"2\0QubesVMNotFoundError\0\0no such VM\0"


class FakeQubesd:
    """Records each request as read to EOF and answers from ``replies``.

    A request without a canned reply is refused as qubesd refuses an unknown
    call. ``mode`` "hang" reads the request and never answers; "close" closes
    the connection before reading anything.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[bytes] = []
        self.replies: dict[bytes, bytes] = {}
        self.mode = "answer"

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.bind(self.path)
        raw.listen(16)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.mode == "close":
                return
            with trio.fail_after(GUARD):
                data = await read_all(stream)
            self.requests.append(data)
            if self.mode == "hang":
                await trio.sleep_forever()
            reply = self.replies.get(data, b"2\0QubesNotImplementedError\0\0no such call\0")
            await stream.send_all(reply)


async def read_all(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(1 << 16):
        data += chunk
    return bytes(data)


@pytest.fixture
async def fake(short_tmp: Path, nursery: trio.Nursery) -> FakeQubesd:
    server = FakeQubesd(str(short_tmp / "qubesd.sock"))
    await nursery.start(server.serve)
    return server


def client(fake: FakeQubesd, call_timeout: float = GUARD) -> QubesdDomains:
    return QubesdDomains(fake.path, call_timeout=call_timeout)


# -- the requests, as the reference sends them ---------------------------------------


async def test_start_sends_the_reference_request(fake: FakeQubesd) -> None:
    fake.replies[b"admin.vm.Start dom0 name work\0"] = b"0\0"
    await client(fake).start("work")
    assert fake.requests == [b"admin.vm.Start dom0 name work\0"]


async def test_kill_sends_the_reference_request(fake: FakeQubesd) -> None:
    fake.replies[b"admin.vm.Kill dom0 name disp12\0"] = b"0\0"
    await client(fake).kill("disp12")
    assert fake.requests == [b"admin.vm.Kill dom0 name disp12\0"]


async def test_create_disposable_sends_the_reference_request(fake: FakeQubesd) -> None:
    fake.replies[b"admin.vm.CreateDisposable dom0 name tmpl\0"] = b"0\0disp42"
    assert await client(fake).create_disposable("tmpl") == "disp42"
    assert fake.requests == [b"admin.vm.CreateDisposable dom0 name tmpl\0"]


async def test_a_disposable_may_come_back_as_a_uuid_and_be_addressed_so(
        fake: FakeQubesd) -> None:
    fake.replies[b"admin.vm.CreateDisposable dom0 name tmpl\0"] = b"0\0" + UUID.encode()
    fake.replies[b"admin.vm.Start dom0 name " + UUID.encode() + b"\0"] = b"0\0"
    domains = client(fake)
    name = await domains.create_disposable("tmpl")
    assert name == UUID
    await domains.start(name)
    assert fake.requests[-1] == b"admin.vm.Start dom0 name " + UUID.encode() + b"\0"


LISTING = {
    b"admin.vm.List dom0 name dom0\0":
        b"0\0dom0 class=AdminVM state=Running\nwork class=AppVM state=Running\n"
        b"tmpl class=AppVM state=Halted\n",
    b"admin.vm.property.Get+default_dispvm dom0 name dom0\0": b"0\0default=False type=vm tmpl",
    b"admin.vm.property.Get+xid dom0 name dom0\0": b"0\0default=True type=int 0",
    b"admin.vm.property.Get+default_dispvm dom0 name work\0": b"0\0default=True type=vm tmpl",
    b"admin.vm.property.Get+template_for_dispvms dom0 name work\0":
        b"0\0default=True type=bool False",
    b"admin.vm.property.Get+default_user dom0 name work\0": b"0\0default=False type=str alice",
    b"admin.vm.property.Get+xid dom0 name work\0": b"0\0default=True type=int 7",
    b"admin.vm.tag.List dom0 name work\0": b"0\0audit\ncreated-by-dom0\n",
    b"admin.vm.property.Get+default_dispvm dom0 name tmpl\0": b"0\0default=False type=vm ",
    b"admin.vm.property.Get+template_for_dispvms dom0 name tmpl\0":
        b"0\0default=False type=bool True",
    b"admin.vm.property.Get+default_user dom0 name tmpl\0": b"0\0default=True type=str user",
    b"admin.vm.tag.List dom0 name tmpl\0": b"0\0",
}


async def test_list_asks_for_each_field_and_builds_domains(fake: FakeQubesd) -> None:
    fake.replies.update(LISTING)
    domains = await client(fake).list()
    assert domains == [
        # dom0 has no default_user, template_for_dispvms or tags here: qubesd
        # refuses those calls, and the fields keep their defaults.
        Domain("dom0", "AdminVM", domid=0, default_dispvm="tmpl"),
        Domain("work", "AppVM", domid=7, tags=("audit", "created-by-dom0"),
               default_user="alice", default_dispvm="tmpl"),
        Domain("tmpl", "AppVM", template_for_dispvms=True),
    ]
    per_domain = ["property.Get+default_dispvm", "property.Get+template_for_dispvms",
                  "property.Get+default_user"]
    expected = [b"admin.vm.List dom0 name dom0\0"]
    for name, running in [("dom0", True), ("work", True), ("tmpl", False)]:
        calls = per_domain + (["property.Get+xid"] if running else []) + ["tag.List"]
        expected += [f"admin.vm.{call} dom0 name {name}\0".encode() for call in calls]
    assert fake.requests == expected


async def test_a_running_domain_whose_xid_is_minus_one_has_no_domid(fake: FakeQubesd) -> None:
    fake.replies[b"admin.vm.List dom0 name dom0\0"] = b"0\0work class=AppVM state=Transient\n"
    fake.replies[b"admin.vm.property.Get+xid dom0 name work\0"] = b"0\0default=True type=int -1"
    assert await client(fake).list() == [Domain("work", "AppVM")]


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        pytest.param(b"admin.vm.List dom0 name dom0\0", b"0\0work class=AppVM\n", id="list"),
        pytest.param(b"admin.vm.property.Get+xid dom0 name work\0",
                     b"0\0default=True type=int seven", id="xid"),
        pytest.param(b"admin.vm.property.Get+xid dom0 name work\0",
                     b"0\0default=True type=int -2", id="xid-below-minus-one"),
        pytest.param(b"admin.vm.property.Get+default_dispvm dom0 name work\0",
                     b"0\0default=True type=vm ../x", id="default-dispvm"),
        pytest.param(b"admin.vm.property.Get+template_for_dispvms dom0 name work\0",
                     b"0\0default=True type=bool yes", id="bool"),
        pytest.param(b"admin.vm.property.Get+default_user dom0 name work\0",
                     b"0\0default=True type=str us:er", id="user"),
        pytest.param(b"admin.vm.property.Get+default_user dom0 name work\0",
                     b"0\0type=str user", id="property-format"),
        pytest.param(b"admin.vm.tag.List dom0 name work\0", b"0\0a tag\n", id="tags"),
        pytest.param(b"admin.vm.tag.List dom0 name work\0", b"garbage", id="status"),
    ],
)
async def test_a_malformed_answer_fails_the_listing(fake: FakeQubesd, request_: bytes,
                                                    reply: bytes) -> None:
    fake.replies[b"admin.vm.List dom0 name dom0\0"] = b"0\0work class=AppVM state=Running\n"
    fake.replies[request_] = reply
    with pytest.raises(DomainsError) as caught:
        await client(fake).list()
    assert caught.value.kind == PROTOCOL_ERROR


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["start", "kill", "create_disposable"])
async def test_error_replies_become_domains_errors(fake: FakeQubesd, call: str) -> None:
    fake.replies = {
        b"admin.vm.Start dom0 name nosuch\0": NOT_FOUND,
        b"admin.vm.Kill dom0 name nosuch\0": NOT_FOUND,
        b"admin.vm.CreateDisposable dom0 name nosuch\0": NOT_FOUND,
    }
    with pytest.raises(DomainsError) as caught:
        await getattr(client(fake), call)("nosuch")
    assert (caught.value.kind, caught.value.message) == ("QubesVMNotFoundError", "no such VM")


async def test_killing_a_domain_that_is_not_running_is_done(fake: FakeQubesd) -> None:
    fake.replies[b"admin.vm.Kill dom0 name work\0"] = (
        b"2\0QubesVMNotStartedError\0\0Domain is powered off: work\0"
    )
    await client(fake).kill("work")
    assert fake.requests == [b"admin.vm.Kill dom0 name work\0"]


@pytest.mark.parametrize(
    "reply",
    [b"0", b"garbage", b"1\0event", b"2\0\0\0m\0", b"2\0Bad Type\0\0m\0",
     b"0\0" + b"x" * MAX_REPLY_SIZE],
)
async def test_truncated_or_garbage_replies_are_protocol_errors(fake: FakeQubesd,
                                                                reply: bytes) -> None:
    fake.replies[b"admin.vm.Start dom0 name work\0"] = reply
    with pytest.raises(DomainsError) as caught:
        await client(fake).start("work")
    assert caught.value.kind == PROTOCOL_ERROR


@pytest.mark.parametrize("value", [b"", b"../x", b"disp 1", b"disp\xff", b"uuid:1234"])
async def test_a_bad_disposable_name_is_a_protocol_error(fake: FakeQubesd, value: bytes) -> None:
    fake.replies[b"admin.vm.CreateDisposable dom0 name tmpl\0"] = b"0\0" + value
    with pytest.raises(DomainsError) as caught:
        await client(fake).create_disposable("tmpl")
    assert caught.value.kind == PROTOCOL_ERROR


async def test_a_qubesd_that_never_answers_times_out(fake: FakeQubesd) -> None:
    fake.mode = "hang"
    with pytest.raises(DomainsError) as caught:
        await client(fake, call_timeout=0.2).start("work")
    assert caught.value.kind == COMMUNICATION_ERROR
    assert "no answer" in caught.value.message
    # The request arrived whole before the client gave up.
    assert fake.requests == [b"admin.vm.Start dom0 name work\0"]


async def test_a_qubesd_that_closes_at_once_is_a_communication_error(fake: FakeQubesd) -> None:
    fake.mode = "close"
    with pytest.raises(DomainsError) as caught:
        await client(fake).create_disposable("tmpl")
    assert caught.value.kind == COMMUNICATION_ERROR


async def test_no_qubesd_is_a_communication_error(short_tmp: Path) -> None:
    with pytest.raises(DomainsError) as caught:
        await QubesdDomains(str(short_tmp / "absent.sock")).start("work")
    assert caught.value.kind == COMMUNICATION_ERROR


@pytest.mark.parametrize("name", ["../etc", "a b", "", "-rf", "w" * 32])
async def test_bad_names_are_refused_before_connecting(fake: FakeQubesd, name: str) -> None:
    with pytest.raises(DomainsError) as caught:
        await client(fake).kill(name)
    assert caught.value.kind == PROTOCOL_ERROR
    assert fake.requests == []


# -- both ends: QubesdDomains -> serve_admin -> an in-memory registry ---------------


class MemoryDomains:
    """A registry in a dict, following the ``Domains`` promises."""

    def __init__(self, *domains: Domain) -> None:
        self.domains = {d.name: d for d in domains}
        self._domids = itertools.count(10)
        self._dispvms = itertools.count(1)
        self.fail_with: BaseException | None = None

    async def list(self) -> builtins.list[Domain]:
        await trio.lowlevel.checkpoint()
        if self.fail_with is not None:
            raise self.fail_with
        return list(self.domains.values())

    async def start(self, name: str) -> None:
        await trio.lowlevel.checkpoint()
        domain = self._get(name)
        if not domain.running:
            self.domains[name] = dataclasses.replace(domain, domid=next(self._domids))

    async def create_disposable(self, template: str) -> str:
        await trio.lowlevel.checkpoint()
        base = self._get(template)
        if not base.template_for_dispvms:
            raise DomainsError("QubesException", f"{template} is not a DispVM template")
        name = f"disp{next(self._dispvms)}"
        self.domains[name] = Domain(name, "DispVM", default_user=base.default_user)
        return name

    async def kill(self, name: str) -> None:
        await trio.lowlevel.checkpoint()
        domain = self._get(name)
        if domain.type == "DispVM":
            del self.domains[name]
        else:
            self.domains[name] = dataclasses.replace(domain, domid=None)

    def _get(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            raise DomainsError("QubesVMNotFoundError", f"no such domain: {name}") from None


def sample() -> MemoryDomains:
    return MemoryDomains(
        Domain("dom0", "AdminVM", domid=0, default_dispvm="tmpl"),
        Domain("work", "AppVM", domid=3, tags=("audit", "b-tag"), default_user="alice",
               default_dispvm="tmpl"),
        Domain("tmpl", "AppVM", template_for_dispvms=True, default_dispvm="tmpl"),
        Domain("vault", "StandaloneVM", default_dispvm=None),
    )


@pytest.fixture
async def served(short_tmp: Path, nursery: trio.Nursery) -> tuple[MemoryDomains, str]:
    memory = sample()
    path = str(short_tmp / "admin.sock")
    await nursery.start(functools.partial(serve_admin, memory, path, request_timeout=1))
    return memory, path


async def raw_call(path: str, data: bytes, *, eof: bool = True) -> bytes:
    with trio.fail_after(GUARD):
        stream = await trio.open_unix_socket(path)
        async with stream:
            try:
                await stream.send_all(data)
                if eof:
                    await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the server stopped reading an over-long request
            return await read_all(stream)


async def test_both_ends_agree_on_the_listing(served: tuple[MemoryDomains, str]) -> None:
    memory, path = served
    assert await QubesdDomains(path, call_timeout=GUARD).list() == await memory.list()


async def test_both_ends_agree_on_the_lifecycle(served: tuple[MemoryDomains, str]) -> None:
    memory, path = served
    domains = QubesdDomains(path, call_timeout=GUARD)
    name = await domains.create_disposable("tmpl")
    assert memory.domains[name] == Domain(name, "DispVM")
    await domains.start(name)
    await domains.start(name)  # starting a running domain is no error
    assert memory.domains[name].running
    listed = {d.name: d for d in await domains.list()}
    assert listed[name] == memory.domains[name]
    await domains.kill(name)
    assert name not in memory.domains
    await domains.kill("work")
    assert not memory.domains["work"].running


async def test_domains_errors_cross_with_their_kind(served: tuple[MemoryDomains, str]) -> None:
    _, path = served
    domains = QubesdDomains(path, call_timeout=GUARD)
    with pytest.raises(DomainsError) as caught:
        await domains.start("nosuch")
    assert (caught.value.kind, caught.value.message) == (
        "QubesVMNotFoundError", "no such domain: nosuch")
    with pytest.raises(DomainsError) as caught:
        await domains.create_disposable("work")
    assert caught.value.kind == "QubesException"


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        pytest.param(b"admin.vm.List dom0 name work\0", b"0\0work class=AppVM state=Running\n",
                     id="list-one"),
        pytest.param(b"admin.vm.List dom0 keyword adminvm\0", None, id="list-by-keyword"),
        pytest.param(b"admin.vm.property.Get+xid dom0 name vault\0",
                     b"0\0default=False type=int -1", id="xid-halted"),
        pytest.param(b"admin.vm.property.Get+default_dispvm dom0 name vault\0",
                     b"0\0default=False type=vm ", id="no-default-dispvm"),
        pytest.param(b"admin.vm.tag.List dom0 name work\0", b"0\0audit\nb-tag\n", id="tags"),
        pytest.param(b"admin.vm.CreateDisposable dom0 name dom0\0", b"0\0disp1",
                     id="dispvm-from-dom0-default"),
        pytest.param(b"admin.vm.Frobnicate dom0 name work\0",
                     b"2\0QubesNotImplementedError\0\0no method admin.vm.Frobnicate\0",
                     id="unknown-method"),
        pytest.param(b"admin.vm.property.Get+netvm dom0 name work\0",
                     b"2\0QubesNoSuchPropertyError\0\0no property 'netvm'\0",
                     id="unknown-property"),
        pytest.param(b"admin.vm.tag.List dom0 name nosuch\0",
                     b"2\0QubesVMNotFoundError\0\0no such domain: nosuch\0", id="no-such-vm"),
        pytest.param(b"admin.vm.Start dom0 keyword dispvm\0",
                     b"2\0QubesVMNotFoundError\0\0no domain for keyword @dispvm\0",
                     id="keyword-is-no-domain"),
        pytest.param(b"admin.vm.CreateDisposable dom0 name tmpl\0uuid",
                     b"2\0QubesNotImplementedError\0\0"
                     b"disposables are named, not addressed by UUID\0", id="uuid-payload"),
        pytest.param(b"admin.vm.Start+now dom0 name work\0",
                     b"2\0ProtocolError\0\0admin.vm.Start takes no argument\0", id="extra-arg"),
        pytest.param(b"admin.vm.Kill dom0 name work\0x",
                     b"2\0ProtocolError\0\0admin.vm.Kill takes no payload\0", id="extra-payload"),
    ],
)
async def test_the_server_answers_raw_calls(served: tuple[MemoryDomains, str], request_: bytes,
                                            reply: bytes | None) -> None:
    _, path = served
    if reply is None:  # the whole listing, as for dom0
        reply = (b"0\0dom0 class=AdminVM state=Running\nwork class=AppVM state=Running\n"
                 b"tmpl class=AppVM state=Halted\nvault class=StandaloneVM state=Halted\n")
    assert await raw_call(path, request_) == reply


@pytest.mark.parametrize(
    "request_",
    [b"", b"admin.vm.Start dom0 name work", b"admin.vm.Start dom0 name ../x\0",
     b"\xff\xfe\0", b"admin.vm.Start dom0 nickname work\0",
     b"admin.vm.Start dom0 name work\0" + b"x" * MAX_REQUEST_SIZE],
)
async def test_malformed_requests_get_an_error_and_the_server_goes_on(
        served: tuple[MemoryDomains, str], request_: bytes) -> None:
    _, path = served
    reply = await raw_call(path, request_)
    assert reply.startswith(b"2\0ProtocolError\0\0")
    assert await QubesdDomains(path, call_timeout=GUARD).create_disposable("tmpl") == "disp1"


async def test_a_client_that_never_finishes_its_request_gets_an_error(
        served: tuple[MemoryDomains, str]) -> None:
    _, path = served
    reply = await raw_call(path, b"admin.vm.Start dom0 name work\0", eof=False)
    assert reply == b"2\0ProtocolError\0\0request not complete in time\0"


async def test_a_crashing_registry_does_not_end_the_server(
        served: tuple[MemoryDomains, str]) -> None:
    memory, path = served
    memory.fail_with = RuntimeError("bug")
    reply = await raw_call(path, b"admin.vm.List dom0 name dom0\0")
    assert reply == b"2\0QubesException\0\0internal error\0"
    memory.fail_with = DomainsError("not a valid kind", "odd")
    reply = await raw_call(path, b"admin.vm.List dom0 name dom0\0")
    assert reply == b"2\0QubesException\0\0not a valid kind: odd\0"
    memory.fail_with = None
    assert len(await QubesdDomains(path, call_timeout=GUARD).list()) == 4


async def test_many_clients_at_once(served: tuple[MemoryDomains, str]) -> None:
    memory, path = served
    domains = QubesdDomains(path, call_timeout=GUARD)
    names: list[str] = []

    async def make() -> None:
        names.append(await domains.create_disposable("tmpl"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(make)
    assert sorted(names) == sorted(f"disp{i}" for i in range(1, 21))
    assert all(name in memory.domains for name in names)


async def test_the_socket_is_0660_replaces_a_stale_one_and_is_removed_at_exit(
        short_tmp: Path) -> None:
    path = short_tmp / "admin.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_admin, sample(), str(path),
                                              request_timeout=10))
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        assert await QubesdDomains(str(path), call_timeout=GUARD).create_disposable("tmpl")
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_the_server_never_removes_what_is_not_a_socket(short_tmp: Path) -> None:
    path = short_tmp / "admin.sock"
    path.write_text("precious")
    with pytest.raises(OSError):
        await serve_admin(sample(), str(path), request_timeout=10)
    assert path.read_text() == "precious"
