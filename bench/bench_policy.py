"""Policy evaluation speed: the cached engine against re-parsing per call.

Generates a policy of 1,000 rules across 50 files in a temporary policy.d,
evaluates 100,000 requests through PolicyCache (which stats every file before
each evaluation and re-parses nothing), and, as the baseline measured in the same
run, evaluates 200 requests the naive way: parse every file, then evaluate.

    .venv/bin/python bench/bench_policy.py
"""

from __future__ import annotations

import random
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


def main() -> None:
    rng = random.Random(20240531)
    system_info = make_system_info()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rules = write_policy(root, rng)
        requests = make_requests(rng, CACHED_CALLS)

        cache = PolicyCache(None, str(root))
        cache.policy()  # the first load is not what is being measured
        start = time.perf_counter()
        for request in requests:
            cache.evaluate(request, system_info)
        cached_rate = CACHED_CALLS / (time.perf_counter() - start)
        assert cache.loads == 1, "the policy was reloaded during the run"

        policy = cache.policy()
        start = time.perf_counter()
        for request in requests:
            policy.evaluate(request, system_info)
        engine_rate = CACHED_CALLS / (time.perf_counter() - start)

        start = time.perf_counter()
        for request in requests[:BASELINE_CALLS]:
            load_policy(None, str(root)).evaluate(request, system_info)
        reparse_rate = BASELINE_CALLS / (time.perf_counter() - start)

    print(
        f"policy: {rules} rules in {FILES} files; cached engine {cached_rate:,.0f} "
        f"evaluations/s over {CACHED_CALLS:,} calls (engine alone, no change check: "
        f"{engine_rate:,.0f}/s); re-parsing per call {reparse_rate:,.0f} evaluations/s "
        f"over {BASELINE_CALLS} calls; cached is {cached_rate / reparse_rate:,.0f}x faster"
    )


if __name__ == "__main__":
    main()
