"""qrexec-trio torture: its options, a short run with every fault kind, its JSON report,
and (``-m slow``) a long run of 10,000 calls.

The runs assert the torture's own verdict: exit 0 means every call that was not
faulted completed with intact data, no call and no faulted pipeline hung, every
fault was injected, and nothing leaked (processes, fds, vchan files, ports,
connections, DispVMs, ledger entries).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from harness import Host, program
from qrexec_trio import torture
from qrexec_trio.domains import QubesdDomains, serve_admin
from qrexec_trio.nursery import PORTS
from qrexec_trio.torture._calls import CallPlan, CallResult, FaultPlan
from qrexec_trio.torture._faults import FaultRecord, NotInjected, send_signal
from qrexec_trio.torture._kinds import FAULT_KINDS, CallPath
from qrexec_trio.torture._options import parse_options
from qrexec_trio.torture._procfs import ProcId
from qrexec_trio.torture._report import Results
from qrexec_trio.torture._vms import VMGate
from qrexec_trio.torture._world import VM, World, config_text
from qrexec_trio.world import load_world_config

from .worlds import RunningWorld

BAD_OPTIONS = [
    ["--calls", "0"],
    ["--calls", "many"],
    ["--concurrency", "0"],
    ["--concurrency", "257"],
    ["--faults", "kill-everything"],
    ["--faults", "all,kill-caller"],
    ["--faults", ","],
    ["--faults", "none", "--fault-rate", "0.5"],
    ["--fault-rate", "0"],
    ["--fault-rate", "1.5"],
    ["--fault-rate", "nan"],
    ["--duration", "0"],
    ["--call-timeout", "-1"],
    ["--call-timeout", "10", "--teardown-timeout", "20"],
    ["--paths", "dom0-vm", "--faults", "kill-source-agent"],
    ["--paths", "vm-vm", "--faults", "kill-dispvm-agent"],
    ["--paths", "dom0-vm,vm-nowhere"],
    ["--json", "/nonexistent-directory/report.json"],
    ["--print-config", "--world", "/tmp"],
    ["--max-payload", "-1"],
    ["--seed", "abc"],
]

#: A short run: over a hundred calls, a faulted share that deals every kind four or
#: five times; about 80 s on two idle cores (each call starts a Python client, each
#: DispVM and each VM restart an agent and a daemon).
SHORT_RUN = ["--calls", "120", "--concurrency", "6", "--fault-rate", "0.6", "--seed", "13"]


@pytest.mark.parametrize("argv", BAD_OPTIONS, ids=" ".join)
def test_options_out_of_range_or_contradictory_are_usage_errors(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        torture.main(argv)
    assert stopped.value.code == 2
    assert "usage: qrexec-trio torture" in capsys.readouterr().err


def test_a_usage_error_exits_2_from_the_command_and_starts_nothing() -> None:
    result = subprocess.run([program("qrexec-trio"), "torture", "--concurrency", "0"],
                            capture_output=True, timeout=60)
    assert result.returncode == 2
    assert b"--concurrency must be 1 to 256" in result.stderr
    assert result.stdout == b""


def test_the_printed_config_is_a_valid_world(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert torture.main(["--print-config"]) == 0
    config = tmp_path / "torture.toml"
    config.write_text(capsys.readouterr().out)
    world = load_world_config(config)
    assert [vm.name for vm in world.vms] == ["ta", "tb", "tc", "tdvm"]
    assert all(vm.services[0].name == "torture.Echo" for vm in world.vms)
    assert [vm.name for vm in world.vms if vm.template_for_dispvms] == ["tdvm"]


def test_a_world_without_the_torture_service_is_refused(world: RunningWorld) -> None:
    result = subprocess.run(
        [program("qrexec-trio"), "torture", "--world", str(world.dir), "--calls", "1"],
        capture_output=True, timeout=120, env=world.host.env(0))
    assert result.returncode == 1
    assert b"with the torture service" in result.stderr


def test_a_run_against_a_running_world_leaves_it_running_and_clean(
        host: Host, tmp_path: Path) -> None:
    world = RunningWorld(host, config_text())
    report = tmp_path / "report.json"
    try:
        result = subprocess.run(
            [program("qrexec-trio"), "torture", "--world", str(world.dir), "--calls", "12",
             "--concurrency", "3", "--faults", "none", "--seed", "5", "--json", str(report)],
            capture_output=True, timeout=300, env=world.host.env(0))
        assert world.proc.poll() is None, "the torture must not stop a world it did not start"
    finally:
        assert world.stop() == 0
    data = json.loads(report.read_text())
    table = result.stdout.decode(errors="replace")
    assert data["world"].startswith("attached")
    assert (data["calls"]["run"], data["calls"]["completed_intact"]) == (12, 12), table
    assert "processes left after the world stopped" not in [
        leak["what"] for leak in data["leaks"]]
    assert (result.returncode, data["failures"]) == (0, []), table


def _torture(workdir: Path, *argv: str, timeout: float) -> tuple[int, str, dict[str, Any]]:
    """Run the torture with its world under ``workdir``; its status, table and JSON."""
    report = workdir / "report.json"
    env = dict(os.environ, TMPDIR=str(workdir))
    result = subprocess.run([program("qrexec-trio"), "torture", *argv, "--json", str(report)],
                            capture_output=True, timeout=timeout, env=env)
    table = result.stdout.decode(errors="replace")
    assert report.exists(), f"no report (status {result.returncode}):\n{table}\n" \
        f"{result.stderr.decode(errors='replace')[-3000:]}"
    return result.returncode, table, json.loads(report.read_text())


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict[str, Any]]:
    # Unix socket paths are short: the world goes under a short temp dir.
    workdir = Path(os.environ.get("QREXEC_TEST_TMP", "/tmp")) / f"qt-{os.getpid()}-torture"
    workdir.mkdir(exist_ok=True)
    try:
        return _torture(workdir, *SHORT_RUN, timeout=900)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_short_run_json_is_consistent(short_run: tuple[int, str, dict[str, Any]]) -> None:
    _, table, report = short_run
    calls, faults = report["calls"], report["faults"]
    assert report["options"]["seed"] == 13 and report["options"]["calls"] == 120
    assert calls["run"] == 120
    assert sum(calls["by_path"].values()) == 120
    assert set(calls["by_path"]) == {"dom0-vm", "vm-vm", "vm-dispvm"}
    assert set(faults) == set(FAULT_KINDS)
    for name, stats in faults.items():
        assert stats["planned"] == stats["injected"] + stats["not_injected"] + stats["skipped"]
        assert stats["planned"] >= 3, name
    assert calls["faulted"] == sum(stats["injected"] for stats in faults.values())
    assert len(report["fault_log"]) == sum(stats["planned"] for stats in faults.values())
    latency = report["teardown_latency"]
    assert latency["count"] == sum(stats["latencies"]["count"] for stats in faults.values())
    if latency["count"]:
        assert 0 <= latency["p50"] <= latency["p99"] <= latency["max"]
    assert [leak["what"] for leak in report["leaks"]] == [
        "processes left in the world", "fds of the world's programs (grown)", "vchan files",
        "data ports held by daemons", "connections still listed", "DispVMs left",
        "ledger entries", "processes left after the world stopped"]
    assert report["passed"] == (report["failures"] == [])
    assert ("result: PASS" in table) == report["passed"]


def test_short_run_with_every_fault_kind_passes(
        short_run: tuple[int, str, dict[str, Any]]) -> None:
    status, table, report = short_run
    assert all(stats["injected"] == stats["planned"] for stats in report["faults"].values()), \
        table
    assert (status, report["failures"]) == (0, []), table


@pytest.mark.slow
def test_long_run_of_ten_thousand_calls_passes() -> None:
    workdir = Path(os.environ.get("QREXEC_TEST_TMP", "/tmp")) / f"qt-{os.getpid()}-long"
    workdir.mkdir(exist_ok=True)
    try:
        status, table, report = _torture(workdir, "--calls", "10000", "--concurrency", "8",
                                         "--seed", "1", timeout=6 * 3600)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert report["calls"]["run"] == 10_000
    assert all(stats["injected"] >= 1 for stats in report["faults"].values()), table
    assert (status, report["failures"]) == (0, []), table


def test_a_fault_on_a_process_that_is_gone_is_not_injected() -> None:
    finished = subprocess.Popen(["true"])
    ident = ProcId(finished.pid, "0")
    finished.wait()
    with pytest.raises(NotInjected, match="is gone"):
        send_signal(ident, signal.SIGKILL)


def test_a_fault_not_injected_is_reported_and_fails_the_run() -> None:
    options = parse_options(["--seed", "1"])
    kind = FAULT_KINDS["kill-service"]
    plan = CallPlan(index=3, path=CallPath.VM_VM, source="ta", target="tb", payload=b"x",
                    mode="plain", fault=FaultPlan(kind, at=0, side="caller", stop_for=0.5,
                                                  then_kill=False, daemon_of="target",
                                                  pause=0.0))
    results = Results(options, "a world")
    record = FaultRecord(kind.name, not_injected="no service process to signal")
    results.count(plan, CallResult(exit_status=0, problem="exit status 1"), record, None)
    assert results.kinds[kind.name].injected == 0
    assert results.faulted == 0
    assert "1 faults could not be injected (or were skipped)" in results.failures()
    assert "no service process to signal" in results.table()
    assert "result: FAIL" in results.table()


async def test_ports_are_read_from_each_daemons_control_socket(tmp_path: Path) -> None:
    """What the daemons answer to qrexec.Ports is listed; a daemon without it is unmeasured."""
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    world = World(root=tmp_path, pid=os.getpid(), vchan="socket", vchan_dir=tmp_path,
                  socket_dir=sockets, vms={"ta": VM("ta", 10, tmp_path)}, template=None,
                  admin=QubesdDomains(str(tmp_path / "none.sock")))
    path = str(sockets / "qrexec-trio-control.10")

    async def ports(request: object) -> bytes:
        return b'{"domain": 0, "port": 513}\n'

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_admin, None, path,
                                              methods={PORTS: ports},
                                              request_timeout=5))
        assert await world.ports() == {"ta": [{"domain": 0, "port": 513}]}
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_admin, None, path, methods={},
                                              request_timeout=5))
        assert await world.ports() is None
        nursery.cancel_scope.cancel()


async def test_a_vm_that_is_not_restarted_in_time_is_reported_with_the_reason() -> None:
    class NeverHalts:
        def __init__(self) -> None:
            self.vms = {"ta": VM("ta", 10, Path("/nonexistent"))}

        async def states(self) -> dict[str, str]:
            await trio.lowlevel.checkpoint()
            return {"ta": "Running"}

    async with trio.open_nursery() as background:
        gate = VMGate(NeverHalts(), background, bound=0.2)  # type: ignore[arg-type]
        gate.crashing("ta", by=1)
    assert gate.broken
    assert gate.restarts.failures == ["ta: not halted and started again within 0.2 s"]
