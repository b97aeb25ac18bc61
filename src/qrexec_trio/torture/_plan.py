"""Planning the calls: every random choice, from the seed, before a call starts.

Call ``i`` draws from its own generator (seeded with the seed and ``i``), so
its path, ends, payload and fault parameters do not depend on how calls
interleave; which calls are faulted, and with which kind, comes from one
generator in call order: the kinds are dealt from a shuffled deck, so that
every kind selected comes round equally often.
"""

from __future__ import annotations

import math
import random
from typing import Final

from ._calls import CallPlan, FaultPlan
from ._kinds import PATH_WEIGHTS, Action, CallPath, FaultKind
from ._options import Options
from ._service import SLOW_PIECE

#: A stalled reader needs a payload that fills every buffer on the way, and a
#: slow writer one of a few pieces at least.
_LEAST_PAYLOAD: Final = {Action.STALLED_READER: 1 << 20, Action.SLOW_WRITER: 16 << 10}
#: How long a slow writer takes over its payload, about (seconds).
SLOW_TOTAL: Final = 1.0
_STOP_RANGE: Final = (0.2, 1.0)
_STALL_RANGE: Final = (0.5, 1.5)


class Planner:
    def __init__(self, options: Options, vms: list[str]) -> None:
        self._options = options
        self._vms = sorted(vms)
        self._deal = random.Random(f"{options.seed}/faults")
        self._deck: list[FaultKind] = []

    def plan(self, index: int) -> CallPlan:
        rng = random.Random(f"{self._options.seed}/{index}")
        kind = self._next_fault() if self._deal.random() < self._options.fault_rate else None
        paths = [path for path in self._options.paths if kind is None or path in kind.paths]
        path = rng.choices(paths, [PATH_WEIGHTS[path] for path in paths])[0]
        source, target = self._ends(rng, path)
        size = self._size(rng)
        if kind is not None:
            size = max(size, _LEAST_PAYLOAD.get(kind.action, 0))
        fault = None if kind is None else self._fault(rng, kind, path, size)
        payload = rng.randbytes(size)
        return CallPlan(index=index, path=path, source=source, target=target, payload=payload,
                        mode=self._mode(rng, fault, size), fault=fault)

    def _next_fault(self) -> FaultKind:
        if not self._deck:
            self._deck = list(self._options.faults)
            self._deal.shuffle(self._deck)
        return self._deck.pop()

    def _ends(self, rng: random.Random, path: CallPath) -> tuple[str | None, str]:
        if path is CallPath.DOM0_VM:
            return None, rng.choice(self._vms)
        source = rng.choice(self._vms)
        if path is CallPath.VM_DISPVM:
            return source, "@dispvm"
        return source, rng.choice([vm for vm in self._vms if vm != source])

    def _size(self, rng: random.Random) -> int:
        """Log-uniform from 0 to --max-payload: small and large payloads both come."""
        top = self._options.max_payload
        return min(top, int(2 ** rng.uniform(0, math.log2(top + 1))) - 1)

    def _fault(self, rng: random.Random, kind: FaultKind, path: CallPath,
               size: int) -> FaultPlan:
        side = rng.choice(("caller", "service"))
        pieces = max(1, math.ceil(size / SLOW_PIECE))
        pause = (rng.uniform(*_STALL_RANGE) if kind.action is Action.STALLED_READER
                 else SLOW_TOTAL / pieces)
        return FaultPlan(
            kind=kind, at=rng.randint(0, size), side=side,
            stop_for=rng.uniform(*_STOP_RANGE), then_kill=rng.random() < 0.5,
            daemon_of=rng.choice(("source", "target")) if path is not CallPath.DOM0_VM
            else "target",
            pause=pause)

    def _mode(self, rng: random.Random, fault: FaultPlan | None, size: int) -> str:
        """The service's argument: it plays the service side of a stall or a slow writer."""
        if fault is None or fault.side != "service":
            return "plain"
        if fault.kind.action is Action.STALLED_READER:
            return f"stall.{int(rng.uniform(*_STALL_RANGE) * 1000)}"
        if fault.kind.action is Action.SLOW_WRITER:
            pieces = max(1, math.ceil(size / SLOW_PIECE))
            return f"slow.{max(1, int(SLOW_TOTAL * 1000 / pieces))}"
        return "plain"
