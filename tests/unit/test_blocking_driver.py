"""The clients' blocking driver, one layer: CallerLoop between local pipes and a vchan
whose service side a thread plays: over a unix socket pair (the socket backend's wire),
or over a real shm vchan that the driver serves and trio's shm backend connects to."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
from _socket import socket as raw_socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from qrexec_trio.blocking import _call, _client_vm
from qrexec_trio.blocking._io import CallerLoop, exchange_hello
from qrexec_trio.blocking._vchan import BlockingVchan, backend_problem, serve_one
from qrexec_trio.protocol import (
    CallerSession,
    Data,
    Direction,
    ExitCode,
    Hello,
    MessageReader,
    Stream,
)
from qrexec_trio.xen import VchanError

TIMEOUT = 30


class Service:
    """The service side of the data vchan, in a thread: reads STDIN, answers per ``play``."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.reader = MessageReader(Direction.CALLER_TO_SERVICE)
        self.stdin = bytearray()
        self.stdin_ended = threading.Event()

    def handshake(self) -> None:
        self.sock.sendall(Hello(3).encode())
        assert isinstance(self.next(), Hello)
        self.reader.version = 3

    def next(self) -> object:
        while (event := self.reader.next_event()) is None:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.reader.feed(data)
        return event

    def read_stdin(self) -> None:
        while (event := self.next()) is not None:
            assert isinstance(event, Data) and event.stream == Stream.STDIN
            if not event.data:
                self.stdin_ended.set()
                return
            self.stdin += event.data

    def send(self, *events: Data | ExitCode) -> None:
        self.sock.sendall(b"".join(event.encode() for event in events))


class TrioVchanSocket:
    """A trio vchan's client end, as the blocking socket calls :class:`Service` makes.

    The service thread's calls go to a trio run in a thread of its own, which
    connects to the vchan the driver serves (ring backends only have that).
    """

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._vchan: Any = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()

    async def _main(self) -> None:
        self._vchan = await self._connect()
        self.token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await trio.to_thread.run_sync(self._done.wait)
        await self._vchan.aclose()

    def _call(self, method: str, *args: object) -> Any:
        """The vchan's ``method`` run in its trio thread, once it is connected."""
        assert self._ready.wait(TIMEOUT), "the service side did not connect"
        return trio.from_thread.run(getattr(self._vchan, method), *args,
                                    trio_token=self.token)

    def sendall(self, data: bytes) -> None:
        self._call("send_all", data)

    def recv(self, size: int) -> bytes:
        data: bytes = self._call("receive_some", size)
        return data

    def shutdown(self, how: int) -> None:
        self.close()  # a vchan has no half-close

    def close(self) -> None:
        if self._ready.is_set() and not self._done.is_set():
            self._call("aclose")
        self._done.set()
        self._thread.join(TIMEOUT)


@pytest.fixture(params=["socket", "shm", "shm-1k-ring"])
def vchan_kind(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend of the data vchan (the ring one with a small ring too, to
    make the ring fill and empty many times a call)."""
    kind: str = request.param
    if kind.startswith("shm"):
        use_shm(tmp_path, monkeypatch)
    return kind


def use_shm(socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocking driver serves shm vchans in ``socket_dir``, as domain 0."""
    pytest.importorskip("qrexec_trio.xen._shm_cffi", reason="the shm extension is not built")
    monkeypatch.setenv("QREXEC_VCHAN", "shm")
    monkeypatch.setenv("VCHAN_SOCKET_DIR", str(socket_dir))
    monkeypatch.setenv("VCHAN_DOMAIN", "0")


def _open_vchan(kind: str) -> tuple[Any, Any]:
    """(the caller's vchan, the service side's end of it)."""
    if kind == "socket":
        ours, theirs = socket.socketpair()
        return BlockingVchan(raw_socket(fileno=ours.detach()), 1, 513), theirs
    return _open_shm(1024 if kind == "shm-1k-ring" else 65536)


def _open_shm(read_min: int, write_min: int = 65536) -> tuple[Any, TrioVchanSocket]:
    """A shm vchan the driver serves (as domain 0), and its client end (domain 1)."""
    from qrexec_trio.xen._shm import ShmBackend  # compiled: loaded only when used

    backend = ShmBackend(own_domain=1)
    theirs = TrioVchanSocket(lambda: backend.connect(0, 513, timeout=TIMEOUT))
    try:
        return serve_one(1, 513, timeout=TIMEOUT, read_min=read_min, write_min=write_min), theirs
    except BaseException:
        theirs.close()
        raise


@contextmanager
def call(play: Callable[[Service], None], *, stdin: bytes | None, kind: str = "socket",
         keep_stdin_open: bool = False) -> Iterator[dict[str, object]]:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    result: dict[str, object] = {"closed": 0}
    collected: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray()}

    def drain(fd: int) -> None:
        while data := os.read(fd, 65536):
            collected[fd] += data

    def feed() -> None:
        # The call may end without reading all of it: then the pipe breaks (below).
        with suppress(BrokenPipeError):
            if stdin:
                os.write(in_w, stdin)
        if not keep_stdin_open:
            os.close(in_w)

    def serve() -> None:
        service.handshake()
        play(service)

    vchan, theirs = _open_vchan(kind)
    service = Service(theirs)
    threads = [threading.Thread(target=target, args=args, daemon=True) for target, args in (
        (drain, (out_r,)), (drain, (err_r,)), (feed, ()), (serve, ()))]
    for thread in threads:
        thread.start()

    def close_output() -> None:
        result["closed"] = int(result["closed"]) + 1  # type: ignore[call-overload]
        os.close(out_w)

    try:
        reader = exchange_hello(vchan, timeout=TIMEOUT)
        session = CallerSession(reader.version or 2)
        loop = CallerLoop(vchan, reader, session, input_fd=in_r, output_fd=out_w,
                          errors_fd=err_w, close_output=close_output)
        result["status"] = loop.run()
        loop.finish_input(1)
        vchan.close()
        if not result["closed"]:
            os.close(out_w)
        os.close(err_w)
        os.close(in_r)
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
        result["stdout"] = bytes(collected[out_r])
        result["stderr"] = bytes(collected[err_r])
        result["stdin"] = bytes(service.stdin)
        yield result
    finally:
        theirs.close()
        for fd in (out_r, err_r) + ((in_w,) if keep_stdin_open else ()):
            os.close(fd)


def _echo(service: Service) -> None:
    service.read_stdin()
    data = bytes(service.stdin)
    service.send(*(Data(Stream.STDOUT, data[start:start + 65536])
                   for start in range(0, len(data), 65536)))
    service.send(Data(Stream.STDERR, b"note"), Data(Stream.STDOUT, b""),
                 Data(Stream.STDERR, b""), ExitCode(5))


def test_a_call_copies_both_ways_and_returns_the_remote_status(vchan_kind: str) -> None:
    with call(_echo, stdin=b"hello", kind=vchan_kind) as result:
        assert result["status"] == 5
        assert (result["stdout"], result["stderr"], result["closed"]) == (b"hello", b"note", 1)


def test_megabytes_both_ways_arrive_whole_through_backpressure(vchan_kind: str) -> None:
    payload = os.urandom(4 << 20)
    with call(_echo, stdin=payload, kind=vchan_kind) as result:
        assert hashlib.sha256(result["stdout"]).digest() == hashlib.sha256(payload).digest()


def test_the_exit_status_ends_the_call_while_our_input_is_still_open(vchan_kind: str) -> None:
    def answer_at_once(service: Service) -> None:
        service.send(Data(Stream.STDOUT, b""), ExitCode(0))
        service.read_stdin()  # our input's end comes after the status, best effort

    with call(answer_at_once, stdin=b"partial", kind=vchan_kind,
              keep_stdin_open=True) as result:
        assert result["status"] == 0


def test_a_vchan_that_ends_before_the_status_gives_none(vchan_kind: str) -> None:
    def vanish(service: Service) -> None:
        service.send(Data(Stream.STDOUT, b"half"))
        service.sock.close()

    with call(vanish, stdin=b"", kind=vchan_kind) as result:
        assert (result["status"], result["stdout"]) == (None, b"half")


def test_a_service_side_that_never_reads_our_input_still_reports_its_status(
        vchan_kind: str) -> None:
    def refuse_input(service: Service) -> None:
        service.send(Data(Stream.STDOUT, b""), Data(Stream.STDERR, b"no such service"),
                     ExitCode(127))
        service.sock.shutdown(socket.SHUT_RDWR)

    with call(refuse_input, stdin=os.urandom(1 << 20), kind=vchan_kind) as result:
        assert (result["status"], result["stderr"]) == (127, b"no such service")


# -- the ring backends: the driver's own checks -------------------------------------------

_CALLER = textwrap.dedent("""
    import os, sys
    from qrexec_trio.blocking._io import CallerLoop, exchange_hello
    from qrexec_trio.blocking._vchan import serve_one
    from qrexec_trio.protocol import CallerSession

    vchan = serve_one(1, 513, timeout=30)
    reader = exchange_hello(vchan, timeout=30)
    loop = CallerLoop(vchan, reader, CallerSession(reader.version), input_fd=0, output_fd=1,
                      errors_fd=2, close_output=lambda: None)
    status = loop.run()
    vchan.close()
    heavy = sorted({"trio", "socket", "cffi"} & set(sys.modules))
    os.write(2, f"|{status} {type(vchan).__name__} {heavy}".encode())
""")


def test_a_shm_call_in_a_client_process_loads_neither_trio_nor_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_shm(tmp_path, monkeypatch)
    from qrexec_trio.xen._shm import ShmBackend  # compiled: loaded only when used

    backend = ShmBackend(own_domain=1)
    theirs = TrioVchanSocket(lambda: backend.connect(0, 513, timeout=TIMEOUT))
    service = Service(theirs)

    def play() -> None:
        service.handshake()
        _echo(service)

    played = threading.Thread(target=play, daemon=True)
    played.start()
    try:
        result = subprocess.run([sys.executable, "-c", _CALLER], input=b"ring data",
                                capture_output=True, timeout=TIMEOUT, check=False)
        played.join(TIMEOUT)
    finally:
        theirs.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"ring data"
    assert result.stderr.rsplit(b"|", 1)[1] == b"5 RingBlockingVchan []"


def test_backend_problem_names_what_the_driver_cannot_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("socket", "shm"):
        monkeypatch.setenv("QREXEC_VCHAN", name)
        assert backend_problem() is None, name
    # The xen extension is built where libxenvchan.h is (CI installs it and
    # sets QREXEC_REQUIRE_XEN_BUILD=1); elsewhere the driver says why not.
    monkeypatch.setenv("QREXEC_VCHAN", "xen")
    if os.path.exists("/usr/include/libxenvchan.h") \
            or os.environ.get("QREXEC_REQUIRE_XEN_BUILD") == "1":
        assert backend_problem() is None
    else:
        assert backend_problem() == ("the xen backend was not built "
                                     "(libxenvchan.h missing at install time)")
    monkeypatch.setenv("QREXEC_VCHAN", "carrier-pigeon")
    assert backend_problem() == "there is no 'carrier-pigeon' vchan backend"


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(os.path.isdir("/dev/xen"), reason="shows the failure without Xen")
def test_serving_on_xen_without_xen_fails_clearly_and_leaks_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("qrexec_trio.xen._xen_cffi", reason="the xen extension is not built")
    monkeypatch.setenv("QREXEC_VCHAN", "xen")
    fds = _open_fds()
    with pytest.raises(VchanError) as info:
        serve_one(0, 513, timeout=TIMEOUT)
    assert str(info.value) == (
        "libxenvchan_server_init failed for vchan port 513 to domain 0: "
        "No such file or directory (is this a Xen domain? /dev/xen is missing)")
    assert _open_fds() == fds


@pytest.mark.parametrize(("peer", "port", "ring", "message"), [
    (0, 513, 3, "read_min 3 is not a power of two"),
    (0, 513, 2 << 20, "read_min 2097152 is not a power of two between 1 and 1048576"),
    (-1, 513, 4096, "peer domain -1 is not a Xen domain id"),
    (0, -1, 4096, "vchan port -1 is out of range"),
])
def test_serving_on_xen_refuses_bad_input_before_xen_is_touched(
        monkeypatch: pytest.MonkeyPatch, peer: int, port: int, ring: int, message: str) -> None:
    pytest.importorskip("qrexec_trio.xen._xen_cffi", reason="the xen extension is not built")
    monkeypatch.setenv("QREXEC_VCHAN", "xen")
    with pytest.raises(VchanError, match=message):
        serve_one(peer, port, timeout=TIMEOUT, read_min=ring, write_min=ring)


@pytest.mark.parametrize(("ring", "order"), [(1024, 10), (4096, 12), (1 << 20, 20)])
def test_a_shm_vchan_gets_the_rings_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ring: int, order: int) -> None:
    use_shm(tmp_path, monkeypatch)
    vchan, theirs = _open_shm(ring)
    try:
        header = vchan._driver.header()
        assert (header.left_order, header.right_order) == (order, 16)
    finally:
        vchan.close()
        theirs.close()


def test_a_shm_offer_nobody_takes_times_out_and_is_withdrawn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_shm(tmp_path, monkeypatch)
    fds = _open_fds()
    with pytest.raises(VchanError, match=r"did not connect to vchan port 513 within 0\.05s"):
        serve_one(1, 513, timeout=0.05)
    assert _open_fds() == fds
    # Withdrawn: no socket left under the name, and the marker tells a late client.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "vchan.0.1.513.sock.withdrawn"]


def test_the_vm_client_sizes_the_rings_from_buffer_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: dict[str, int] = {}

    class Stop(Exception):
        pass

    def fake_serve_one(domain: int, port: int, **kwargs: int) -> None:
        asked.update(kwargs)
        raise Stop

    trigger = socket.socket()
    monkeypatch.setattr(_client_vm, "ask_agent", lambda *args: (trigger, 1, 513))
    monkeypatch.setattr(_call, "serve_one", fake_serve_one)
    args = SimpleNamespace(agent_socket="unused", buffer_size=5000, prefix_data=None,
                           filter_stdout=False, filter_stderr=False)
    with pytest.raises(Stop):
        _client_vm._trigger_call(args, b"", SimpleNamespace(  # type: ignore[arg-type]
            data_vchan_connect=1.0))
    assert (asked["read_min"], asked["write_min"]) == (8192, 8192)
    assert trigger.fileno() == -1  # closed on the way out


class _FailingEvents:
    """A ring driver with nothing to read whose event channel fails on the first wait."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read_into(self, buffer: bytearray, size: int) -> int:
        return 0

    def data_ready(self) -> int:
        return 0

    def wait(self) -> None:
        raise OSError(5, "vchan event channel failed: Input/output error")

    def fd_for_select(self) -> int:
        return self._fd

    def close(self) -> None:
        pass


async def test_the_trio_ring_wrapper_reports_a_failing_event_channel_as_broken() -> None:
    # The drivers raise plain OSError (they are shared with the blocking driver);
    # to trio code a ring vchan whose events fail is a broken stream.
    from qrexec_trio.xen._ring import RingVchan

    readable, writer = os.pipe()
    os.write(writer, b"x")  # the event fd fires at once
    try:
        vchan = RingVchan(_FailingEvents(readable), 1, 513)  # type: ignore[arg-type]
        with trio.fail_after(TIMEOUT), pytest.raises(trio.BrokenResourceError,
                                                     match="event channel failed"):
            await vchan.receive_some(10)
    finally:
        os.close(readable)
        os.close(writer)
