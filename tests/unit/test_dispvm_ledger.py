"""The DispVM ledger: what a killed daemon's successor (or the world) destroys."""

from __future__ import annotations

from pathlib import Path

import trio

from qrexec_trio._config import Timeouts
from qrexec_trio.domains import DispVMLedger, DomainsError, destroy_leftovers, disposable


class _Domains:
    """Just enough of a domain manager: DispVMs by name, kills recorded."""

    def __init__(self, existing: set[str], refuse: frozenset[str] = frozenset()) -> None:
        self.existing = set(existing)
        self.refuse = set(refuse)
        self.killed: list[str] = []

    async def create_disposable(self, template: str) -> str:
        await trio.lowlevel.checkpoint()
        self.existing.add("disp7")
        return "disp7"

    async def start(self, name: str) -> None:
        await trio.lowlevel.checkpoint()

    async def kill(self, name: str) -> None:
        await trio.lowlevel.checkpoint()
        if name in self.refuse:
            raise DomainsError("QubesVMError", "busy")
        if name not in self.existing:
            raise DomainsError("QubesVMNotFoundError", name)
        self.existing.discard(name)
        self.killed.append(name)


async def test_a_dispvm_is_in_the_ledger_exactly_while_it_exists(tmp_path: Path) -> None:
    ledger = DispVMLedger(str(tmp_path / "dispvms"))
    domains = _Domains(set())
    async with disposable(domains, "dvm", Timeouts(), ledger) as name:  # type: ignore[arg-type]
        assert ledger.names() == [name]
    assert domains.killed == [name]
    assert ledger.names() == []


async def test_leftovers_are_destroyed_and_forgotten_a_failure_is_kept(tmp_path: Path) -> None:
    ledger = DispVMLedger(str(tmp_path / "dispvms"))
    for name in ("disp1", "disp2", "disp3"):
        ledger.record(name)
    ledger.record("../escape")  # not a qube name: never written
    domains = _Domains({"disp1", "disp3"}, refuse={"disp3"})
    destroyed = await destroy_leftovers(domains, ledger, Timeouts())  # type: ignore[arg-type]
    # disp2 was already gone (not found): forgotten too; disp3 refused: kept for next time.
    assert destroyed == ["disp1", "disp2"]
    assert domains.killed == ["disp1"]
    assert ledger.names() == ["disp3"]
    assert not (tmp_path / "escape").exists()
