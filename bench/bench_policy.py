"""Policy evaluation speed: the cached engine against re-parsing per call.

Generates a policy of 1,000 rules across 50 files in a temporary policy.d and
evaluates 100,000 requests four ways, all in the same run:

* the engine alone (the parsed policy, no change check at all);
* through PolicyCache told of changes by inotify (today's default);
* through PolicyCache checking every file's signature before each call (the
  fallback without inotify, and what the cache did before);
* through ``qrexec-policy-daemon``'s socket, one connection per request as the
  reference's qrexec-daemon makes them (fewer requests: each is a round trip);

and, as the naive baseline, 200 requests that parse every file, then evaluate.

    .venv/bin/python bench/bench_policy.py
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qrexec_trio.policy import (
    DomainInfo,
    PolicyCache,
    Request,
    SystemInfo,
    load_policy,
)

FILES = 50
RULES_PER_FILE = 20
CACHED_CALLS = 100_000
SOCKET_CALLS = 2_000
BASELINE_CALLS = 200
SERVICES = [f"bench.Service{n:03d}" for n in range(100)]
VMS = [f"vm{n:02d}" for n in range(40)]
TAGS = [f"tag{n}" for n in range(5)]


def make_system_info() -> SystemInfo:
    domains = [DomainInfo("dom0", "AdminVM")]
    domains += [DomainInfo("dvm1", "AppVM", template_for_dispvms=True),
                DomainInfo("dvm2", "AppVM", template_for_dispvms=True)]
    domains += [
        DomainInfo(name, "AppVM", tags=frozenset({TAGS[n % len(TAGS)]}),
                   default_dispvm="dvm1" if n % 2 else "dvm2")
        for n, name in enumerate(VMS)
    ]
    return SystemInfo.of(domains)


def make_rule(rng: random.Random) -> str:
    service = rng.choice([*SERVICES, "*"])
    argument = rng.choice(["*", "*", "+", f"+arg{rng.randrange(5)}"])
    source = rng.choice([rng.choice(VMS), "@anyvm", f"@tag:{rng.choice(TAGS)}", "@type:AppVM"])
    target = rng.choice([rng.choice(VMS), rng.choice(VMS), "@anyvm", f"@tag:{rng.choice(TAGS)}",
                         "@dispvm", "@default", "@adminvm", "@dispvm:dvm1"])
    action = rng.choices(["allow", "deny", "ask"], weights=[6, 6, 1])[0]
    params = {"allow": " user=user", "deny": "", "ask": " default_target=vm00"}[action]
    if action == "allow" and target == "@default":
        params += " target=vm01"
    return f"{service} {argument} {source} {target} {action}{params}"


def write_policy(root: Path, rng: random.Random) -> int:
    count = 0
    for n in range(FILES):
        lines = [f"# generated file {n}"]
        lines += [make_rule(rng) for _ in range(RULES_PER_FILE)]
        count += RULES_PER_FILE
        (root / f"{n:02d}-bench.policy").write_text("\n".join(lines) + "\n")
    return count


def make_requests(rng: random.Random, count: int) -> list[Request]:
    targets = [*VMS, "@default", "@dispvm", "@dispvm:dvm2", "dom0"]
    services = [*SERVICES, "bench.Unknown"]
    return [
        Request(rng.choice(VMS), rng.choice(targets), rng.choice(services),
                rng.choice(["", "arg0", "arg3", "other"]))
        for _ in range(count)
    ]


def _system_info_json(system_info: SystemInfo) -> str:
    return json.dumps({"domains": {
        name: {"type": info.type, "tags": sorted(info.tags),
               "template_for_dispvms": info.template_for_dispvms,
               "default_dispvm": info.default_dispvm}
        for name, info in system_info.domains.items()}})


def _rate(calls: int, run: object) -> float:
    start = time.perf_counter()
    run()  # type: ignore[operator]
    return calls / (time.perf_counter() - start)


def _socket_rate(root: Path, system_info: SystemInfo, requests: list[Request]) -> float:
    """Requests per second through qrexec-policy-daemon's socket (a process of its own)."""
    tmp = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
    info = tmp / "system-info.json"
    info.write_text(_system_info_json(system_info))
    path = tmp / "policy.sock"
    program = shutil.which("qrexec-policy-daemon") or str(
        Path(sys.executable).parent / "qrexec-policy-daemon")
    daemon = subprocess.Popen(
        [program, "--socket-path", str(path), "--eval-socket-path", str(tmp / "e"),
         "--gui-socket-path", str(tmp / "g"), "--policy-d", str(root),
         "--policy-dir", str(tmp / "none"), "--system-info", str(info),
         "--log-level", "error"],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("qrexec-policy-daemon did not start")
            time.sleep(0.02)
        payloads = [
            (f"source={r.source}\nintended_target={r.target}\n"
             f"service_and_arg={r.service}{'+' + r.argument if r.argument else ''}\n\n").encode()
            for r in requests
        ]

        def ask_all() -> None:
            for payload in payloads:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(path))
                    sock.sendall(payload)
                    while sock.recv(4096):
                        pass

        return _rate(len(payloads), ask_all)
    finally:
        daemon.terminate()
        daemon.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    rng = random.Random(20240531)
    system_info = make_system_info()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rules = write_policy(root, rng)
        requests = make_requests(rng, CACHED_CALLS)

        def through(cache: PolicyCache) -> float:
            cache.policy()  # the first load is not what is being measured
            rate = _rate(CACHED_CALLS, lambda: [cache.evaluate(r, system_info)
                                                for r in requests])
            assert cache.loads == 1, "the policy was reloaded during the run"
            return rate

        notified = PolicyCache(None, str(root))
        notified_rate = through(notified)
        checking = PolicyCache(None, str(root), notify=False)
        checking_rate = through(checking)
        policy = notified.policy()
        engine_rate = _rate(CACHED_CALLS, lambda: [policy.evaluate(r, system_info)
                                                   for r in requests])
        reparse_rate = _rate(BASELINE_CALLS, lambda: [
            load_policy(None, str(root)).evaluate(r, system_info)
            for r in requests[:BASELINE_CALLS]])
        socket_rate = _socket_rate(root, system_info, requests[:SOCKET_CALLS])

    print(f"policy: {rules} rules in {FILES} files, evaluations per second "
          f"(µs per evaluation)")
    for label, rate, calls in [
        ("engine alone, no change check", engine_rate, CACHED_CALLS),
        ("cache, told of changes (inotify)", notified_rate, CACHED_CALLS),
        ("cache, checking every file per call", checking_rate, CACHED_CALLS),
        ("qrexec-policy-daemon socket, a connection each", socket_rate, SOCKET_CALLS),
        ("baseline: re-parsing per call", reparse_rate, BASELINE_CALLS),
    ]:
        print(f"  {label:<48} {rate:>10,.0f}/s ({1e6 / rate:8.1f} µs) over {calls:,} calls")
    print(f"  the inotify cache is {notified_rate / reparse_rate:,.0f}x the baseline and "
          f"{notified_rate / checking_rate:.1f}x the checking cache")


if __name__ == "__main__":
    main()
