"""Exception groups, collapsed where one error is the whole story."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import trio

from .._errors import QrexecError

#: What a role catches around one call or request (the error is logged and
#: ends that call only): ours, a timeout, a stream that broke, the OS saying no.
CALL_FAILURES: Final = (QrexecError, trio.TooSlowError, trio.BrokenResourceError,
                        trio.ClosedResourceError, OSError)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


@contextmanager
def one_error() -> Iterator[None]:
    """Re-raise a nursery's exception group as its one real error.

    trio wraps every nursery failure in a group. When the group holds exactly
    one error besides cancellations (a peer went away, a protocol violation),
    callers want to handle that error by type, so we raise it alone.
    Groups with several real errors pass through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        real = [exc for exc in _leaves(group) if not isinstance(exc, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from None
        raise
