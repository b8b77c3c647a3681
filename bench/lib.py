"""Helpers of the benchmarks: token minting in worker processes, a service process, and wrk.

A module of its own so that every benchmark in this folder drives the service, mints tokens and
reads wrk the same way (``user_keys.py``, ``databases.py``), and so that the signing functions the
spawned minting processes run have a stable import path.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer

# -- token minting ---------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@dataclass(frozen=True)
class SigningMaterial:
    """What a minting process needs: the issuer's key, its JOSE header, and a claims template."""

    private_pem: bytes
    header_segment: str
    template: dict[str, Any]


def signing_material(issuer: DevIssuer) -> SigningMaterial:
    """Copy the issuer's current signing key and the shape of its tokens for the minting processes.

    ``DevIssuer.mint_many`` mints for random new users only, and the storm needs many distinct tokens
    for *enrolled* users, so we sign ourselves. The issuer has no public accessor for its private key:
    ``_signing_key`` is the one private call this benchmark makes (see bench/README.md).
    """
    _, key = issuer._signing_key(None, None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise RuntimeError("the dev issuer's current key is not RSA; the benchmark signs RS256")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # A real token from the issuer gives the exact header (kid, typ) and claim set to imitate.
    header_segment, payload_segment, _ = issuer.mint(uuid.uuid4()).split(".")
    template = json.loads(_b64url_decode(payload_segment))
    return SigningMaterial(pem, header_segment, template)


_worker: dict[str, Any] = {}


def _init_minter(material: SigningMaterial) -> None:
    """Load the key once per minting process, not once per batch."""
    _worker["key"] = serialization.load_pem_private_key(material.private_pem, password=None)
    _worker["header"] = material.header_segment
    _worker["template"] = material.template


def _sign_batch(subjects: list[str]) -> list[str]:
    """Tokens for ``subjects``, each with fresh jti/device/times: all distinct, even for one user."""
    key: rsa.RSAPrivateKey = _worker["key"]
    header: str = _worker["header"]
    template: dict[str, Any] = _worker["template"]
    pad, digest = padding.PKCS1v15(), hashes.SHA256()
    now = int(time.time())
    lifetime = int(template["exp"]) - int(template["iat"])
    out: list[str] = []
    for sub in subjects:
        claims = dict(template)
        claims.update(
            sub=sub,
            jti=secrets.token_hex(16).upper(),
            device=str(uuid.uuid4()),
            iat=now,
            nbf=now,
            auth_time=now,
            exp=now + lifetime,
        )
        signing_input = header + "." + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        out.append(signing_input + "." + _b64url(key.sign(signing_input.encode("ascii"), pad, digest)))
    return out


class TokenMinter:
    """RS256 signing spread over a pool of processes (an RSA-2048 signature costs ~0.25 ms of CPU).

    Processes are spawned, not forked: the issuer's HTTP thread is running in this process.
    """

    def __init__(self, material: SigningMaterial, processes: int = 2, batch: int = 2000) -> None:
        self._batch = batch
        self._pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=get_context("spawn"),
            initializer=_init_minter,
            initargs=(material,),
        )

    def mint(self, subjects: Sequence[uuid.UUID]) -> list[str]:
        """One new token per entry of ``subjects`` (repeat a user to get several tokens for them)."""
        texts = [str(s) for s in subjects]
        batches = [texts[i : i + self._batch] for i in range(0, len(texts), self._batch)]
        return [token for batch in self._pool.map(_sign_batch, batches) for token in batch]

    def close(self) -> None:
        """Stop the signing processes; pending batches are dropped (we only close on the way out)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TokenMinter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- the service -------------------------------------------------------------------------------------


def service_env(issuer_url: str, pfx_path: Path, pfx_password: str, database: Path) -> dict[str, str]:
    """The environment an operator would set for SQLite + a PFX (as tests/conftest.py::base_env).

    Nothing else is tuned: the access log and metrics stay on and ``lastAccessFlushSeconds`` keeps its
    default. Rate limits are off: the load generator is one address sending far more than any real
    client population behind one address would.
    """
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    env.pop("ASPNETCORE_URLS", None)
    env.update(
        {
            "keyConnectorSettings__identityServerUri": issuer_url,
            "keyConnectorSettings__webVaultUri": "https://vault.example.com/",
            "keyConnectorSettings__database__provider": "sqlite",
            "keyConnectorSettings__database__sqliteConnectionString": f"Data Source={database}",
            "keyConnectorSettings__rsaKey__provider": "certificate",
            "keyConnectorSettings__certificate__provider": "filesystem",
            "keyConnectorSettings__certificate__filesystemPath": str(pfx_path),
            "keyConnectorSettings__certificate__filesystemPassword": pfx_password,
            "keyConnectorSettings__rateLimit__perUserPerMinute": "0",
            "keyConnectorSettings__rateLimit__perAddressPerMinute": "0",
            "keyConnectorSettings__rateLimit__failedAuthPerAddressPerMinute": "0",
        }
    )
    return env


class Service:
    """``keyconnector serve`` in its own process group, stdout+stderr appended to ``log_path``.

    ``cpus`` (e.g. ``"0"``) runs it under ``taskset``; granian's workers inherit the affinity.
    """

    def __init__(self, env: dict[str, str], log_path: Path, *, workers: int, cpus: str | None) -> None:
        self.env = env
        self.log_path = log_path
        self.workers = workers
        self.cpus = cpus
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 60) -> Service:
        command = [sys.executable, "-m", "keyconnector", "serve", "--port", str(self.port)]
        command += ["--workers", str(self.workers)]
        if self.cpus is not None:
            command = ["taskset", "-c", self.cpus, *command]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the service did not become ready in {timeout:.0f} s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        """The process-group leader (granian's parent); its workers are found with process_tree()."""
        if self.process is None:
            raise RuntimeError("the service is not started")
        return self.process.pid

    def tail(self, lines: int = 30) -> str:
        """The end of the service's output, for an error message when it will not start."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_size(self) -> int:
        """Byte offset of the log's end: brackets one run's access-log lines."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL after 15 s; safe to call twice."""
        process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None


_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (granian's parent and worker processes), from /proc."""
    found, index = [pid], 0
    while index < len(found):
        parent = found[index]
        index += 1
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):  # the task ended meanwhile
                found += [int(c) for c in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time consumed so far by ``pids`` (all their threads), from /proc/PID/stat."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of stat(5)
    return ticks / _TICKS_PER_SECOND


@dataclass(frozen=True)
class CpuTimes:
    """The machine-wide line of /proc/stat, in ticks: enough to tell busy, idle and stolen time."""

    total: int
    busy: int
    steal: int

    @staticmethod
    def now() -> CpuTimes:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        f += [0] * (8 - len(f))
        user, nice, system, _idle, _iowait, irq, softirq, steal = f
        return CpuTimes(sum(f), user + nice + system + irq + softirq, steal)

    def busy_since(self, before: CpuTimes) -> float:
        """Share of all CPUs doing work (anyone's) since ``before``."""
        return (self.busy - before.busy) / max(1, self.total - before.total)

    def busy_seconds_since(self, before: CpuTimes) -> float:
        """CPU-seconds of work done on the machine since ``before``, by every process."""
        return (self.busy - before.busy) / _TICKS_PER_SECOND

    def steal_since(self, before: CpuTimes) -> float:
        """Share of CPU time the hypervisor gave to other guests: a noisy neighbour skews figures."""
        return (self.steal - before.steal) / max(1, self.total - before.total)


def machine_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over ``seconds``: other work on the machine skews every figure."""
    before = CpuTimes.now()
    time.sleep(seconds)
    return CpuTimes.now().busy_since(before)


_ACCESS_LINE = re.compile(rb"keyconnector\.access: (\S+) (\S+) (\d{3}) ")


def access_log_statuses(path: Path, start: int, end: int) -> Counter[tuple[str, int]]:
    """Count (path, status) over the access-log lines between two byte offsets of the service log.

    A cross-check of wrk's error count that also sees 3xx (wrk counts only status > 399).
    """
    with open(path, "rb") as handle:
        handle.seek(start)
        chunk = handle.read(max(0, end - start))
    return Counter((m[2].decode(), int(m[3])) for m in _ACCESS_LINE.finditer(chunk))


# -- wrk ---------------------------------------------------------------------------------------------

LUA = r"""
-- Requests are formatted once in init(); request() only hands the next one out, so wrk spends the
-- same small effort per request in every case. Arguments: <token file prefix> <mode>, mode being
--   once:  each token once; past the end of its slice a thread sends a token the service rejects
--          (so the run shows errors instead of silently reusing tokens), counts it, and stops;
--   cycle: the thread's slice of tokens round and round;
--   alive: GET /alive without a token.
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local prefix, mode_arg = args[1], args[2]
  mode = mode_arg
  reqs = {}
  if mode == "alive" then
    reqs[1] = wrk.format("GET", "/alive")
  else
    for line in io.lines(prefix .. "." .. id) do
      if #line > 0 then
        reqs[#reqs + 1] = wrk.format("GET", wrk.path, { ["Authorization"] = "Bearer " .. line })
      end
    end
  end
  n = #reqs
  i = 0
  exhausted = 0
  sentinel = wrk.format("GET", wrk.path, { ["Authorization"] = "Bearer pool.exhausted.x" })
end

function request()
  i = i + 1
  if i > n then
    if mode == "once" then
      exhausted = exhausted + 1
      if exhausted == 1 then wrk.thread:stop() end
      return sentinel
    end
    i = 1
  end
  return reqs[i]
end

function done(summary, latency, requests)
  local exhausted_total, used, size, busiest = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    exhausted_total = exhausted_total + (t:get("exhausted") or 0)
    local ti, tn = t:get("i") or 0, t:get("n") or 0
    used = used + math.min(ti, tn)
    busiest = math.max(busiest, math.min(ti, tn))
    size = size + tn
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH-RESULT {"requests":%d,"duration_us":%d,"status_errors":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"exhausted":%d,' ..
    '"pool_used":%d,"pool_size":%d,"busiest_thread_used":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(99)), math.floor(latency.max),
    exhausted_total, used, size, busiest))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run, as reported by the Lua ``done()`` hook (latencies in microseconds)."""

    requests: int
    duration_us: int
    status_errors: int
    connect: int
    read: int
    write: int
    timeout: int
    p50_us: int
    p99_us: int
    max_us: int
    exhausted: int
    pool_used: int
    pool_size: int
    busiest_thread_used: int
    wrk_cpu_seconds: float = 0.0

    @property
    def rps(self) -> float:
        """Completed requests over wrk's measured time (its start-up, token loading, is excluded)."""
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0

    @property
    def socket_errors(self) -> int:
        """Connect/read/write errors and timeouts: requests that never got an HTTP answer."""
        return self.connect + self.read + self.write + self.timeout


def require_tools() -> tuple[str, str | None]:
    """Paths of wrk and taskset; a missing wrk is fatal with a hint, a missing taskset only unpins."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit(
            "wrk is not installed. `make bench` installs it (Debian package 'wrk'), "
            "or run: apt-get install wrk"
        )
    return wrk, shutil.which("taskset")


def write_slices(folder: Path, name: str, tokens: Sequence[str], threads: int) -> Path:
    """Split ``tokens`` into one contiguous file per wrk thread (``name.0``, ``name.1``...)."""
    prefix = folder / name
    size = -(-len(tokens) // threads) if tokens else 0
    for t in range(threads):
        chunk = tokens[t * size : (t + 1) * size]
        (folder / f"{name}.{t}").write_text("\n".join(chunk) + "\n")
    return prefix


def run_wrk(
    wrk: str,
    script: Path,
    url: str,
    *,
    prefix: Path | None,
    mode: str,
    threads: int,
    connections: int,
    duration: float,
    cpus: str | None,
) -> WrkResult:
    """Run wrk once and parse its result line; bounded by a timeout well past ``duration``."""
    command = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s"]
    command += ["--timeout", "5s", "-s", str(script), url, "--", str(prefix or "-"), mode]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            result = WrkResult(**json.loads(line.removeprefix("BENCH-RESULT ")))
            return replace(result, wrk_cpu_seconds=used)
    raise RuntimeError(f"wrk failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
