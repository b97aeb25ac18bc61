"""``call_blocking``: :func:`call` for programs that do not run trio."""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Mapping

import trio

from ._call import Input, call
from ._streams import FileSink, FileSource, Readable, Writable


def call_blocking(
    target: str,
    service: str,
    argument: str | None = None,
    *,
    stdin: bytes | Readable | None = None,
    stdout: Writable | None = None,
    stderr: Writable | None = None,
    timeout: float | None = None,
    source: str | None = None,
    user: str | None = None,
    agent_socket: str | None = None,
    socket_dir: str | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """:func:`call`, blocking the calling thread until the call is over.

    ``stdin`` is bytes or a binary file object (anything with ``read``;
    ``read1`` is used where there is one), ``stdout`` and ``stderr``
    binary file objects (anything with ``write``; ``io.BytesIO`` captures).
    Files are never closed: they are the caller's. Files other than
    ``io.BytesIO`` are read and written in a worker thread; a read still
    waiting when the call ends (the service exited first) is abandoned.

    ``timeout`` bounds the whole call (:class:`TimeoutError`; everything is
    released). The other arguments, the result and the exceptions are
    :func:`call`'s. It runs its own trio loop (``trio.run``) in the calling
    thread, so it cannot be called from inside a trio program: use
    :func:`call` there.
    """
    source_stream: Input = stdin if stdin is None or isinstance(stdin, bytes) \
        else FileSource(stdin)
    run_call: Callable[[], Awaitable[int]] = functools.partial(
        call, target, service, argument, stdin=source_stream,
        stdout=None if stdout is None else FileSink(stdout),
        stderr=None if stderr is None else FileSink(stderr),
        source=source, user=user, agent_socket=agent_socket, socket_dir=socket_dir, env=env)
    return trio.run(_bounded, run_call, timeout)


async def _bounded(run_call: Callable[[], Awaitable[int]], timeout: float | None) -> int:
    with trio.move_on_after(math.inf if timeout is None else timeout):
        return await run_call()
    raise TimeoutError(f"the call took longer than {timeout:g}s")
