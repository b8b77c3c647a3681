"""``keyconnector status``: ask a running instance how it is, as ``vault status`` does.

Why a command rather than ``curl``: the answer a script needs is an exit code (0 ready, 1 answering
but not ready or degraded, 3 not answering), and an operator needs the parts that are not ``ok``
spelled out, with the version that runs, the data-key versions it holds and its number of worker
processes; all from ``/health/ready`` (an older instance without them in its answer: the version from
``keyconnector_build_info``, when ``/metrics`` is served on the same port).

The default URL is where ``serve`` listens by default (``ASPNETCORE_URLS``, else 127.0.0.1:5000),
with a wildcard address asked on loopback. An ``https`` URL is verified with the deployment's
trust store (``caCertificatesDirectory``), as every other outgoing connection is.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from keyconnector.errors import ConfigurationError, ExitCode, UsageError
from keyconnector.ops import Subcommands, add_settings_arguments, load_settings_from
from keyconnector.ops.report import add_json_option, emit_json, plain_table, wants_json
from keyconnector.runtime.trust import Trust

TIMEOUT_SECONDS = 10.0
"""Per request: ``/health/ready`` waits up to 5 s for each of its own probes."""

_BUILD_INFO = re.compile(r'^keyconnector_build_info\{[^}]*version="([^"]*)"[^}]*\}\s+1(?:\.0)?\s*$', re.M)


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "status",
        help="ask a running instance whether it is ready (exit 0 ready, 1 not ready/degraded, 3 unreachable)",
        description=(
            "Asks a running keyconnector for /health/ready and prints its state, each part's check "
            "(database, key provider, data key, key ring, identity server, client addresses), the "
            "version, the data-key versions the answering worker holds and the number of workers. "
            "Exit 0 when ready, 1 when it "
            "answers but is not ready or degraded, 3 when it cannot be reached."
        ),
    )
    parser.add_argument(
        "--url",
        help="the instance's base URL (default: serve's address from ASPNETCORE_URLS, else http://127.0.0.1:5000)",
    )
    add_settings_arguments(parser)
    add_json_option(parser, "the status")
    parser.set_defaults(func=cmd_status)


@dataclass
class Status:
    """What ``status`` learnt from one instance."""

    url: str
    reachable: bool = False
    state: str | None = None
    """``ready``, ``degraded``, ``unready``, or None when the answer was not keyconnector's."""
    http_status: int | None = None
    checks: dict[str, str] = field(default_factory=dict)
    version: str | None = None
    data_key: dict[str, Any] | None = None
    """``{"current": n, "active": [...]}`` as the answering worker holds them, or None (not loaded,
    or an instance that does not say)."""
    workers: int | None = None
    error: str | None = None

    @property
    def exit_code(self) -> ExitCode:
        if not self.reachable:
            return ExitCode.UNAVAILABLE
        return ExitCode.OK if self.state == "ready" else ExitCode.FAILED

    def document(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ok": self.exit_code is ExitCode.OK,
            "exit_code": int(self.exit_code),
            "reachable": self.reachable,
            "status": self.state,
            "http_status": self.http_status,
            "version": self.version,
            "data_key": self.data_key,
            "workers": self.workers,
            "checks": self.checks,
            "error": self.error,
        }


def default_url() -> str:
    """``serve``'s default address as a URL to ask: a wildcard host is asked on loopback."""
    from keyconnector.runtime.server import listen_address

    listen = listen_address(None, None)
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - mapped away from
    host = wildcard.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if listen.https else 'http'}://{host}:{listen.port}"


def _trust(args: argparse.Namespace) -> Trust:
    """The deployment's trust store when its settings load, else the default folder's: ``status``
    must still answer about an instance whose settings this shell does not have."""
    try:
        return Trust.from_settings(load_settings_from(args).settings)
    except ConfigurationError:
        return Trust.from_directory()


def ask(url: str, trust: Trust | None = None) -> Status:
    """``/health/ready`` and the version, from the instance at ``url``."""
    base = url.rstrip("/")
    status = Status(base)
    verify: Any = (trust or Trust.from_directory()).ssl_context() if base.startswith("https:") else False
    try:
        with httpx.Client(base_url=base, timeout=TIMEOUT_SECONDS, verify=verify) as client:
            response = client.get("/health/ready")
            status.reachable = True
            status.http_status = response.status_code
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and body.get("status") in {"ready", "degraded", "unready"}:
                status.state = str(body["status"])
                checks = body.get("checks")
                status.checks = (
                    {str(k): str(v) for k, v in checks.items()} if isinstance(checks, dict) else {}
                )
                status.version = _text(body.get("version"))
                status.data_key = _data_key(body.get("dataKey"))
                workers = body.get("workers")
                status.workers = workers if type(workers) is int else None
            else:
                status.error = (
                    f"{base}/health/ready answered {response.status_code} without keyconnector's readiness"
                )
            if status.version is None:
                status.version = _version(client)
    except httpx.TransportError as exc:
        status.error = f"cannot reach {base}: {type(exc).__name__}: {exc}"
    return status


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _data_key(value: object) -> dict[str, Any] | None:
    """``dataKey`` of the readiness body when it has the expected shape, else None (never trusted
    blindly: the answer may come from something that is not keyconnector)."""
    if not isinstance(value, dict):
        return None
    current, active = value.get("current"), value.get("active")
    if type(current) is not int or not isinstance(active, list):
        return None
    if not all(type(v) is int for v in active):
        return None
    return {"current": current, "active": list(active)}


def _version(client: httpx.Client) -> str | None:
    """``keyconnector_build_info``'s version label, or None (metrics off, or on their own port)."""
    try:
        response = client.get("/metrics")
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        return None
    found = _BUILD_INFO.search(response.text)
    return found.group(1) if found else None


def cmd_status(args: argparse.Namespace) -> int:
    url = args.url or default_url()
    if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
        # Checked first and never echoed: the part before '@' may be a password.
        raise UsageError(
            "--url", "give the URL without a user name or password (the health endpoints need none)"
        )
    if not re.match(r"^https?://", url):
        raise UsageError("--url", f"'{url}' is not an http:// or https:// URL")
    status = ask(url, _trust(args))
    if wants_json(args):
        emit_json(status.document())
        return int(status.exit_code)
    print(f"url      {status.url}")
    if not status.reachable:
        print("status   unreachable")
        print(f"error    {status.error}")
        return int(status.exit_code)
    print(f"status   {status.state or 'unknown'} (HTTP {status.http_status})")
    print(f"version  {status.version or 'unknown (/metrics is off or on its own port)'}")
    if status.data_key is not None:
        loaded = ", ".join(str(v) for v in status.data_key["active"])
        print(f"data key version {status.data_key['current']} seals; loaded: {loaded}")
    else:
        print("data key not loaded")
    print(f"workers  {status.workers if status.workers is not None else 'unknown (not started by serve)'}")
    if status.error:
        print(f"error    {status.error}")
    if status.checks:
        print()
        print(plain_table(["CHECK", "STATE"], sorted(status.checks.items())))
    return int(status.exit_code)
