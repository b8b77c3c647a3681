"""``keyconnector check``: each part of a deployment tested on its own, one line each.

The checks only read: a check never creates a database, a schema or a data key, so it is safe
to run against production before switching over. With ``--tls-cert/--tls-key`` and ``--host/--port``
it also checks what ``serve`` would refuse at start (the TLS pair, the listening address), so that
one command catches every mistake ``serve`` would stop on.

Exit codes (``errors.ExitCode``): 0 every check passed; 2 the settings do not load; 3 the only
failures are dependencies that cannot be reached now (database, key provider, identity server),
which a retry may cure; 1 any other failure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from keyconnector.core.keyring import KeyRing, NotAdopted, RingRefused, algorithm_notice
from keyconnector.errors import (
    ConfigurationError,
    ExitCode,
    KeyConnectorError,
    UnavailableError,
    UsageError,
    setting_name,
)
from keyconnector.keypairs.base import KeyProvider, algorithm_label, readers
from keyconnector.ops import Subcommands, add_settings_arguments, load_settings_from
from keyconnector.ops.report import add_json_option, emit_json, wants_json
from keyconnector.runtime.assemble import load_data_keys, open_database, open_key_pair
from keyconnector.runtime.notices import cors_notice, way_back_notice
from keyconnector.runtime.settings import (
    DatabaseSettings,
    LoadedSettings,
    RateLimitSettings,
    SideSettings,
    identity_server_uri,
    side_of,
    web_vault_uri,
)
from keyconnector.runtime.trust import Trust
from keyconnector.storage.base import Repository
from keyconnector.storage.registry import inspect

log = logging.getLogger("keyconnector")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    warning: bool = False
    unavailable: bool = False
    """A failure because a dependency cannot be reached now (exit 3 when every failure is one)."""

    @property
    def status(self) -> str:
        return "ok" if self.ok and not self.warning else ("warn" if self.ok else "fail")

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.status]
        return f"{mark} {self.name}: {self.detail}"

    def document(self) -> dict[str, Any]:
        """One entry of ``check --json``'s ``results`` (docs/cli.md)."""
        return {
            "name": self.name,
            "ok": self.ok,
            "status": self.status,
            "message": self.detail,
            "unavailable": self.unavailable,
        }


def failed(name: str, exc: KeyConnectorError) -> CheckResult:
    """A FAIL line for ``exc``, marked unavailable when it is a dependency that is down."""
    return CheckResult(name, False, str(exc), unavailable=isinstance(exc, UnavailableError))


def exit_code(results: list[CheckResult]) -> ExitCode:
    """0 when nothing failed; 3 when every failure is an unreachable dependency; else 1."""
    failures = [result for result in results if not result.ok]
    if not failures:
        return ExitCode.OK
    if all(result.unavailable for result in failures):
        return ExitCode.UNAVAILABLE
    return ExitCode.FAILED


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "check",
        help="check the settings, database, key pair and identity server (read-only)",
        description=(
            "Tests each part of a deployment on its own and prints one line per part (ok, warn, FAIL): "
            "the settings (unknown names, with the setting they probably meant), the database, the key "
            "pair (a wrapped key round-trips), the data keys and key ring, the identity server. It only "
            "reads: nothing is created. With --tls-cert/--tls-key it checks the TLS pair, and with "
            "--host/--port that serve could listen there, as serve would at start. Exit 0 when every "
            "check passed, 2 when the settings do not load, 3 when the only failures are dependencies "
            "that cannot be reached, 1 otherwise."
        ),
    )
    add_settings_arguments(parser)
    parser.add_argument("--host", help="check that serve could listen on this address (with --port or 5000)")
    parser.add_argument("--port", type=int, help="check that this port is free to listen on (with --host)")
    parser.add_argument("--tls-cert", metavar="PEM", help="check this certificate chain as serve would")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    add_json_option(parser, "the results")
    parser.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        loaded = load_settings_from(args)
    except ConfigurationError as exc:
        # Nothing else can be checked without settings: a configuration error, exit 2.
        return _report(args, [CheckResult("settings", False, str(exc))], ExitCode.USAGE)
    loaded.warn_unknown(log)
    results = asyncio.run(run_checks(loaded)) + _check_startup_options(args)
    return _report(args, results, exit_code(results))


def _report(args: argparse.Namespace, results: list[CheckResult], code: ExitCode) -> int:
    if wants_json(args):
        emit_json(
            {
                "ok": code is ExitCode.OK,
                "exit_code": int(code),
                "results": [result.document() for result in results],
            }
        )
    else:
        for result in results:
            print(result.line())
    return int(code)


def _check_startup_options(args: argparse.Namespace) -> list[CheckResult]:
    """What ``serve`` refuses before it starts, for the options given: the listening address (only
    with ``--host``/``--port``: checked without them, a check run next to the running service would
    fail on the service's own port) and the TLS pair."""
    from keyconnector.runtime import server
    from keyconnector.runtime.tlspair import check_tls_pair

    results: list[CheckResult] = []
    if args.host is not None or args.port is not None:
        try:
            listen = server.listen_address(args.host, args.port)
            server.take_port(listen).close()
            results.append(CheckResult("listen", True, f"{listen.host}:{listen.port} is free to listen on"))
        except UsageError as exc:
            results.append(CheckResult("listen", False, str(exc)))
    if args.tls_cert or args.tls_key:
        try:
            if not (args.tls_cert and args.tls_key):
                raise UsageError("--tls-cert", "--tls-cert and --tls-key go together")
            check_tls_pair(args.tls_cert, args.tls_key)
            results.append(
                CheckResult("tls", True, f"{args.tls_key} is the private key of {args.tls_cert}, valid now")
            )
        except UsageError as exc:
            results.append(CheckResult("tls", False, str(exc)))
    return results


async def run_checks(loaded: LoadedSettings) -> list[CheckResult]:
    settings = loaded.settings
    side = side_of(settings)
    results = [
        CheckResult("settings", True, "loaded from " + (", ".join(loaded.sources) or "defaults only")),
    ]
    for name in loaded.unknown:
        meant = loaded.suggestion(name)
        detail = (
            f"unknown setting {name} is ignored (a typo? did you mean {meant}?)"
            if meant
            else f"unknown setting {name} is ignored (a typo?)"
        )
        results.append(CheckResult("settings", True, detail, warning=True))
    notice = loaded.upstream_logging_notice()
    if notice:
        results.append(CheckResult("settings", True, notice, warning=True))
    try:
        web_vault_uri(settings)
    except ConfigurationError as exc:
        # init's placeholder: serve refuses it, so check fails it (a missing one only warns, below).
        results.append(CheckResult("web vault", False, str(exc)))
    cors = cors_notice(settings.web_vault_uri)
    if cors is not None:
        results.append(CheckResult("cors", True, cors, warning=True))
    from keyconnector.runtime.permissions import loose_files

    results += [CheckResult("permissions", True, problem, warning=True) for problem in loose_files(settings)]

    repository: Repository | None = None
    has_data = False
    new_database = False
    try:
        state = inspect(settings.database, trust=Trust.from_settings(settings))
        has_data = state.has_schema
        new_database = not has_data
        results.append(CheckResult("database", True, state.description))
    except KeyConnectorError as exc:
        results.append(failed("database", exc))
    transport = _check_transport(settings.database, Trust.from_settings(settings))
    if transport is not None:
        results.append(transport)

    provider: KeyProvider | None = None
    try:
        # The assembly's steps, one line each (``assemble.open_core`` would stop at the first failure).
        provider = await open_key_pair(side, checked=False)
        await provider.check()
        results.append(CheckResult("key pair", True, f"{provider.description}; a wrapped key round-trips"))
    except KeyConnectorError as exc:
        results.append(failed("key pair", exc))
    if provider is not None:
        results += _key_choice(provider)

    if new_database:
        # Whether serve makes a data key is the one thing a takeover must never learn afterwards.
        results.append(
            CheckResult("data key", True, "none yet: `serve` would make data key version 1 at start")
        )
    if provider is not None and has_data:
        try:
            repository = await open_database(side, create=False)
            results += await _check_data_keys(repository, provider, side)
        except KeyConnectorError as exc:
            results.append(failed("data key", exc))

    results.append(await _check_identity(loaded))
    results.append(_check_client_addresses(settings.rate_limit))
    for closeable in (provider, repository):
        if closeable is not None:
            await closeable.aclose()
    return results


def _key_choice(provider: KeyProvider) -> list[CheckResult]:
    """How a PKCS#11 key was chosen: during a takeover, which reading of ``pkcs11PrivateKeyId``
    (upstream's number or this service's older hex bytes) found the key, and a label that was ignored."""
    from keyconnector.keypairs.pkcs11 import Pkcs11KeyProvider

    if not isinstance(provider, Pkcs11KeyProvider):
        return []
    results = []
    if provider.key_id_match is not None:
        results.append(CheckResult("key id", True, provider.key_id_match))
    if provider.label_warning is not None:
        results.append(CheckResult("key id", True, provider.label_warning, warning=True))
    return results


def _check_transport(database: DatabaseSettings, trust: Trust | None = None) -> CheckResult | None:
    """Whether a network attacker could stand in for the database (and so write it), judged from the
    connection string alone: it is worth saying even when the server cannot be reached right now.

    None for file databases (nothing travels over a network) and for a connection string that does
    not parse (the ``database`` line already names what is wrong with it). ``trust`` is the
    deployment's (the warning names its folder); None means the default folder's.
    """
    from keyconnector.storage.registry import server_target
    from keyconnector.storage.sql.common import transport_summary, transport_warning

    try:
        target = server_target(database, trust=trust)
    except KeyConnectorError:
        return None
    if target is None:
        return None
    warning = transport_warning(target)
    if warning is not None:
        return CheckResult("database transport", True, warning, warning=True)
    return CheckResult("database transport", True, transport_summary(target))


async def _check_identity(loaded: LoadedSettings) -> CheckResult:
    from keyconnector.auth import TokenValidator

    settings = loaded.settings
    try:
        uri = identity_server_uri(settings)
    except ConfigurationError as exc:
        return CheckResult("identity server", False, str(exc))
    validator = TokenValidator(uri, verify=Trust.from_settings(settings))
    try:
        await validator.refresh()
        return CheckResult("identity server", True, validator.status())
    except KeyConnectorError as exc:
        # The words of the service's readiness (``/health/ready`` says "degraded" and stays 200, so
        # that an outage every replica shares does not empty the load balancer); a FAIL here all the
        # same: before a takeover, an identity server this host cannot reach is a reason to stop.
        from keyconnector.http.services import IDENTITY_DEGRADED

        return CheckResult(
            "identity server",
            False,
            f"{IDENTITY_DEGRADED}: {exc} (setting {setting_name('identityServerUri')})",
            unavailable=isinstance(exc, UnavailableError),
        )
    finally:
        await validator.aclose()


async def _check_data_keys(
    repository: Repository, provider: KeyProvider, side: SideSettings
) -> list[CheckResult]:
    """The data keys as ``serve`` would load them: through the authenticated key ring, read-only.

    The same assembly as the service and the operations (``assemble.load_data_keys``), so that
    ``check`` cannot contradict ``serve`` (during a key-pair rotation, say, when ApplicationDatas
    still holds the old pair's wrap and the new pair's wraps are only in the ring)."""
    try:
        opened = await load_data_keys(repository, provider, side, read_only=True)
    except NotAdopted as exc:
        # ``abandons``: allowNewDataKey is set over existing records, which the new key never opens.
        return [CheckResult("data key", True, str(exc), warning=exc.abandons > 0)]
    except RingRefused as exc:
        return [CheckResult("key ring", False, str(exc))]
    ring = opened.ring
    versions = ", ".join(str(number) for number in sorted(opened.keys.keys))
    keys = CheckResult(
        "data key",
        True,
        f"version(s) {versions} unwrap with this key pair; version {ring.current} seals new records; "
        "`serve` makes no new data key",
    )
    way_back = await way_back_notice(repository, opened.keys)
    notices = [] if way_back is None else [CheckResult("way back", True, way_back, warning=True)]
    notices += _wrap_algorithms(ring, provider)
    if opened.adopted:
        return [keys, CheckResult("key ring", True, f"{opened.adopted} (anchor {ring.anchor})"), *notices]
    legacy = "accepted" if ring.accept_legacy else "refused (every record is bound to its user)"
    pinned = " (pinned by keyRingAnchor)" if side.key_ring_anchor else ""
    return [
        keys,
        CheckResult(
            "key ring",
            True,
            f"revision {ring.revision} authenticates; anchor {ring.anchor}{pinned}; upstream-format "
            f"records {legacy}",
        ),
        *notices,
    ]


def _wrap_algorithms(ring: KeyRing, provider: KeyProvider) -> list[CheckResult]:
    """Which algorithm each active version's wraps use, and, when the key pair wraps otherwise than
    upstream (``rsaKey.wrapAlgorithm``), what that means for the way back: upstream reads only
    ``ApplicationDatas``, which keeps upstream's SHA-1 wrap of version 1."""
    lines = []
    for number in ring.active:
        wraps = sorted({algorithm_label(fp) for fp in ring.versions[number].wraps})
        lines.append(f"version {number}: {', '.join(wraps) or 'only in ApplicationDatas'}")
    detail = f"this key pair wraps with {algorithm_label(provider.fingerprint)}; the key ring holds " + (
        "; ".join(lines)
    )
    results = [CheckResult("wrap algorithm", True, detail)]
    notice = algorithm_notice(ring, provider)
    if notice is not None:
        results.append(CheckResult("wrap algorithm", True, notice, warning=True))
    if len(readers(provider)) > 1:
        results.append(
            CheckResult(
                "wrap algorithm",
                True,
                "ApplicationDatas keeps version 1 wrapped with upstream's RSA-OAEP (SHA-1), which is all "
                "upstream reads: the way back (`keyconnector downgrade-records`) needs no change of "
                "algorithm, and upstream never sees the key ring's SHA-256 wraps",
            )
        )
    return results


def _check_client_addresses(limits: RateLimitSettings) -> CheckResult:
    """How the service will tell clients apart. ``check`` sees no traffic, so it cannot know whether a
    reverse proxy is in front (the running service says so in its log and ``/health/ready`` as soon
    as one forwards a request); it says what an empty ``trustedProxies`` means, as a warning when the
    per-address limits are on, since Bitwarden's installer always puts nginx in front."""
    if limits.trusted_proxies.strip():
        return CheckResult(
            "client addresses", True, f"X-Forwarded-For is believed from {limits.trusted_proxies}"
        )
    if limits.per_address_per_minute > 0 or limits.failed_auth_per_address_per_minute > 0:
        return CheckResult(
            "client addresses",
            True,
            f"{setting_name('rateLimit.trustedProxies')} is empty: behind a reverse proxy every client "
            "shares the proxy's address and its per-address rate-limit buckets; set it to the proxy's "
            "address (the service logs it when one forwards a request)",
            warning=True,
        )
    return CheckResult(
        "client addresses",
        True,
        f"{setting_name('rateLimit.trustedProxies')} is empty: behind a reverse proxy every client has "
        "the proxy's address",
    )
