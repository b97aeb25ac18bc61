"""The policy files today's dom0 ships, as a drop-in: they parse, and decide as there.

``data/stock-policy.d`` holds the stock ``/etc/qubes/policy.d`` of qubes-core-qrexec
and qubes-core-admin (each file names its origin), ``data/stock-legacy-4.0`` what
R4.0 left in ``/etc/qubes-rpc/policy`` on an upgraded dom0, which the stock
``35-compat.policy`` reads through ``!compat-4.0``. The expected decisions follow
the rules' documented meaning (comments of the files themselves, qubes-core-qrexec
``doc/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from qrexec_trio.policy import Action, DomainInfo, PolicyCache, SystemInfo, load_policy

from .helpers import decide

DATA = Path(__file__).parent / "data"
STOCK = DATA / "stock-policy.d"
LEGACY = DATA / "stock-legacy-4.0"
#: A dom0 installed fresh: /etc/qubes-rpc/policy is absent (or empty).
NO_LEGACY = DATA / "no-such-dir"

#: A typical dom0's qubes.
SYSTEM = SystemInfo.of(
    [
        DomainInfo("dom0", "AdminVM"),
        DomainInfo("sys-net", "AppVM", default_dispvm="default-dvm"),
        DomainInfo("work", "AppVM", tags=frozenset({"guivm-dom0"}), default_dispvm="default-dvm"),
        DomainInfo("personal", "AppVM", tags=frozenset({"guivm-dom0"}),
                   default_dispvm="default-dvm"),
        DomainInfo("vault", "AppVM", tags=frozenset({"guivm-dom0"})),  # no default DispVM
        DomainInfo("anon-whonix", "AppVM", tags=frozenset({"anon-vm"}),
                   default_dispvm="default-dvm"),
        DomainInfo("fedora-40", "TemplateVM", default_dispvm="default-dvm"),
        DomainInfo("whonix-gw-17", "TemplateVM", tags=frozenset({"whonix-updatevm"})),
        DomainInfo("default-dvm", "AppVM", template_for_dispvms=True,
                   default_dispvm="default-dvm"),
        DomainInfo("disp1234", "DispVM", tags=frozenset({"backup-restore-mgmt"}),
                   default_dispvm="default-dvm"),
    ]
)

#: What "@anyvm ask" offers a caller: every qube but dom0 and itself, and a new
#: DispVM from each DispVM template.
EVERY_QUBE = ("anon-whonix", "default-dvm", "disp1234", "fedora-40", "personal", "sys-net",
              "vault", "whonix-gw-17", "work", "@dispvm:default-dvm")


def offered_to(caller: str) -> tuple[str, ...]:
    return tuple(target for target in EVERY_QUBE if target != caller)


@dataclass(frozen=True)
class Row:
    source: str
    target: str
    call: str
    action: Action
    #: allow: where the call goes.
    result: str | None = None
    #: ask: what the user may choose from (None: not checked).
    choices: tuple[str, ...] | None = None
    #: deny: whether the user is told (None: not checked).
    notify: bool | None = None

    def __str__(self) -> str:
        return f"{self.source}->{self.target}:{self.call}"


ALLOW, DENY, ASK = Action.ALLOW, Action.DENY, Action.ASK
ROWS = [
    # qubes.Filecopy: ask, among every other qube
    Row("work", "@default", "qubes.Filecopy", ASK, choices=offered_to("work")),
    Row("work", "personal", "qubes.Filecopy", ASK, choices=offered_to("work")),
    Row("work", "@dispvm", "qubes.Filecopy", ASK),
    Row("disp1234", "@default", "qubes.Filecopy", ASK, choices=offered_to("disp1234")),
    Row("work", "dom0", "qubes.Filecopy", DENY),  # @anyvm never covers dom0
    # open in a new DispVM without asking, elsewhere ask
    Row("work", "@dispvm", "qubes.OpenInVM", ALLOW, "@dispvm:default-dvm"),
    Row("work", "$dispvm", "qubes.OpenInVM", ALLOW, "@dispvm:default-dvm"),
    Row("work", "@dispvm:default-dvm", "qubes.OpenInVM", ASK),  # not the "@dispvm" rule
    Row("work", "personal", "qubes.OpenInVM", ASK, choices=offered_to("work")),
    Row("vault", "@dispvm", "qubes.OpenInVM", DENY),  # vault has no default DispVM
    Row("work", "@dispvm", "qubes.OpenURL", ALLOW, "@dispvm:default-dvm"),
    Row("work", "sys-net", "qubes.OpenURL", ASK),
    Row("work", "@dispvm", "qubes.StartApp+firefox", ALLOW, "@dispvm:default-dvm"),
    Row("work", "@dispvm", "qubes.GetImageRGBA", ALLOW, "@dispvm:default-dvm"),
    # VMShell / VMExec: only over the DispVM the caller creates
    Row("work", "@dispvm", "qubes.VMShell", ALLOW, "@dispvm:default-dvm"),
    Row("work", "@dispvm:default-dvm", "qubes.VMShell", DENY),
    Row("work", "personal", "qubes.VMShell", DENY, notify=True),
    Row("work", "personal", "qubes.VMRootShell", DENY),
    Row("work", "personal", "qubes.VMExec+qubes.Foo", DENY),
    Row("work", "@dispvm", "qubes.VMExecGUI+qubes.Foo", ALLOW, "@dispvm:default-dvm"),
    # services of dom0
    Row("work", "dom0", "qubes.FeaturesRequest", ALLOW, "dom0"),
    Row("work", "@adminvm", "qubes.FeaturesRequest", ALLOW, "dom0"),
    Row("fedora-40", "dom0", "qubes.NotifyUpdates", ALLOW, "dom0"),
    Row("work", "dom0", "qubes.NotifyTools", ALLOW, "dom0"),
    Row("work", "dom0", "qubes.SyncAppMenus", ALLOW, "dom0"),
    Row("work", "dom0", "qubes.GetRandomizedTime", ALLOW, "dom0"),
    Row("work", "@default", "qubes.GetDate", ALLOW, "dom0"),
    Row("anon-whonix", "@default", "qubes.GetDate", DENY),
    Row("work", "@default", "qubes.Notifications", ALLOW, "dom0"),
    Row("work", "dom0", "qubes.WaitForSession", ALLOW, "dom0"),
    Row("work", "@default", "qubes.WaitForSession", ALLOW, "dom0"),
    Row("sys-net", "dom0", "qubes.WaitForSession", DENY),  # no guivm-dom0 tag
    # updates proxy
    Row("fedora-40", "@default", "qubes.UpdatesProxy", ALLOW, "sys-net"),
    Row("whonix-gw-17", "@default", "qubes.UpdatesProxy", DENY),  # no sys-whonix here
    Row("whonix-gw-17", "sys-net", "qubes.UpdatesProxy", DENY),
    Row("work", "@default", "qubes.UpdatesProxy", DENY),
    # dangerous by default
    Row("work", "personal", "qubes.ConnectTCP+22", DENY),
    Row("work", "dom0", "policy.RegisterArgument+qubes.Foo", DENY),
    Row("work", "personal", "policy.RegisterArgument", DENY),
    # the admin API: nothing allowed by default, but the paranoid-restore DispVM
    Row("work", "dom0", "admin.vm.List", DENY),
    Row("disp1234", "dom0", "admin.vm.List", ALLOW, "dom0"),
    Row("disp1234", "work", "admin.vm.List", ALLOW, "dom0"),
    Row("disp1234", "work", "admin.vm.property.Get+provides_network", ALLOW, "dom0"),
    Row("disp1234", "work", "admin.vm.property.Get+netvm", DENY),
    Row("work", "dom0", "admin.vm.Start", DENY),
    Row("work", "dom0", "admin.vm.Console", DENY),
    Row("work", "dom0", "admin.property.GetAll", DENY, notify=False),
    Row("work", "personal", "admin.vm.property.GetAll", DENY, notify=False),
    Row("work", "dom0", "policy.List", DENY),
    Row("work", "dom0", "policy.Replace+qubes.Filecopy", DENY),
    # nothing says anything about it
    Row("work", "personal", "qubes.NoSuchService", DENY),
]


def test_the_table_is_big_enough() -> None:
    assert len(ROWS) >= 30


@pytest.mark.parametrize("legacy", [None, str(NO_LEGACY)])
def test_stock_files_parse_without_error(legacy: str | None) -> None:
    policy = load_policy(legacy, str(STOCK))
    assert policy.errors == ()
    # README is no *.policy file; include/ is reached only through includes.
    assert {Path(rule.location.path).parent.name for rule in policy.rules} == {
        "stock-policy.d"
    }


@pytest.fixture(scope="module")
def stock() -> PolicyCache:
    return PolicyCache(str(NO_LEGACY), str(STOCK))


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_stock_decision(stock: PolicyCache, row: Row) -> None:
    decision = decide(stock, row.source, row.target, row.call, SYSTEM)
    assert decision.action is row.action, decision.reason
    assert decision.target == row.result
    if row.choices is not None:
        assert decision.ask_targets == row.choices
        assert decision.default_target is None  # no stock rule names a default_target
    if row.notify is not None:
        assert decision.notify is row.notify


# --- an upgraded dom0: 35-compat.policy reads what R4.0 left -----------------------------

LEGACY_ROWS = [
    # the legacy files decide where they have a rule: from qubes.UpdatesProxy ...
    (Row("fedora-40", "@default", "qubes.UpdatesProxy", ALLOW, "sys-net"), "qubes.UpdatesProxy"),
    (Row("whonix-gw-17", "@default", "qubes.UpdatesProxy", DENY), "qubes.UpdatesProxy"),
    (Row("work", "@default", "qubes.UpdatesProxy", DENY), "qubes.UpdatesProxy"),
    # ... qubes.GetDate (with "$anyvm $anyvm allow,target=dom0") ...
    (Row("work", "@default", "qubes.GetDate", ALLOW, "dom0"), "qubes.GetDate"),
    (Row("anon-whonix", "@default", "qubes.GetDate", DENY), "qubes.GetDate"),
    # ... qubes.OpenInVM ("$anyvm $dispvm allow", then ask) ...
    (Row("work", "@dispvm", "qubes.OpenInVM", ALLOW, "@dispvm:default-dvm"), "qubes.OpenInVM"),
    (Row("work", "vault", "qubes.OpenInVM", ASK, choices=offered_to("work")), "qubes.OpenInVM"),
    # ... and fall through to 90-default where they have none (no "+" in their names).
    (Row("work", "personal", "qubes.ConnectTCP+22", DENY), "90-default.policy"),
    (Row("work", "dom0", "admin.vm.Console", DENY), None),
    (Row("work", "dom0", "admin.vm.List", DENY), None),
    (Row("disp1234", "dom0", "admin.vm.List", ALLOW, "dom0"), "85-admin-backup-restore.policy"),
    (Row("work", "personal", "qubes.Filecopy", ASK), "90-default.policy"),
    (Row("work", "@dispvm", "qubes.VMShell", ALLOW, "@dispvm:default-dvm"), "90-default.policy"),
]


@pytest.fixture(scope="module")
def upgraded() -> PolicyCache:
    return PolicyCache(str(LEGACY), str(STOCK))


def test_upgraded_dom0_parses_without_error(upgraded: PolicyCache) -> None:
    assert upgraded.policy().errors == ()


@pytest.mark.parametrize(("row", "decided_by"), LEGACY_ROWS, ids=[str(r) for r, _ in LEGACY_ROWS])
def test_upgraded_dom0_decision(upgraded: PolicyCache, row: Row, decided_by: str | None) -> None:
    decision = decide(upgraded, row.source, row.target, row.call, SYSTEM)
    assert decision.action is row.action, decision.reason
    assert decision.target == row.result
    if row.choices is not None:
        assert decision.ask_targets == row.choices
    if decided_by is None:
        assert decision.rule is None
    else:
        assert decision.rule is not None
        assert Path(decision.rule.path).name == decided_by
