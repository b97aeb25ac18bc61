"""The call API's own logic: lazy export, argument checks (before any I/O),
where a call is made from, and the local stream adapters."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import qrexec_trio
from qrexec_trio._api import CallError
from qrexec_trio._api._call import _in_dom0
from qrexec_trio._api._streams import Capture, FileSink, FileSource


def test_importing_the_package_does_not_import_trio() -> None:
    code = ("import sys, qrexec_trio; assert 'trio' not in sys.modules, 'trio imported'; "
            "qrexec_trio.call; assert 'trio' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_api_is_exported_lazily() -> None:
    assert qrexec_trio.call is qrexec_trio._api.call
    assert {"call", "call_blocking", "Capture", "CallRefused"} <= set(dir(qrexec_trio))
    with pytest.raises(AttributeError):
        qrexec_trio.no_such_name  # noqa: B018 (the attribute access is the test)


@pytest.mark.parametrize(("args", "options"), [
    (("vm2", "test.Echo+x", "y"), {}),  # two arguments
    (("vm2", "test/Echo"), {}),  # a byte no service name has
    (("vm2", "test.Echo"), {"user": "root"}),  # a VM cannot choose the user
    (("vm2", "x" * 70_000), {}),  # too long a service name
])
async def test_bad_calls_from_a_vm_fail_before_any_io(tmp_path: Path, args: tuple[str, ...],
                                                      options: dict[str, str]) -> None:
    # No agent there: a call that got as far as connecting would say so instead.
    with pytest.raises(ValueError):
        await qrexec_trio.call(*args, agent_socket=str(tmp_path / "none"), **options)


@pytest.mark.parametrize("target", ["dom0", "@adminvm"])
async def test_a_call_from_dom0_to_dom0_is_refused_before_any_io(tmp_path: Path,
                                                                 target: str) -> None:
    with pytest.raises(ValueError):
        await qrexec_trio.call(target, "test.Echo", socket_dir=str(tmp_path))


async def test_agent_socket_and_socket_dir_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        await qrexec_trio.call("vm2", "test.Echo", agent_socket=str(tmp_path / "a"),
                               socket_dir=str(tmp_path))


@pytest.mark.parametrize(("env", "agent_socket", "socket_dir", "dom0"), [
    ({"VCHAN_DOMAIN": "0"}, None, None, True),
    ({"VCHAN_DOMAIN": "12"}, None, None, False),
    ({"VCHAN_DOMAIN": "0"}, "/run/agent", None, False),  # explicit paths win
    ({"VCHAN_DOMAIN": "12"}, None, "/run/qubes", True),
])
def test_where_a_call_is_made_from(env: dict[str, str], agent_socket: str | None,
                                   socket_dir: str | None, dom0: bool) -> None:
    assert _in_dom0(env, agent_socket, socket_dir) is dom0


def test_a_domain_id_that_is_not_a_number_is_a_call_error() -> None:
    with pytest.raises(CallError, match="VCHAN_DOMAIN"):
        _in_dom0({"VCHAN_DOMAIN": "dom0"}, None, None)


async def test_capture_keeps_everything() -> None:
    capture = Capture()
    await capture.send_all(b"ab")
    await capture.send_all(memoryview(b"cd"))
    assert capture.data == b"abcd"


class ShortWrites(io.RawIOBase):
    """A raw file that takes at most two bytes per write."""

    def __init__(self) -> None:
        self.taken = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.taken += data[:2]
        return len(data[:2])


async def test_a_file_sink_writes_all_of_short_writes() -> None:
    file = ShortWrites()
    await FileSink(file).send_all(b"abcdefg")
    assert bytes(file.taken) == b"abcdefg"


@pytest.fixture
def pipe() -> Iterator[tuple[io.BufferedReader, io.FileIO]]:
    """A pipe as the files a blocking program has: buffered for reading, raw for writing."""
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader, open(write_end, "wb", buffering=0) as writer:
        yield reader, writer


async def test_a_file_source_takes_what_is_there_without_waiting_for_more(
        pipe: tuple[io.BufferedReader, io.FileIO]) -> None:
    # read1 on a buffered pipe returns what is available; read(n) would block for n.
    reader, writer = pipe
    writer.write(b"partial")
    with trio.fail_after(10):  # read(65536) would wait here for the rest, or the pipe's end
        assert await FileSource(reader).receive_some(65536) == b"partial"
    writer.close()
    assert await FileSource(reader).receive_some(65536) == b""
