"""Benchmark of ``GET /user-keys``: a login storm, reused tokens, and a hello-world for scale.

Everything is real: a ``keyconnector serve`` process on SQLite + a PFX, a DevIssuer on loopback whose
tokens the service verifies, and wrk as the load generator in its own process. Run with
``.venv/bin/python bench/user_keys.py`` (or ``make bench``); see bench/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import (
    LUA,
    CpuTimes,
    Service,
    TokenMinter,
    WrkResult,
    access_log_statuses,
    cpu_seconds,
    machine_busy,
    process_tree,
    require_tools,
    run_wrk,
    service_env,
    signing_material,
    write_slices,
)

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs.generate import self_signed_pfx

STORM_SHARE_TARGET = 0.20
STORM_RPS_TARGET = 5_000  # with 2 workers
P99_TARGET_MS = 25.0
SAMPLE_USERS = 20
CASES = ("hello-world", "reused", "storm")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    """One measured wrk run plus what the service's own access log and /proc say about it."""

    name: str
    result: WrkResult
    statuses: Counter[tuple[str, int]]
    server_cpu_seconds: float
    steal: float
    others_cores: float  # CPU used by processes other than the service and wrk, in cores

    @property
    def server_us_per_request(self) -> float:
        """All service processes' CPU over the run, per request: comparable across worker counts."""
        requests = self.result.requests
        return self.server_cpu_seconds / requests * 1e6 if requests else 0.0

    @property
    def bad_statuses(self) -> int:
        """Responses that are not 2xx, by the access log (wrk alone does not count 3xx)."""
        return sum(n for (_, status), n in self.statuses.items() if not 200 <= status < 300)

    @property
    def failed(self) -> bool:
        """Any error or an exhausted token pool: the figures of such a run do not count."""
        r = self.result
        return bool(r.status_errors or r.socket_errors or r.exhausted or self.bad_statuses)


@dataclass
class WorkerRun:
    """All rounds of the three cases for one worker count; the table shows the median round."""

    workers: int
    pinned: bool
    rounds: dict[str, list[Case]] = field(default_factory=dict)
    mint_rate: float = 0.0  # tokens/s of the last storm pool: the same work each time, so a speed canary

    def case(self, name: str) -> Case:
        """The median round by req/s, reported whole (its latencies and errors belong together)."""
        ordered = sorted(self.rounds[name], key=lambda c: c.result.rps)
        return ordered[(len(ordered) - 1) // 2]


@dataclass
class Setup:
    """What every worker count shares: tools, files, users and their enrolment tokens."""

    wrk: str
    taskset: str | None
    folder: Path
    script: Path
    minter: TokenMinter
    users: list[uuid.UUID]
    keys: dict[uuid.UUID, bytes]
    tokens: dict[uuid.UUID, str]
    args: argparse.Namespace


# -- enrolment and correctness -------------------------------------------------------------------------


async def _enrol(url: str, pairs: Sequence[tuple[str, bytes]], concurrency: int) -> Counter[int]:
    """POST every (token, key) pair with ``concurrency`` requests in flight; count the statuses."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    statuses: Counter[int] = Counter()
    position = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal position
        while position < len(pairs):
            token, key = pairs[position]
            position += 1
            response = await client.post(
                "/user-keys",
                json={"key": base64.b64encode(key).decode()},
                headers={"Authorization": f"Bearer {token}"},
            )
            statuses[response.status_code] += 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def enrol(setup: Setup, service: Service) -> None:
    """Every user gets a key through the API; any refusal stops the benchmark (nothing to measure)."""
    concurrency = setup.args.enrol_concurrency
    pairs = [(setup.tokens[u], setup.keys[u]) for u in setup.users]
    pids = process_tree(service.pid)
    cpu_before, started = cpu_seconds(pids), time.monotonic()
    statuses = asyncio.run(_enrol(service.url, pairs, concurrency))
    elapsed = time.monotonic() - started
    busy = (cpu_seconds(pids) - cpu_before) / elapsed
    pace = "so the client sets this pace" if busy < 0.8 else "so the service sets this pace"
    print(
        f"  enrolled {len(pairs):,} users via POST /user-keys in {elapsed:.1f} s "
        f"({len(pairs) / elapsed:,.0f}/s, {concurrency} in flight, httpx async; the service was "
        f"{busy:.2f} cores busy, {pace}); statuses {dict(statuses)}"
    )
    if set(statuses) != {200}:
        raise SystemExit(f"enrolment failed: statuses {dict(statuses)}")


def check_sample(setup: Setup, url: str, when: str) -> None:
    """GET a few users' keys and compare with what was enrolled: fast but wrong would be worthless."""
    sample = random.sample(setup.users, min(SAMPLE_USERS, len(setup.users)))
    with httpx.Client(base_url=url, timeout=10) as client:
        for user in sample:
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {setup.tokens[user]}"})
            if response.status_code != 200:
                raise SystemExit(f"correctness check {when}: {user} got {response.status_code}")
            if base64.b64decode(response.json()["key"]) != setup.keys[user]:
                raise SystemExit(f"correctness check {when}: {user} got a different key")
    print(f"  correctness {when}: {len(sample)} sampled users got exactly their enrolled key")


# -- one worker count ----------------------------------------------------------------------------------


def measure(
    setup: Setup,
    service: Service,
    name: str,
    *,
    mode: str,
    prefix: Path | None,
    cpus: str | None,
    warmup: float = 0.0,
) -> Case:
    """Optionally warm up, then run wrk once, and read the access-log lines the run produced."""
    args = setup.args
    path = "/alive" if mode == "alive" else "/user-keys"
    common = {"prefix": prefix, "mode": mode, "threads": args.threads, "connections": args.connections}
    if warmup > 0:
        run_wrk(setup.wrk, setup.script, service.url + path, duration=warmup, cpus=cpus, **common)
        time.sleep(0.3)
    start = service.log_size()
    pids = process_tree(service.pid)
    cpu_before, machine_before, started = cpu_seconds(pids), CpuTimes.now(), time.monotonic()
    result = run_wrk(setup.wrk, setup.script, service.url + path, duration=args.duration, cpus=cpus, **common)
    server_cpu, machine_after = cpu_seconds(pids) - cpu_before, CpuTimes.now()
    # Whatever else ran meanwhile (another test suite on a shared machine) took CPU from the run.
    others = machine_after.busy_seconds_since(machine_before) - server_cpu - result.wrk_cpu_seconds
    others_cores = max(0.0, others / (time.monotonic() - started))
    time.sleep(0.5)  # access-log lines are written in batches, and in-flight requests end after wrk
    statuses = access_log_statuses(service.log_path, start, service.log_size())
    steal = machine_after.steal_since(machine_before)
    case = Case(name, result, statuses, server_cpu, steal, others_cores)
    print(
        f"  {name:<12} {result.rps:>9,.0f} req/s  p50 {result.p50_us / 1000:6.2f} ms  "
        f"p99 {result.p99_us / 1000:6.2f} ms  server {case.server_us_per_request:4.0f} µs CPU/req  "
        f"wrk errors {result.status_errors + result.socket_errors}  "
        f"access log {dict(sorted(statuses.items()))}"
    )
    return case


def mint_storm(setup: Setup, per_thread: int, name: str) -> tuple[Path, float]:
    """``per_thread`` never-seen tokens for random enrolled users for each wrk thread, in its own file.

    Returns the file prefix and the signing rate (tokens/s): a CPU-speed canary, as the work is fixed.
    """
    count = per_thread * setup.args.threads
    started = time.monotonic()
    tokens = setup.minter.mint(random.choices(setup.users, k=count))
    rate = count / (time.monotonic() - started)
    print(f"  minted {count:,} storm tokens at {rate:,.0f}/s (2 processes)")
    return write_slices(setup.folder, name, tokens, setup.args.threads), rate


def storm_rounds(setup: Setup, service: Service, cpus: str | None, run: WorkerRun) -> list[Case]:
    """The login storm, each round with its own pool of tokens nobody has sent before.

    Each wrk thread has its own slice, and threads do not keep equal pace (with 2 workers, one
    thread's connections may mostly land on the less busy worker), so a slice is sized for the
    busiest thread of a short calibration storm (also the storm's warm-up), plus 30%. A storm cannot
    outrun reused tokens, which bounds the calibration pool. A slice that runs out anyway is
    detected in Lua and the round redone once with 1.5 times the tokens.
    """
    args = setup.args
    ceiling = max(c.result.rps for c in run.rounds["reused"])
    prefix, run.mint_rate = mint_storm(setup, math.ceil(ceiling * args.warmup * 0.7) + 500, "calibration")
    calibration = run_wrk(
        setup.wrk,
        setup.script,
        service.url + "/user-keys",
        prefix=prefix,
        mode="once",
        threads=args.threads,
        connections=args.connections,
        duration=args.warmup,
        cpus=cpus,
    )
    busiest_rate = calibration.busiest_thread_used / (calibration.duration_us / 1e6 or 1.0)
    if calibration.exhausted or busiest_rate <= 0:
        busiest_rate = ceiling
    cases: list[Case] = []
    for _ in range(args.rounds):
        per_thread = math.ceil(busiest_rate * 1.3 * args.duration) + 1000
        for attempt in (1, 2):
            prefix, run.mint_rate = mint_storm(setup, per_thread, "storm")
            case = measure(setup, service, "storm", mode="once", prefix=prefix, cpus=cpus)
            if not case.result.exhausted:
                break
            print(f"  WARNING: the storm pool ran out ({case.result.exhausted} requests past its end)")
            if attempt == 1:
                per_thread = math.ceil(per_thread * 1.5)
                print("  redoing the round once with 1.5 times the tokens")
        cases.append(case)
        seconds = case.result.duration_us / 1e6 or 1.0
        busiest_rate = max(busiest_rate, case.result.busiest_thread_used / seconds)
    return cases


def run_worker_count(setup: Setup, env: dict[str, str], workers: int, first: bool) -> WorkerRun:
    """Start a service with ``workers`` workers, measure the three cases, always stop it."""
    args = setup.args
    pinned = workers == 1 and setup.taskset is not None
    server_cpus, wrk_cpus = ("0", "1") if pinned else (None, None)
    log_path = setup.folder / f"service-w{workers}.log"
    placement = "server pinned to CPU 0, wrk to CPU 1" if pinned else "not pinned (all share both cores)"
    print(f"\nworkers={workers}: {placement}")
    service = Service(env, log_path, workers=workers, cpus=server_cpus)
    run = WorkerRun(workers, pinned)
    try:
        service.start()
        if first:
            enrol(setup, service)
        check_sample(setup, service.url, "before load")
        reused = write_slices(setup.folder, "reused", [setup.tokens[u] for u in setup.users], args.threads)
        # Only the first round warms up; reused gets twice as long, because with 2 workers each one
        # must have seen a token before it is a cache hit there.
        run.rounds["hello-world"] = [
            measure(setup, service, "hello-world", mode="alive", prefix=None, cpus=wrk_cpus, warmup=w)
            for w in [args.warmup] + [0.0] * (args.rounds - 1)
        ]
        run.rounds["reused"] = [
            measure(setup, service, "reused", mode="cycle", prefix=reused, cpus=wrk_cpus, warmup=w)
            for w in [2 * args.warmup] + [0.0] * (args.rounds - 1)
        ]
        run.rounds["storm"] = storm_rounds(setup, service, wrk_cpus, run)
        check_sample(setup, service.url, "after load")
    finally:
        service.stop()
    return run


# -- report --------------------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    """PASS/FAIL in capitals, so that a failed target stands out in a long log."""
    return "PASS" if ok else "FAIL"


def describe_tree() -> str:
    """Commit and local changes under src/, so that figures can be tied to code (read-only git)."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # never let `git status` rewrite the index

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, env=env)
        except OSError:  # no git: the figures are still worth printing
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "src").splitlines()
    return f"commit {commit}" + (f" + {len(changed)} modified file(s) under src/" if changed else "")


def report(runs: Sequence[WorkerRun], args: argparse.Namespace, context: Sequence[str]) -> tuple[bool, bool]:
    """Print the table and the targets; return (every run was clean, every target was met)."""
    print("\n" + "=" * 118)
    print(
        f"GET /user-keys, {args.users:,} enrolled users, wrk {args.threads} threads x "
        f"{args.connections} connections, {args.duration:g} s per case, loopback"
        + (f", median of {args.rounds} rounds" if args.rounds > 1 else "")
    )
    print("access log ON (the default): text lines on stderr, redirected to a file - what an operator gets")
    for line in context:
        print(line)
    header = (
        f"{'workers':<8}{'case':<12}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'vs hello':>9}"
        f"{'srv µs/req':>11}{'srv CPU':>8}{'wrk CPU':>8}{'requests':>10}{'non-2xx':>8}{'sock err':>9}  notes"
    )
    print(header)
    print("-" * len(header))
    clean = True
    for run in runs:
        hello = run.case("hello-world").result.rps
        for name in CASES:
            case = run.case(name)
            r = case.result
            seconds = r.duration_us / 1e6 or 1.0
            share = f"{r.rps / hello:.0%}" if hello and name != "hello-world" else ""
            notes = []
            if len(run.rounds[name]) > 1:
                notes.append("rounds " + "/".join(f"{c.result.rps:,.0f}" for c in run.rounds[name]))
            if name == "storm":
                notes.append(f"pool {r.pool_used:,}/{r.pool_size:,} used")
            if case.steal >= 0.02:
                notes.append(f"{case.steal:.0%} CPU stolen by the hypervisor")
            if case.others_cores >= 0.1:
                notes.append(f"OTHER PROCESSES USED {case.others_cores:.2f} CORES")
            if r.exhausted:
                notes.append(f"POOL RAN OUT ({r.exhausted})")
            if any(c.failed for c in run.rounds[name]):
                notes.append("ERRORS - figures not valid")
                clean = False
            non2xx = max(r.status_errors, case.bad_statuses)
            print(
                f"{run.workers:<8}{name:<12}{r.rps:>9,.0f}{r.p50_us / 1000:>8.2f}{r.p99_us / 1000:>8.2f}"
                f"{share:>9}{case.server_us_per_request:>11,.0f}{case.server_cpu_seconds / seconds:>8.2f}"
                f"{r.wrk_cpu_seconds / seconds:>8.2f}{r.requests:>10,}{non2xx:>8}{r.socket_errors:>9}"
                f"  {'; '.join(notes)}"
            )
        placement = (
            "server on CPU 0, wrk on CPU 1" if run.pinned else "not pinned: server and wrk share 2 cores"
        )
        print(f"{'':<8}({placement}; token signing ran at {run.mint_rate:,.0f}/s in this block)")
    print(
        "srv µs/req: CPU of all service processes during the run / requests. srv CPU, wrk CPU: cores kept\n"
        "busy (wrk's includes loading its tokens). non-2xx: wrk's count or the access log's, the larger.\n"
        "Token signing is fixed work: if its rate differs much between blocks, the machine's speed changed."
    )
    print("\ntargets")
    met = True
    for run in runs:
        hello = run.case("hello-world").result.rps
        storm = run.case("storm").result
        fraction = storm.rps / hello if hello else 0.0
        ok = fraction >= STORM_SHARE_TARGET
        met &= ok
        print(
            f"  [{mark(ok)}] workers={run.workers}: storm {fraction:.0%} of hello-world "
            f"(target >= {STORM_SHARE_TARGET:.0%})"
        )
        if run.workers == 2:
            ok = storm.rps >= STORM_RPS_TARGET
            met &= ok
            print(f"  [{mark(ok)}] workers=2: storm {storm.rps:,.0f} req/s (target >= {STORM_RPS_TARGET:,})")
        for name in ("storm", "reused"):
            p99 = run.case(name).result.p99_us / 1000
            ok = p99 < P99_TARGET_MS
            met &= ok
            print(
                f"  [{mark(ok)}] workers={run.workers}: {name} p99 {p99:.2f} ms at {args.connections} "
                f"connections (target < {P99_TARGET_MS:g} ms)"
            )
    if 2 not in {run.workers for run in runs}:
        print(f"  [----] storm >= {STORM_RPS_TARGET:,} req/s applies to 2 workers, which were not run")
    if not clean:
        print("\nSOME RUNS HAD ERRORS: their figures are not valid (see notes)")
    return clean, met


def warnings_in_logs(folder: Path) -> list[str]:
    """Service log lines at WARNING or above: a fast run that logged errors needs a look."""
    lines = []
    for path in sorted(folder.glob("service-w*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "keyconnector.core.access:" not in line and (" WARNING " in line or " ERROR " in line):
                lines.append(f"{path.name}: {line}")
    return lines


# -- main ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options, with bounds that keep every run finite."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=10_000, help="users to enrol (10000)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per measured case (10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--warmup", type=float, default=2, help="warm-up seconds before each case (2)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per case; the median is shown (1)")
    parser.add_argument("--enrol-concurrency", type=int, default=8, help="POSTs in flight enrolling (8)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (1,2)")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    args = parser.parse_args(argv)
    try:
        args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers needs positive integers, e.g. 1,2")
    if not args.worker_counts or min(args.worker_counts) < 1:
        parser.error("--workers needs positive integers, e.g. 1,2")
    if args.users < max(args.threads, 1) or args.connections < args.threads or args.threads < 1:
        parser.error("need users >= threads >= 1 and connections >= threads")
    if not 0 < args.duration <= 120 or not 0 < args.warmup <= 30 or not 1 <= args.rounds <= 9:
        parser.error("bounded runs: --duration in (0, 120], --warmup in (0, 30], --rounds in 1..9")
    if args.enrol_concurrency < 1:
        parser.error("--enrol-concurrency must be at least 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything; exit 1 when a run had errors (2 for a missed target with --strict), for CI."""
    args = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) must unwind like Ctrl-C does, so that the finally blocks stop
    # the service, the issuer and the signing processes instead of leaving them behind.
    signal.signal(signal.SIGTERM, _terminate)
    wrk, taskset = require_tools()
    if taskset is None:
        print("taskset (util-linux) not found: nothing is pinned, figures are noisier")
    if (os.cpu_count() or 1) < 2:
        print("fewer than 2 CPUs: pinning server and wrk to separate cores is impossible")
        taskset = None
    started = time.monotonic()
    busy = machine_busy()
    context = [
        f"{describe_tree()}; Python {platform.python_version()}; {os.cpu_count()} CPUs; "
        f"before the run the machine was {busy:.0%} busy with other work"
        + (" - FIGURES MAY BE LOW" if busy > 0.1 else ""),
        f"enrolment through the workers={args.worker_counts[0]} service",
    ]
    print(context[0])
    runs: list[WorkerRun] = []
    with (
        tempfile.TemporaryDirectory(prefix="keyconnector-bench-") as tmp,
        DevIssuer() as issuer,
        TokenMinter(signing_material(issuer), processes=2) as minter,
    ):
        folder = Path(tmp)
        password = "bench-pfx-password"
        pfx = folder / "key.pfx"
        pfx.write_bytes(self_signed_pfx(password, bits=2048))
        script = folder / "bench.lua"
        script.write_text(LUA)
        env = service_env(issuer.url, pfx, password, folder / "keyconnector.db")

        users = [uuid.uuid4() for _ in range(args.users)]
        t0 = time.monotonic()
        tokens = dict(zip(users, minter.mint(users), strict=True))
        print(f"minted {len(users):,} enrolment tokens in {time.monotonic() - t0:.1f} s (2 processes)")
        keys = {user: os.urandom(32) for user in users}
        setup = Setup(wrk, taskset, folder, script, minter, users, keys, tokens, args)
        for index, workers in enumerate(args.worker_counts):
            runs.append(run_worker_count(setup, env, workers, first=index == 0))
        problems = warnings_in_logs(folder)
    clean, met = report(runs, args, context)
    if problems:
        print(f"\nthe service logged {len(problems)} warning/error line(s); first ones:")
        for line in problems[:10]:
            print("  " + line)
    print(f"\ntotal run time {time.monotonic() - started:.0f} s")
    if not clean:
        return 1
    return 2 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())
