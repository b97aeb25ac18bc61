"""The rate of sequential VM -> VM calls through the in-process API (qrexec_trio.call).

Used by bench_calls.py beside the CLI's rate; runs alone too:
.venv/bin/python bench/_api_rate.py [--calls 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from _world import program_env, running_world

import qrexec_trio


def _client_keywords(state: dict[str, Any]) -> dict[str, Any]:
    """The call's keywords for a program in the world's VM ``client``."""
    client = state["vms"]["client"]
    return {"agent_socket": os.path.join(client["runtime_dir"], "qrexec-agent"),
            "env": program_env(state, client["domid"])}


def api_rate(state: dict[str, Any], calls: int) -> float:
    """Sequential calls per second from ``client`` to ``server``'s demo.Echo, one trio loop."""
    where = _client_keywords(state)

    async def run() -> float:
        # The first call is not timed: it pays for imports and first-use set-up.
        assert await qrexec_trio.call("server", "demo.Echo", **where) == 0
        started = time.perf_counter()
        for _ in range(calls):
            assert await qrexec_trio.call("server", "demo.Echo", **where) == 0
        return calls / (time.perf_counter() - started)

    return trio.run(run)


def api_blocking_rate(state: dict[str, Any], calls: int) -> float:
    """The same through call_blocking (a trio loop per call)."""
    where = _client_keywords(state)
    assert qrexec_trio.call_blocking("server", "demo.Echo", **where) == 0
    started = time.perf_counter()
    for _ in range(calls):
        assert qrexec_trio.call_blocking("server", "demo.Echo", **where) == 0
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qbench-") as tmp, \
            running_world(Path(tmp) / "world") as state:
        rate = api_rate(state, args.calls)
        blocking = api_blocking_rate(state, args.calls)
    print(f"sequential VM->VM calls through the API: call() {rate:6.1f}/s, "
          f"call_blocking() {blocking:6.1f}/s")


if __name__ == "__main__":
    main()
