"""Bytes per second through one vchan, for each backend, beside a plain unix-socket copy.

Part 1: one vchan (64 KiB rings), server and client in this process, a sender
task and a receiver task, N MiB in 64 KiB writes; the baseline is the same
copy through a trio unix socketpair, in the same run.
Part 2: the same bytes through a full dom0 -> VM ``qrexec-client ... cat`` in a
local world running on each backend.

Run: .venv/bin/python bench/bench_vchan.py [--mib 256]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import trio
from _world import BIN, program_env, running_world

from qrexec_trio.xen import VchanError, get_backend

CHUNK = 65536


async def _copy(sender: trio.abc.SendStream, receiver: trio.abc.ReceiveStream,
                total: int) -> float:
    block = bytes(CHUNK)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            for _ in range(total // CHUNK):
                await sender.send_all(block)

        nursery.start_soon(send)
        received = 0
        while received < total:
            received += len(await receiver.receive_some(CHUNK + 8))
    return time.perf_counter() - started


async def _socketpair_seconds(total: int) -> float:
    left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a, b = trio.SocketStream(left), trio.SocketStream(right)
    try:
        return await _copy(a, b, total)
    finally:
        await a.aclose()
        await b.aclose()


async def _vchan_seconds(name: str, directory: str, total: int) -> float:
    os.environ.update(VCHAN_SOCKET_DIR=directory, VCHAN_DOMAIN="0")
    dom0 = get_backend(name)
    os.environ["VCHAN_DOMAIN"] = "42"
    vm = get_backend(name)
    listener = dom0.listen(42, 900, read_min=65536, write_min=65536)
    async with trio.open_nursery() as nursery:
        accepted = []

        async def accept() -> None:
            accepted.append(await listener.accept(10))

        nursery.start_soon(accept)
        client = await vm.connect(0, 900, timeout=10)
    server = accepted[0]
    try:
        return await _copy(client, server, total)
    finally:
        await client.aclose()
        await server.aclose()


def _call_seconds(name: str, workdir: Path, source: Path) -> float:
    with running_world(workdir / f"world-{name}", vchan=name) as state:
        argv = [str(BIN / "qrexec-client"), "--socket-dir", state["socket_dir"], "-d",
                "server", "DEFAULT:cat"]
        started = time.perf_counter()
        with open(source, "rb") as stdin:
            subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL,
                           env=program_env(state, 0), check=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    total = args.mib * 1024 * 1024
    names = ["socket", "shm"] + (["xen"] if os.path.exists("/dev/xen") else [])
    with tempfile.TemporaryDirectory(prefix="qbench-") as tmp:
        workdir = Path(tmp)
        baseline = trio.run(_socketpair_seconds, total)
        print(f"one vchan, {args.mib} MiB, 64 KiB rings "
              f"(baseline: unix socketpair {args.mib / baseline:7.1f} MiB/s):")
        for name in names:
            try:
                seconds = trio.run(_vchan_seconds, name, tmp, total)
            except VchanError as exc:
                print(f"  {name:<7} unavailable: {exc}")
                continue
            print(f"  {name:<7} {args.mib / seconds:7.1f} MiB/s")
        source = workdir / "payload"
        source.write_bytes(bytes(total))
        print(f"dom0 -> VM qrexec-client cat, {args.mib} MiB in and out:")
        for name in names:
            seconds = _call_seconds(name, workdir, source)
            print(f"  {name:<7} {args.mib / seconds:7.1f} MiB/s")


if __name__ == "__main__":
    main()
