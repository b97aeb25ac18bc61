"""The domains' facts for the policy from qubesd (internal.GetSystemInfo).

The client's request, the reading of qubesd's answer, the cache and when it is
refreshed, failures (which deny), and the world's admin socket answering the
same call from its domains.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs
from trio.testing import MockClock

from qrexec_trio.domains import (
    Domain,
    DomainsError,
    QubesdDomains,
    decode_system_info,
    encode_system_info,
    serve_admin,
)
from qrexec_trio.domains._admin import MAX_REPLY_SIZE
from qrexec_trio.policy import SystemInfoError, system_info_from_json
from qrexec_trio.roles._decide import (
    SYSTEM_INFO_TTL,
    EngineDecider,
    QubesdSystemInfo,
    RequestNamesOnly,
    SystemInfoUnavailable,
)

#: A guard against hangs only; no test asserts how long anything took.
GUARD = 10
#: What the reference's client sends (qrexec/utils.py) is the same call with an
#: empty "+" argument; qubesd reads both alike. This is ours.
REQUEST = b"internal.GetSystemInfo dom0 name dom0\0"

#: An answer as qubesd (qubes/api/internal.py) makes it: json.dumps of every
#: domain's facts, including those the policy does not use.
REFERENCE_ANSWER: dict[str, Any] = {"domains": {
    "dom0": {"internal": None, "tags": ["created-by-dom0"], "type": "AdminVM",
             "template_for_dispvms": False, "default_dispvm": "default-dvm",
             "icon": "adminvm-black", "label": "black", "guivm": None, "relayvm": None,
             "transport_rpc": None, "power_state": "Running",
             "uuid": "00000000-0000-0000-0000-000000000000"},
    "work": {"internal": None, "tags": ["trusted", "created-by-dom0"], "type": "AppVM",
             "template_for_dispvms": False, "default_dispvm": "default-dvm",
             "icon": "appvm-blue", "label": "blue", "guivm": "dom0", "relayvm": None,
             "transport_rpc": None, "power_state": "Running",
             "uuid": "5a4bd3ba-3e6e-4a58-8e2b-0f0f3c9e6c1e"},
    "default-dvm": {"internal": "1", "tags": [], "type": "AppVM",
                    "template_for_dispvms": True, "default_dispvm": "default-dvm",
                    "icon": "appvm-red", "label": "red", "guivm": "dom0", "relayvm": None,
                    "transport_rpc": None, "power_state": "Halted",
                    "uuid": "0d6a3a24-5b1b-4a8e-9d52-3c0b7c1d2e3f"},
    "disp7": {"internal": None, "tags": ["dispvm-tag"], "type": "DispVM",
              "template_for_dispvms": False, "default_dispvm": "default-dvm",
              "icon": "dispvm-red", "label": "red", "guivm": "dom0", "relayvm": None,
              "transport_rpc": None, "power_state": "Running",
              "uuid": "9e8b1f8e-64c4-4c53-a0f7-2f1d4c2f7f55"},
}}


def ok(data: Any) -> bytes:
    return b"0\0" + json.dumps(data).encode()


class FakeQubesd:
    """Answers every request with ``reply`` and records it.

    While ``gate`` is set and not yet released, answers wait for it.
    """

    def __init__(self, path: str, reply: bytes = ok(REFERENCE_ANSWER)) -> None:
        self.path = path
        self.reply = reply
        self.requests: list[bytes] = []
        self.gate: trio.Event | None = None
        self._news = trio.Event()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = [await _unix_listener(self.path)]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def wait_for_requests(self, count: int) -> None:
        while len(self.requests) < count:
            await self._news.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = bytearray()
            with trio.fail_after(GUARD):
                while chunk := await stream.receive_some(1 << 16):
                    data += chunk
            self.requests.append(bytes(data))
            self._news.set()
            self._news = trio.Event()
            if self.gate is not None:
                await self.gate.wait()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(self.reply)


async def _unix_listener(path: str) -> trio.SocketListener:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    return trio.SocketListener(sock)


@pytest.fixture
async def fake(short_tmp: Path, nursery: trio.Nursery) -> FakeQubesd:
    server = FakeQubesd(str(short_tmp / "qubesd.internal.sock"))
    await nursery.start(server.serve)
    return server


def source(fake: FakeQubesd, ttl: float = SYSTEM_INFO_TTL) -> QubesdSystemInfo:
    return QubesdSystemInfo(fake.path, call_timeout=GUARD, ttl=ttl)


# -- the call and qubesd's answer ----------------------------------------------------


async def test_the_request_is_internal_get_system_info_to_dom0(fake: FakeQubesd) -> None:
    data = await QubesdDomains(fake.path, call_timeout=GUARD).get_system_info()
    assert fake.requests == [REQUEST]
    assert data == REFERENCE_ANSWER


async def test_qubesd_answer_is_read_with_every_fact(fake: FakeQubesd) -> None:
    info = await source(fake).current()
    assert set(info.domains) == {"dom0", "work", "default-dvm", "disp7"}
    assert info.admin_vm == "dom0"
    work = info.domains["work"]
    assert work.type == "AppVM"
    assert work.tags == frozenset({"trusted", "created-by-dom0"})
    assert work.default_dispvm == "default-dvm"
    assert not work.template_for_dispvms
    assert (work.power_state, work.icon, work.guivm, work.uuid) == (
        "Running", "appvm-blue", "dom0", "5a4bd3ba-3e6e-4a58-8e2b-0f0f3c9e6c1e")
    assert info.dispvm_template("default-dvm") is not None
    assert info.domains["default-dvm"].power_state == "Halted"
    assert info.domains["disp7"].type == "DispVM"
    assert info.domains["dom0"].guivm is None


def test_unknown_keys_are_ignored_in_qubesd_answers_but_not_in_files() -> None:
    data = json.loads(json.dumps(REFERENCE_ANSWER))
    data["domains"]["work"]["future_fact"] = {"nested": [1, 2]}
    data["version"] = 2
    info = system_info_from_json(data, strict=False)
    assert "trusted" in info.domains["work"].tags
    with pytest.raises(SystemInfoError, match="exactly one key"):
        system_info_from_json(data)
    del data["version"]
    with pytest.raises(SystemInfoError, match="future_fact"):
        system_info_from_json(data)
    # qubesd's own keys are no typo: a file dumped from qubesd loads as it is.
    assert set(system_info_from_json(REFERENCE_ANSWER).domains) == set(
        REFERENCE_ANSWER["domains"])


def test_a_domain_of_an_unknown_type_is_left_out_of_qubesd_answers_only() -> None:
    data = {"domains": {"dom0": {"type": "AdminVM"}, "far": {"type": "RemoteVM"},
                        "work": {"type": "AppVM"}}}
    assert set(system_info_from_json(data, strict=False).domains) == {"dom0", "work"}
    with pytest.raises(SystemInfoError, match="type"):
        system_info_from_json(data)


@pytest.mark.parametrize("domain", [
    {"type": "AppVM", "tags": "trusted"},
    {"type": "AppVM", "tags": ["a b"]},
    {"type": "AppVM", "default_dispvm": 3},
    {"type": "AppVM", "template_for_dispvms": "True"},
    {"type": "AppVM", "power_state": 1},
    {"type": "AppVM", "uuid": ["x"]},
    {"tags": []},
])
def test_the_facts_the_policy_uses_are_checked_in_qubesd_answers_too(
        domain: dict[str, Any]) -> None:
    with pytest.raises(SystemInfoError):
        system_info_from_json({"domains": {"work": domain}}, strict=False)


async def test_an_answer_longer_than_an_admin_reply_is_read(fake: FakeQubesd) -> None:
    domains = {f"vm{i}": dict(REFERENCE_ANSWER["domains"]["work"]) for i in range(400)}
    domains["dom0"] = REFERENCE_ANSWER["domains"]["dom0"]
    fake.reply = ok({"domains": domains})
    assert len(fake.reply) > MAX_REPLY_SIZE
    info = await source(fake).current()
    assert len(info.domains) == 401


@pytest.mark.parametrize(("reply", "error"), [
    (b"0\0not json", "not JSON"),
    (b"0\0[1, 2]", "not a JSON object"),
    (b"0\0\xff", "not UTF-8"),
    (ok({"domains": {"work": {"type": "AppVM", "tags": [1]}}}), "tags"),
    (ok({"domain": {}}), "domains"),
    (b"2\0QubesException\0\0broken\0", "QubesException: broken"),
    (b"", "closed the connection"),
])
async def test_a_bad_answer_makes_the_facts_unavailable(fake: FakeQubesd, reply: bytes,
                                                        error: str) -> None:
    fake.reply = reply
    with pytest.raises(SystemInfoUnavailable) as caught:
        await source(fake).current()
    assert caught.value.origin == "socket"
    assert caught.value.path == fake.path
    assert error in caught.value.error


async def test_without_qubesd_the_error_names_the_socket(short_tmp: Path) -> None:
    missing = str(short_tmp / "no-qubesd.sock")
    with pytest.raises(SystemInfoUnavailable) as caught:
        await QubesdSystemInfo(missing, call_timeout=GUARD).current()
    assert caught.value.path == missing
    assert "cannot connect" in caught.value.error and missing in str(caught.value)


def test_the_world_answer_format_round_trips() -> None:
    domains = [Domain("dom0", "AdminVM", domid=0),
               Domain("work", "AppVM", domid=10, tags=("trusted",), default_dispvm="dvm"),
               Domain("dvm", "AppVM", template_for_dispvms=True)]
    data = decode_system_info(encode_system_info(domains))
    assert data["domains"]["work"] == {
        "tags": ["trusted"], "type": "AppVM", "template_for_dispvms": False,
        "default_dispvm": "dvm", "power_state": "Running"}
    assert data["domains"]["dvm"]["power_state"] == "Halted"
    info = system_info_from_json(data)
    assert info.dispvm_template("dvm") is not None
    assert info.domains["work"].tags == frozenset({"trusted"})


# -- the cache -----------------------------------------------------------------------


async def test_the_answer_serves_for_the_ttl_then_is_asked_again(
        fake: FakeQubesd, mock_clock: MockClock) -> None:
    facts = source(fake, ttl=1.0)
    first = await facts.current()
    mock_clock.jump(0.5)
    assert await facts.current() is first
    assert len(fake.requests) == 1
    changed = json.loads(json.dumps(REFERENCE_ANSWER))
    changed["domains"]["work"]["tags"] = []
    fake.reply = ok(changed)
    mock_clock.jump(0.5)
    second = await facts.current()
    assert len(fake.requests) == 2
    assert second.domains["work"].tags == frozenset()


async def test_a_failure_is_not_kept_the_next_decision_asks_again(
        fake: FakeQubesd, mock_clock: MockClock) -> None:
    facts = source(fake)
    fake.reply = b"2\0QubesException\0\0busy\0"
    with pytest.raises(SystemInfoUnavailable):
        await facts.current()
    fake.reply = ok(REFERENCE_ANSWER)
    info = await facts.current()  # no time has passed
    assert "work" in info.domains
    assert len(fake.requests) == 2


async def test_concurrent_decisions_share_one_call_in_flight(fake: FakeQubesd) -> None:
    facts = source(fake)
    fake.gate = trio.Event()
    results: list[object] = []

    async def decide() -> None:
        results.append(await facts.current())

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(decide)
            await fake.wait_for_requests(1)
            await trio.testing.wait_all_tasks_blocked()
            fake.gate.set()
    assert len(fake.requests) == 1
    assert len(results) == 10 and all(r is results[0] for r in results)


async def test_concurrent_decisions_share_a_failure_too(fake: FakeQubesd) -> None:
    facts = source(fake)
    fake.reply = b"2\0QubesException\0\0busy\0"
    fake.gate = trio.Event()
    errors: list[SystemInfoUnavailable] = []

    async def decide() -> None:
        try:
            await facts.current()
        except SystemInfoUnavailable as exc:
            errors.append(exc)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(decide)
            await fake.wait_for_requests(1)
            await trio.testing.wait_all_tasks_blocked()
            fake.gate.set()
    assert len(fake.requests) == 1 and len(errors) == 5


async def test_when_the_asking_decision_is_cancelled_a_waiting_one_asks_again(
        fake: FakeQubesd) -> None:
    facts = source(fake)
    fake.gate = trio.Event()
    got: list[object] = []

    async def waiter() -> None:
        got.append(await facts.current())

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as first:
                async with trio.open_nursery() as inner:
                    inner.start_soon(facts.current)
                    await fake.wait_for_requests(1)
                    outer.start_soon(waiter)
                    await trio.testing.wait_all_tasks_blocked()
                    first.cancel()
            await fake.wait_for_requests(2)
            fake.gate.set()
    assert len(got) == 1 and "work" in got[0].domains  # type: ignore[attr-defined]


# -- the engine: deny without facts ---------------------------------------------------


@pytest.fixture
def policy_d(tmp_path: Path) -> Path:
    directory = tmp_path / "policy.d"
    directory.mkdir()
    (directory / "50-test.policy").write_text(
        "test.Tagged  *  @tag:trusted  @anyvm     allow\n"
        "test.Disp    *  @anyvm        @dispvm    allow\n"
        "test.Any     *  @anyvm        @anyvm     allow\n")
    return directory


async def test_the_engine_decides_on_qubesd_facts(fake: FakeQubesd, policy_d: Path) -> None:
    decider = EngineDecider(None, str(policy_d), system_info=source(fake))
    assert (await decider.decide("work", "disp7", "test.Tagged")).allowed
    assert not (await decider.decide("disp7", "work", "test.Tagged")).allowed
    verdict = await decider.decide("work", "@dispvm", "test.Disp")
    assert verdict.allowed and verdict.target == "@dispvm:default-dvm"
    assert len(fake.requests) == 1


async def test_without_facts_every_call_is_denied_and_logged(short_tmp: Path,
                                                             policy_d: Path) -> None:
    missing = str(short_tmp / "no-qubesd.sock")
    decider = EngineDecider(None, str(policy_d),
                            system_info=QubesdSystemInfo(missing, call_timeout=GUARD))
    with capture_logs() as logs:
        verdict = await decider.decide("work", "other", "test.Any")
    assert not verdict.allowed
    (line,) = [e for e in logs if e["event"] == "system info unavailable"]
    assert line["socket"] == missing
    assert "cannot connect" in line["error"]
    assert line["log_level"] == "error"


async def test_a_system_info_file_is_used_instead_of_qubesd(
        fake: FakeQubesd, policy_d: Path, tmp_path: Path) -> None:
    path = tmp_path / "system-info.json"
    path.write_text(json.dumps({"domains": {
        "dom0": {"type": "AdminVM"}, "work": {"type": "AppVM"}, "other": {"type": "AppVM"}}}))
    decider = EngineDecider(None, str(policy_d), system_info_path=str(path),
                            system_info=source(fake))
    assert (await decider.decide("work", "other", "test.Any")).allowed
    assert not (await decider.decide("work", "other", "test.Tagged")).allowed
    assert fake.requests == []


async def test_an_unreadable_system_info_file_denies_naming_it(policy_d: Path,
                                                                tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    decider = EngineDecider(None, str(policy_d), system_info_path=str(path))
    with capture_logs() as logs:
        assert not (await decider.decide("work", "other", "test.Any")).allowed
    (line,) = [e for e in logs if e["event"] == "system info unavailable"]
    assert line["file"] == str(path)


async def test_names_only_knows_the_request_and_no_tags(policy_d: Path) -> None:
    decider = EngineDecider(None, str(policy_d), system_info=RequestNamesOnly())
    assert (await decider.decide("work", "other", "test.Any")).allowed
    assert not (await decider.decide("work", "other", "test.Tagged")).allowed
    assert not (await decider.decide("work", "@dispvm", "test.Disp")).allowed


# -- the world's admin socket answers the call ----------------------------------------


class StaticDomains:
    def __init__(self, domains: list[Domain]) -> None:
        self.domains = domains

    async def list(self) -> list[Domain]:
        await trio.lowlevel.checkpoint()
        return list(self.domains)

    async def start(self, name: str) -> None:
        raise DomainsError("QubesException", "not here")

    async def create_disposable(self, template: str) -> str:
        raise DomainsError("QubesException", "not here")

    async def kill(self, name: str) -> None:
        raise DomainsError("QubesException", "not here")


async def test_serve_admin_answers_get_system_info_from_live_domains(
        short_tmp: Path, nursery: trio.Nursery) -> None:
    path = str(short_tmp / "admin.sock")
    domains = StaticDomains([
        Domain("dom0", "AdminVM", domid=0),
        Domain("work", "AppVM", domid=10, tags=("trusted",), default_dispvm="dvm"),
        Domain("dvm", "AppVM", template_for_dispvms=True),
    ])
    await nursery.start(lambda task_status: serve_admin(
        domains, path, request_timeout=GUARD, task_status=task_status))
    facts = QubesdSystemInfo(path, call_timeout=GUARD, ttl=0)
    info = await facts.current()
    assert info.domains["work"].tags == frozenset({"trusted"})
    assert info.domains["work"].power_state == "Running"
    assert info.dispvm_template("dvm") is not None
    assert info.domains["dvm"].power_state == "Halted"
    # A DispVM made since is in the next answer.
    domains.domains.append(Domain("disp1", "DispVM", domid=1000, tags=("trusted",)))
    assert (await facts.current()).domains["disp1"].type == "DispVM"
    client = QubesdDomains(path, call_timeout=GUARD)
    with pytest.raises(DomainsError, match="AdminVM") as caught:
        await client.call("internal.GetSystemInfo", "work")
    assert caught.value.kind == "ProtocolError"
    with pytest.raises(DomainsError, match="no argument"):
        await client.call("internal.GetSystemInfo", "dom0", arg="x")
    assert await client.call("internal.GetSystemInfo", "@adminvm")
