"""The VM-local request protocol: FIFO records, CIDs, the claim table, the status channel,
and qrexec-client-vm's command line."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from qrexec_trio._config import Timeouts
from qrexec_trio.blocking import _vm_call
from qrexec_trio.nursery import ConnectionRegistry
from qrexec_trio.protocol import (
    Data,
    Direction,
    Event,
    ExitCode,
    Hello,
    LocalProtocolError,
    MessageReader,
    MsgType,
    RemoteProtocolError,
    ServiceConnect,
    ServiceRefused,
    Stream,
    TriggerService,
    encode_frame,
)
from qrexec_trio.protocol._vm_local import (
    FD_NUMBER,
    decode_fifo_record,
    encode_fifo_record,
    fdpass_path,
    fifo_path,
    format_cid,
    parse_cid,
)
from qrexec_trio.roles import client_vm
from qrexec_trio.roles._vm_requests import (
    ClaimCapReached,
    ClaimCaps,
    ClaimRefused,
    ClaimTable,
    DomRequests,
    RequestPaths,
    VmRequests,
)
from qrexec_trio.xen import VchanBackend

ME = (100, 1000, 1000)
#: A bound on waits that only a bug makes long (never a timing assertion).
WAIT = 60


def test_files_sit_beside_todays_socket() -> None:
    assert fdpass_path("/run/qubes/qrexec-agent") == "/run/qubes/qrexec-agent-fdpass"
    assert fifo_path("/run/qubes/qrexec-agent") == "/run/qubes/qrexec-agent-fifo"


def test_fifo_record_round_trips_with_nul_padded_fields() -> None:
    record = encode_fifo_record(b"test.Echo+arg", b"dom0", b"7 8 9")
    assert record == struct.pack("64s32s32s", b"test.Echo+arg", b"dom0", b"7 8 9")
    assert decode_fifo_record(record) == (b"test.Echo+arg", b"dom0", b"7 8 9")


@pytest.mark.parametrize(
    ("record", "rule"),
    [
        (bytes(127), "must be 128 bytes"),
        (b"x" * 64 + bytes(64), "fifo.service: not NUL-terminated"),
        (b"svc\0junk".ljust(64, b"\0") + bytes(64), "fifo.service: bytes after"),
        (bytes(64) + b"t" * 32 + bytes(32), "fifo.target: not NUL-terminated"),
    ],
)
def test_malformed_fifo_records_are_rejected(record: bytes, rule: str) -> None:
    with pytest.raises(RemoteProtocolError, match=rule):
        decode_fifo_record(record)


def test_fifo_fields_that_do_not_fit_are_refused_before_sending() -> None:
    with pytest.raises(LocalProtocolError, match=r"fifo\.service"):
        encode_fifo_record(b"s" * 64, b"dom0", b"1 2 3")
    with pytest.raises(LocalProtocolError, match=r"fifo\.target"):
        encode_fifo_record(b"svc", b"t" * 32, b"1 2 3")
    with pytest.raises(LocalProtocolError, match=r"fifo\.cid"):
        encode_fifo_record(b"svc", b"dom0", b"1 2\0 3")


@pytest.mark.parametrize("text", [b"1 2", b"1 2 3 4", b"01 2 3", b"1  2 3", b"-1 2 3",
                                  b"1 2 3 ", b"a b c", b"1 1 2", b"12345678901 1 2",
                                  b"1234567890 1234567891 1234567892"])
def test_only_canonical_cids_of_three_distinct_numbers_parse(text: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        parse_cid(text)
    assert error.value.field == "cid"


def test_a_cid_parses_to_its_fd_numbers() -> None:
    assert parse_cid(b"0 17 4") == (0, 17, 4)
    assert parse_cid(format_cid((0, 17, 4))) == (0, 17, 4)


def test_the_longest_cid_is_a_request_id() -> None:
    # The agent refuses a request by its CID on the status channel (a SERVICE_REFUSED).
    cid = format_cid((999999999, 1000000000, 1000000001))
    assert len(cid) == 31
    assert parse_cid(cid) == (999999999, 1000000000, 1000000001)
    with pytest.raises(RemoteProtocolError, match="longer than 31"):
        parse_cid(format_cid((1000000002, 1000000000, 1000000001)))
    assert ServiceRefused(cid).encode() == encode_frame(MsgType.SERVICE_REFUSED,
                                                       cid.ljust(32, b"\0"))


def _table() -> ClaimTable[str]:
    table: ClaimTable[str] = ClaimTable(ClaimCaps(per_process=4, per_user=4, total=4))
    for fd in (5, 6, 7):
        table.add(fd, f"sock{fd}", ME)
    return table


async def test_a_cid_claims_its_three_sockets_once() -> None:
    table = _table()
    entry = table.add(8, "sock8", ME)
    watched = table._entries[5].watch
    assert table.claim(b"6 5 7") == ("sock6", "sock5", "sock7")
    assert watched.cancel_called, "whoever watched an unclaimed socket must let go of it"
    assert not entry.claimed.is_set()
    assert len(table) == 1
    with pytest.raises(ClaimRefused, match="fd 6 is not an unclaimed"):
        table.claim(b"6 5 7")
    assert not table.discard(5, "sock5"), "a claimed socket belongs to its request"


@pytest.mark.parametrize(
    ("cid", "reason"),
    [(b"5 6 9", "fd 9"), (b"5 5 6", "malformed"), (b"x", "malformed")],
)
async def test_a_refused_cid_touches_no_socket(cid: bytes, reason: str) -> None:
    table = _table()
    with pytest.raises(ClaimRefused, match=reason):
        table.claim(cid)
    assert len(table) == 3
    assert table.claim(b"5 6 7") == ("sock5", "sock6", "sock7")


async def test_sockets_of_different_processes_never_form_one_cid() -> None:
    table = _table()
    table.add(9, "other", (200, 1000, 1000))
    with pytest.raises(ClaimRefused, match="different processes"):
        table.claim(b"5 6 9")
    assert len(table) == 4


async def test_the_table_is_bounded_and_expiry_frees_a_slot() -> None:
    table = _table()
    table.add(8, "sock8", ME)
    with pytest.raises(ClaimCapReached):
        table.add(9, "sock9", ME)
    assert table.discard(8, "sock8")
    assert not table.discard(8, "sock8")
    assert not table.discard(5, "not the socket at fd 5")
    table.add(9, "sock9", ME)


async def test_one_process_or_user_over_its_cap_leaves_room_for_the_others() -> None:
    table: ClaimTable[int] = ClaimTable(ClaimCaps(per_process=3, per_user=5, total=8))
    for fd in (1, 2, 3):
        table.add(fd, fd, (100, 1000, 1000))
    with pytest.raises(ClaimCapReached, match="per-process cap of 3") as hit:
        table.add(4, 4, (100, 1000, 1000))
    assert (hit.value.cap, hit.value.limit) == ("per-process", 3)
    # Another process of the same user still gets sockets, up to the user's cap.
    table.add(4, 4, (101, 1000, 1000))
    table.add(5, 5, (101, 1000, 1000))
    with pytest.raises(ClaimCapReached, match="per-user cap of 5"):
        table.add(6, 6, (102, 1000, 1000))
    # Another user still does, up to the total.
    for fd in (6, 7, 8):
        table.add(fd, fd, (300 + fd, 2000, 2000))
    with pytest.raises(ClaimCapReached, match="total cap of 8"):
        table.add(9, 9, (400, 3000, 3000))
    # A claim or a release gives the peer its room back.
    assert table.claim(b"1 2 3") == (1, 2, 3)
    table.add(9, 9, (100, 1000, 1000))
    assert table.discard(4, 4)
    table.add(10, 10, (101, 1000, 1000))


def test_the_default_caps_keep_room_for_other_processes_and_users() -> None:
    caps = ClaimCaps()
    assert 3 <= caps.per_process < caps.per_user < caps.total
    assert caps.per_process % 3 == caps.total % 3 == 0


# -- request ids dom0 may still hold --------------------------------------------------


def test_a_free_ident_goes_to_dom0_as_it_is_and_a_leased_one_gets_a_derived_form() -> None:
    leases = DomRequests()
    assert leases.lease(b"SOCKET13")[0] == b"SOCKET13"
    assert leases.lease(b"SOCKET13")[0] == b"SOCKET13.2"
    assert leases.lease(b"SOCKET13")[0] == b"SOCKET13.3"
    assert leases.lease(b"SOCKET14")[0] == b"SOCKET14"
    longest = format_cid((999999999, 1000000000, 1000000001))
    assert leases.lease(longest)[0] == longest
    derived = leases.lease(longest)[0]
    assert derived == longest[:29] + b".2"
    _trigger(derived).encode()  # a valid request id
    assert len(leases) == 6


async def test_a_lease_lasts_until_dom0_answers_even_after_its_requester_gave_up() -> None:
    leases = DomRequests()
    wire, _ = leases.lease(b"1 2 3")
    leases.done(wire, at_dom0=True)  # gave up waiting: dom0 still decides
    assert wire in leases
    leases.answer(wire, None, "SERVICE_REFUSED")  # the late answer ends it
    assert wire not in leases
    # Answered in time, or never sent: no lease afterwards.
    wire, pending = leases.lease(b"1 2 3")
    connect = ServiceConnect(0, 513, wire)
    leases.answer(wire, connect, "SERVICE_CONNECT")
    assert pending.answer == connect
    leases.done(wire, at_dom0=True)
    wire, _ = leases.lease(b"1 2 3")
    leases.done(wire, at_dom0=False)
    assert len(leases) == 0


async def test_control_loss_ends_every_lease_and_refuses_the_waiting() -> None:
    leases = DomRequests()
    gave_up, _ = leases.lease(b"SOCKET13")
    leases.done(gave_up, at_dom0=True)
    waiting, pending = leases.lease(b"SOCKET14")
    leases.control_lost()
    assert pending.answered.is_set() and pending.answer is None
    leases.done(waiting, at_dom0=True)
    assert len(leases) == 0


class FakeControl:
    """dom0's side of the control link: records the triggers; answers are the test's."""

    def __init__(self, version: int | None = 4) -> None:
        self.control_version = version
        self._send, self._triggers = trio.open_memory_channel[TriggerService](1000)

    async def send_control(self, event: Event) -> bool:
        if self.control_version is None:
            return False
        if isinstance(event, TriggerService):
            self._send.send_nowait(event)
        return True

    async def next_trigger(self) -> TriggerService:
        with trio.fail_after(WAIT):
            return await self._triggers.receive()


def _vm_requests(control: FakeControl, timeouts: Timeouts, agent_socket: str) -> VmRequests:
    # The request side uses its backend only for the data vchan of an allowed call.
    backend = cast(VchanBackend, SimpleNamespace(own_domain=5))
    return VmRequests(backend, control, RequestPaths.beside(agent_socket), timeouts=timeouts,
                      registry=ConnectionRegistry(cleanup_timeout=1))


def _trigger(ident: bytes) -> TriggerService:
    return TriggerService(4, b"", b"dom0", ident, b"test.Echo")


async def test_an_id_dom0_may_still_hold_is_never_sent_again(autojump_clock: MockClock) -> None:
    control = FakeControl()
    requests = _vm_requests(control, Timeouts(request_answer=5), "/nonexistent/qrexec-agent")
    # dom0 does not answer in time: the requester gives up, dom0 may still decide.
    assert await requests._ask_dom0(_trigger(b"SOCKET13")) is None
    assert (await control.next_trigger()).request_id == b"SOCKET13"
    # The next client got fd 13 again: dom0 hears of it under another id, and
    # its answer comes back to this request.
    answers: list[ServiceConnect | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _collect(answers, requests, b"SOCKET13"))
        second = await control.next_trigger()
        assert second.request_id == b"SOCKET13.2"
        requests.connect(ServiceConnect(0, 513, second.request_id))
    assert answers == [ServiceConnect(0, 513, b"SOCKET13.2")]
    # The late answer to the first releases its id.
    requests.refuse(b"SOCKET13")
    assert await requests._ask_dom0(_trigger(b"SOCKET13")) is None
    assert (await control.next_trigger()).request_id == b"SOCKET13"
    # So does the loss of the control link: a new daemon knows no old request.
    requests.control_lost()
    assert await requests._ask_dom0(_trigger(b"SOCKET13")) is None
    assert (await control.next_trigger()).request_id == b"SOCKET13"


async def _collect(answers: list[ServiceConnect | None], requests: VmRequests,
                   ident: bytes) -> None:
    answers.append(await requests._ask_dom0(_trigger(ident)))


# -- the R2 path, served in-process -------------------------------------------------------


@asynccontextmanager
async def _serving(tmp: Path, control: FakeControl, timeouts: Timeouts,
                   ) -> AsyncIterator[VmRequests]:
    requests = _vm_requests(control, timeouts, str(tmp / "qrexec-agent"))
    async with trio.open_nursery() as nursery:
        await nursery.start(requests.serve)
        yield requests
        nursery.cancel_scope.cancel()


async def _receive_all(stream: trio.abc.ReceiveStream, size: int | None = None) -> bytes:
    """Until EOF, or ``size`` bytes."""
    data = b""
    with trio.fail_after(WAIT):
        while size is None or len(data) < size:
            try:
                chunk = await stream.receive_some()
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                break
            data += chunk
    return data


async def _fdpass_socket(requests: VmRequests) -> tuple[trio.SocketStream, int]:
    stream = await trio.open_unix_socket(requests.paths.fdpass)
    number = await _receive_all(stream, FD_NUMBER.size)
    assert len(number) == FD_NUMBER.size, "the agent closed the socket before its number"
    return stream, int(FD_NUMBER.unpack(number)[0])


async def _r2_sockets(requests: VmRequests) -> tuple[bytes, list[trio.SocketStream]]:
    """A caller's three sockets, before its record; returns their CID and the sockets."""
    streams, numbers = [], []
    for _ in range(3):
        stream, number = await _fdpass_socket(requests)
        streams.append(stream)
        numbers.append(number)
    return format_cid((numbers[0], numbers[1], numbers[2])), streams


async def _r2_call(requests: VmRequests) -> tuple[bytes, list[trio.SocketStream]]:
    """A caller's three sockets and its record; returns its CID and the sockets."""
    cid, streams = await _r2_sockets(requests)
    _write_record(requests, cid)
    return cid, streams


def _write_record(requests: VmRequests, cid: bytes) -> None:
    fifo = os.open(requests.paths.fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fifo, encode_fifo_record(b"test.Echo", b"dom0", cid))
    finally:
        os.close(fifo)


async def test_sockets_their_clients_closed_never_crowd_out_a_caller(short_tmp: Path) -> None:
    # No dom0: every request is refused, which the caller hears only if its CID
    # claimed its sockets. Unclaimed sockets would otherwise wait 600 s.
    async with _serving(short_tmp, FakeControl(None), Timeouts(cid_claim=600)) as requests:
        for n in range(1000):
            stream = await trio.open_unix_socket(requests.paths.fdpass)
            if n % 2:  # half read their number first
                await _receive_all(stream, FD_NUMBER.size)
            await stream.aclose()
        await wait_all_tasks_blocked()
        assert len(requests._unclaimed) == 0, "closed sockets are still held"
        cid, streams = await _r2_call(requests)
        assert _read(await _receive_all(streams[2])) == [ServiceRefused(cid)]
        for stream in streams:
            await stream.aclose()


async def test_a_client_that_wrote_or_half_closed_keeps_its_sockets(short_tmp: Path) -> None:
    async with _serving(short_tmp, FakeControl(None), Timeouts(cid_claim=600)) as requests:
        stdin, first = await _fdpass_socket(requests)
        await stdin.send_eof()  # its input was empty
        # The program wrote its output and exited before the agent read its record
        # (written and closed at once, before the agent could look).
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(requests.paths.fdpass)
        with trio.fail_after(WAIT):
            await trio.lowlevel.wait_readable(raw)
        second = int(FD_NUMBER.unpack(raw.recv(FD_NUMBER.size, socket.MSG_WAITALL))[0])
        raw.send(b"output")
        raw.close()
        status, third = await _fdpass_socket(requests)
        await wait_all_tasks_blocked()
        assert len(requests._unclaimed) == 3
        cid = format_cid((first, second, third))
        _write_record(requests, cid)
        assert _read(await _receive_all(status)) == [ServiceRefused(cid)]
        await stdin.aclose()
        await status.aclose()


async def test_sockets_closed_after_their_record_was_written_are_still_claimed(
    short_tmp: Path,
) -> None:
    # A caller whose program exits at once closes sockets 0 and 1 right after
    # writing the record: whichever the agent sees first, the record wins, even
    # behind other records (the agent reads a few per wake-up). trio runs what
    # became ready together in either order, so a few rounds see both.
    async with _serving(short_tmp, FakeControl(None), Timeouts(cid_claim=600)) as requests:
        for _ in range(20):
            cid, streams = await _r2_sockets(requests)
            for _ in range(100):
                _write_record(requests, b"0 1 2")  # names no unclaimed socket: refused
            _write_record(requests, cid)
            streams[0].socket.close()
            streams[1].socket.close()
            assert _read(await _receive_all(streams[2])) == [ServiceRefused(cid)]
            for stream in streams:
                await stream.aclose()


_HOLDER = """
import socket, sys
held = []
for _ in range(int(sys.argv[2])):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    if len(sock.recv(4, socket.MSG_WAITALL)) == 4:
        held.append(sock)
    else:
        sock.close()
print(len(held), flush=True)
sys.stdin.read()
"""


async def test_a_process_holding_sockets_open_blocks_only_itself(short_tmp: Path) -> None:
    async with _serving(short_tmp, FakeControl(None), Timeouts(cid_claim=600)) as requests:
        # Another process tries to take every slot there is, and keeps them.
        holder = await trio.lowlevel.open_process(
            [sys.executable, "-c", _HOLDER, requests.paths.fdpass, "800"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert holder.stdin is not None and holder.stdout is not None
        try:
            line = b""
            with trio.fail_after(WAIT):
                while not line.endswith(b"\n"):
                    chunk = await holder.stdout.receive_some()
                    assert chunk, "the holder died"
                    line += chunk
            assert int(line) == ClaimCaps().per_process
            cid, streams = await _r2_call(requests)
            assert _read(await _receive_all(streams[2])) == [ServiceRefused(cid)]
            for stream in streams:
                await stream.aclose()
        finally:
            await holder.stdin.aclose()
            with trio.fail_after(WAIT):
                await holder.wait()


async def test_a_reused_cid_reaches_dom0_under_another_id_and_its_client_hears_its_own(
    short_tmp: Path,
) -> None:
    control = FakeControl()
    async with _serving(short_tmp, control, Timeouts(request_answer=0.2)) as requests:
        cid, streams = await _r2_call(requests)
        assert (await control.next_trigger()).request_id == cid
        # dom0 does not answer in time: the agent refuses, dom0 may still decide.
        assert _read(await _receive_all(streams[2])) == [ServiceRefused(cid)]
        for stream in streams:
            await stream.aclose()
        await wait_all_tasks_blocked()
        again, streams = await _r2_call(requests)
        assert again == cid, "the next caller was expected to get the same fd numbers"
        second = await control.next_trigger()
        assert second.request_id == cid + b".2"
        requests.refuse(second.request_id)
        assert _read(await _receive_all(streams[2])) == [ServiceRefused(cid)]
        for stream in streams:
            await stream.aclose()


# -- the status channel (agent -> qrexec-client-vm) ---------------------------------------
# Its grammar lives in MessageReader(Direction.AGENT_TO_CLIENT_VM); the full
# set of rules is in tests/protocol/test_framing.py. Here, what the two
# programs send each other.


def _read(data: bytes) -> list[Event]:
    reader = MessageReader(Direction.AGENT_TO_CLIENT_VM)
    got = []
    # Byte by byte: the reader must reassemble frames from any split.
    for byte in data:
        reader.feed(bytes([byte]))
        while (event := reader.next_event()) is not None:
            got.append(event)
    reader.feed_eof()
    assert reader.next_event() is None
    assert reader.at_clean_eof, "the channel ended inside a message"
    return got


def test_status_channel_carries_stderr_then_one_outcome() -> None:
    data = Data(Stream.STDERR, b"oops\n").encode() + ExitCode(-1).encode()
    assert data == (encode_frame(MsgType.DATA_STDERR, b"oops\n")
                    + encode_frame(MsgType.DATA_EXIT_CODE, struct.pack("<i", -1)))
    assert _read(data) == [Data(Stream.STDERR, b"oops\n"), ExitCode(-1)]
    refusal = ServiceRefused(b"1 2 3").encode()
    assert refusal == encode_frame(MsgType.SERVICE_REFUSED, b"1 2 3".ljust(32, b"\0"))
    assert _read(refusal) == [ServiceRefused(b"1 2 3")]


def test_status_channel_may_end_without_an_outcome() -> None:
    # The request was never answered: the client reports that, not a protocol error.
    assert _read(Data(Stream.STDERR, b"partial").encode()) == [Data(Stream.STDERR, b"partial")]
    assert _read(b"") == []


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param(ExitCode(0).encode() + Data(Stream.STDERR, b"late").encode(), "header",
                     id="stderr-after-exit"),
        pytest.param(ServiceRefused(b"1 2 3").encode() + ExitCode(0).encode(), "header",
                     id="exit-after-refusal"),
        pytest.param(ExitCode(0).encode() * 2, "header", id="two-exits"),
        pytest.param(encode_frame(MsgType.DATA_STDOUT, b"x"), "header.type", id="stdout"),
        pytest.param(Hello(4).encode(), "header.type", id="hello"),
        pytest.param(Data(Stream.STDERR, b"").encode(), "header.len", id="empty-stderr"),
        pytest.param(encode_frame(MsgType.DATA_EXIT_CODE, b"\0\0\0\0\0"), "header.len",
                     id="long-exit-code"),
        pytest.param(encode_frame(MsgType.DATA_EXIT_CODE, b"\0\0"), "header.len",
                     id="short-exit-code"),
        pytest.param(encode_frame(MsgType.SERVICE_REFUSED, b"1 2 3"), "header.len",
                     id="unpadded-refusal"),
        pytest.param(encode_frame(MsgType.SERVICE_REFUSED, b"1/2".ljust(32, b"\0")),
                     "request_id", id="refusal-with-a-bad-cid"),
        pytest.param(ExitCode(0).encode()[:-1], "payload", id="cut-short"),
    ],
)
def test_status_channel_rejects_anything_else(data: bytes, field: str) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        _read(data)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("argv", "target", "service", "prog"),
    [
        (["-t", "vm", "svc", "prog", "-t", "--x"], "vm", "svc", ["prog", "-t", "--x"]),
        (["-a", "/s", "vm", "-t", "svc"], "vm", "-t", ["svc"]),
        (["--prefix-data", "-x", "vm", "svc"], "vm", "svc", []),
        # Usage errors: no operands; -p twice (the reference refuses it too).
        (["-t"], None, None, None),
        (["--prefix-data", "-x", "-p", "-y", "vm", "svc"], None, None, None),
        (["--", "vm", "svc", "-p"], "vm", "svc", ["-p"]),
        # getopt_long's forms: a long name's prefix, its value the next argument.
        (["--prefix", "-x", "vm", "svc", "--", "-a"], "vm", "svc", ["--", "-a"]),
        (["-tp-x", "vm", "svc"], "vm", "svc", []),
    ],
)
def test_options_stop_at_the_first_operand(
    argv: list[str], target: str | None, service: str | None, prog: list[str] | None
) -> None:
    parser = client_vm.build_parser()
    if target is None:
        with pytest.raises(SystemExit) as stopped:
            parser.parse_args(argv)
        assert stopped.value.code == client_vm.EXIT_USAGE
        return
    args = parser.parse_args(argv)
    assert (args.target, args.service, args.prog) == (target, service, prog)
    assert args.prefix_data == ("-x" if {"-x", "-tp-x"} & set(argv) else None)


@pytest.mark.parametrize(("raw", "target"), [("", b"@default"), ("$dispvm:dvm", b"@dispvm:dvm"),
                                             ("work", b"work")])
def test_target_spelling(raw: str, target: bytes) -> None:
    assert _vm_call.call_target(raw) == target
