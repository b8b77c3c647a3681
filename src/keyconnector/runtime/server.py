"""Running the ASGI app under granian, with upstream's listening conventions.

Pre-flight happens once, in the parent, before any worker starts: the schema is migrated (waiting
for a database that is still coming up, as upstream does) and the data key is created if absent,
so that a misconfiguration fails fast with one clear message instead of once per worker.

Nothing is written before everything that can be checked without the network is: ``serve`` takes the
port (``runtime.listen``: range, host, free, and held so no other server shares it), reads the TLS
pair (``runtime.tlspair``) and checks the identity URL's form, and only then migrates and creates
the data key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keyconnector.core.keyring import RingRefused
from keyconnector.errors import UnavailableError, UsageError
from keyconnector.http.layers.drain import DRAIN_DIR_ENV, FLAG, idle_marker
from keyconnector.http.services import WORKERS_ENV
from keyconnector.runtime.assemble import guard_side, open_core
from keyconnector.runtime.listen import Listen, bind, sharing
from keyconnector.runtime.notices import cors_notice, development_identity_notice, way_back_notice
from keyconnector.runtime.permissions import warn_loose_permissions
from keyconnector.runtime.settings import (
    CONFIG_FILE_ENV,
    Settings,
    identity_server_uri,
    side_of,
    web_vault_uri,
)
from keyconnector.runtime.trust import Trust
from keyconnector.storage.registry import migrate, warn_insecure_transport
from keyconnector.telemetry import tracing

log = logging.getLogger("keyconnector.server")

DEFAULT_PORT = 5000
MIGRATION_ATTEMPTS = 10
WORKER_STOP_SECONDS = 5
"""After the drain, how long a worker may take to close (flush access times and audit entries)."""


def listen_address(host: str | None, port: int | None, environ: dict[str, str] | None = None) -> Listen:
    """``--host``/``--port`` win; else the first entry of ``ASPNETCORE_URLS``; else 127.0.0.1:5000."""
    environ = dict(os.environ) if environ is None else environ
    urls = environ.get("ASPNETCORE_URLS", "").strip()
    if host is None and port is None and urls:
        first = urls.split(";")[0].strip()
        parts = urlsplit(first.replace("://+", "://0.0.0.0").replace("://*", "://0.0.0.0"))
        try:
            given = parts.port
        except ValueError:
            raise UsageError(
                "ASPNETCORE_URLS", f"'{first}' has no valid port; use a number from 1 to 65535"
            ) from None
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise UsageError("ASPNETCORE_URLS", f"cannot read '{first}' as a URL like http://+:5000")
        default = 443 if parts.scheme == "https" else 80
        return Listen(parts.hostname, given or default, parts.scheme == "https", "ASPNETCORE_URLS")
    return Listen(host or "127.0.0.1", DEFAULT_PORT if port is None else port, False, "--port")


def take_port(listen: Listen) -> socket.socket:
    """Check the address and bind it, before anything is written: see ``runtime.listen``."""
    return bind(listen)


def check_https(listen: Listen, tls_cert: str | None, tls_key: str | None) -> None:
    """``ASPNETCORE_URLS=https://...`` needs the certificate: refused before anything is written."""
    if listen.https and not (tls_cert and tls_key):
        raise UsageError(
            "ASPNETCORE_URLS", "asks for https: give the certificate with --tls-cert PEM --tls-key PEM"
        )


def migrate_with_retries(settings: Settings, attempts: int = MIGRATION_ATTEMPTS) -> None:
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            migrate(settings.database, trust=Trust.from_settings(settings))
            return
        except UnavailableError as exc:
            if attempt == attempts:
                raise
            log.warning(
                "database not reachable (attempt %d of %d): %s; retrying in %.0fs",
                attempt,
                attempts,
                exc,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _prepare_data_key(settings: Settings) -> None:
    """Adopt what an earlier version or upstream left, or make data key version 1 and its
    authenticated ring: once, here, so that the workers start on a prepared database.

    The same assembly the operations use (``assemble.open_core``), without its ``create``: the
    schema was migrated just before, by ``migrate_with_retries`` (which waits for a database still
    coming up), and a second Alembic run at every start would only repeat it."""
    core = await open_core(side_of(settings))
    try:
        # Here, once, in the parent: the workers do not repeat it.
        notice = await way_back_notice(core.repository, core.keys)
        if notice is not None:
            log.warning("%s", notice)
    finally:
        await core.aclose()


def preflight(settings: Settings, *, tls_key: str | None = None) -> None:
    """Everything that should stop the service before it listens, with a message naming the setting.

    A key provider that cannot be reached is not one of them: it is reported, and the service
    starts anyway, answering user-key requests with 503 until the provider is back (an HSM or KMS
    outage should not turn into a crash loop, and the service then recovers by itself).
    """
    identity_server_uri(settings)
    web_vault_uri(settings)
    tracing.check(settings)
    greeting = development_identity_notice(settings.identity_server_uri)
    if greeting is not None:
        # INFO, once, here in the parent: it is what `make run` is for, not something gone wrong.
        log.info("%s", greeting)
    cors = cors_notice(settings.web_vault_uri)
    if cors is not None:
        log.warning("%s", cors)
    # Before the migration, which may create the database file (it does so with mode 0600).
    warn_loose_permissions(settings, tls_key=tls_key)
    # Before the first connection attempt, so the warning is there even while the database is down.
    warn_database_transport(settings)
    guard_takeover(settings)
    migrate_with_retries(settings)
    try:
        asyncio.run(_prepare_data_key(settings))
    except UnavailableError as exc:
        log.error("starting without the data key: %s; user-key requests get 503 until it is back", exc)
    except RingRefused as exc:
        log.error(
            "REFUSED the stored key ring: %s. Starting anyway: user-key requests get 503, and /health/ready "
            "says why, until a ring that authenticates is back",
            exc,
        )


def guard_takeover(settings: Settings) -> None:
    """The takeover guards before anything is written (``assemble.guard_before_writing``): a refusal
    is a ``ConfigurationError`` and stops ``serve`` with the database untouched. A database or key
    provider that is not up yet is left to the migration's retries and the data-key load after it,
    which apply the same guards."""
    try:
        asyncio.run(guard_side(side_of(settings)))
    except UnavailableError as exc:
        log.info("takeover guards deferred until the database and key pair answer: %s", exc)


def warn_database_transport(settings: Settings) -> None:
    """Warn (once, here in the parent: workers never call this) about each server database that a
    network attacker could stand in for: the service's own, and the start-up transfer's target when
    that transfer is still to run. Nothing is refused: a private network may be trusted on purpose,
    but the operator should know that whoever can answer as the database can write it."""
    trust = Trust.from_settings(settings)
    warn_insecure_transport(settings.database, trust=trust)
    lock, target = settings.transfer_to.lockfile_path, side_of(settings, transfer=True)
    if lock and target.database is not None and target.rsa_key is not None and not Path(lock).exists():
        warn_insecure_transport(target.database, target.database_prefix, trust=trust)


def wait_for_drain(folder: Path, seconds: float) -> bool:
    """Raise the drain flag for the workers and wait until each one serving is idle, or ``seconds``.

    A worker announces itself with a marker when it starts serving (``http.drain``) and leaves an
    idle marker once draining with nothing running. True when every worker finished in time.
    """
    (folder / FLAG).touch()
    started = time.monotonic()
    deadline = started + seconds
    while True:
        busy = [
            pid for pid in _serving_workers(folder) if _alive(pid) and not idle_marker(folder, pid).exists()
        ]
        if not busy:
            log.info("drained in %.1fs; stopping", time.monotonic() - started)
            return True
        if time.monotonic() >= deadline:
            log.warning(
                "drain took longer than %.0fs (keyConnectorSettings__shutdown__drainSeconds); stopping "
                "%d worker(s) with requests still running",
                seconds,
                len(busy),
            )
            return False
        time.sleep(0.05)


def _serving_workers(folder: Path) -> list[int]:
    pids = []
    for marker in folder.glob("worker-*"):
        with contextlib.suppress(ValueError):
            pids.append(int(marker.name.removeprefix("worker-")))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _draining(server_class: Any, folder: Path, seconds: float) -> Any:
    """granian's server, with a drain between the stop signal and the stop of the workers.

    granian stops its workers as soon as SIGTERM or SIGINT arrives. Here the first signal starts the
    drain in a thread and returns; the stop proper begins when the drain is over. A second signal
    stops at once (an operator pressing Ctrl-C twice means it).
    """

    class DrainingServer(server_class):  # type: ignore[misc]
        _drain_started = False

        def signal_handler_interrupt(self, *args: Any, **kwargs: Any) -> None:
            if self._drain_started or seconds <= 0:
                server_class.signal_handler_interrupt(self, *args, **kwargs)
                return
            self._drain_started = True
            log.info("stop requested: draining for up to %.0fs", seconds)

            def drain_then_stop() -> None:
                try:
                    wait_for_drain(folder, seconds)
                finally:
                    server_class.signal_handler_interrupt(self)

            threading.Thread(target=drain_then_stop, name="drain", daemon=True).start()

        def _stopping(self, within: float) -> bool:
            deadline = time.monotonic() + within
            while time.monotonic() < deadline:
                if self._drain_started or self.interrupt_signal:
                    return True
                time.sleep(0.02)
            return False

        def _spawn_worker(self, *args: Any, **kwargs: Any) -> Any:
            """A worker whose clean exit during a stop is not reported as a crash.

            Ctrl-C in a terminal, and systemd's default ``KillMode=control-group``, signal the
            workers as well as this process; a worker may then stop on its own a moment before
            this process has seen the signal, and granian would log ``Unexpected exit`` and
            respawn it. A worker that exits with 0 while a stop is under way (or begins within a
            second) was stopped, not crashed; anything else is reported as before."""
            worker = server_class._spawn_worker(self, *args, **kwargs)
            report = worker._watcher

            def watcher() -> None:
                worker.inner.join()
                if not worker.interrupt_by_parent and worker.inner.exitcode == 0 and self._stopping(1.0):
                    worker.interrupt_by_parent = True
                report()

            worker._watcher = watcher
            return worker

    return DrainingServer


def _http_options(settings: Settings) -> dict[str, Any]:
    """granian's connection limits from the ``http`` settings (the rest is in ``http.layers.hold``).

    HTTP/1.1 only, because granian's automatic HTTP/1-or-2 detection reads a new connection's first
    bytes with no deadline: a client that connects and says nothing would hold its connection for
    ever. Every client and reverse proxy speaks HTTP/1.1 (nginx talks to its upstreams in nothing
    else), and one request at a time per connection is then also the per-connection cap. hyper's
    header timeout runs from the connection's opening and again after each answer, so it is the idle
    timeout too.
    """
    from granian.constants import HTTPModes
    from granian.http import HTTP1Settings

    return {
        "http": HTTPModes.http1,
        "http1_settings": HTTP1Settings(
            header_read_timeout=max(1, round(settings.http.header_timeout_seconds * 1000)), keep_alive=True
        ),
    }


GRANIAN_LOGGING: dict[str, object] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {},
    "handlers": {},
    "loggers": {
        "_granian": {"handlers": [], "propagate": True},
        "granian.access": {"handlers": [], "propagate": False},
    },
}
"""granian's own lines (a worker that died, a bind error) through our handlers, on stderr in our
format, instead of granian's default: its own format on stdout, where results belong."""


def run(
    settings: Settings,
    listen: Listen,
    *,
    workers: int = 1,
    config_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve until stopped, on ``sock`` if ``serve`` already took the port (``take_port``)."""
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    if config_file:
        os.environ[CONFIG_FILE_ENV] = str(Path(config_file).resolve())
    check_https(listen, tls_cert, tls_key)
    if sock is None:
        sock = take_port(listen)
    scheme = "https" if tls_cert else "http"
    # Workers start as fresh interpreters, not forks of this process: pre-flight has already opened
    # the key provider here, and HSM libraries (PKCS#11 must be re-initialised after fork) and gRPC
    # channels (Google Cloud KMS) do not survive being forked.
    multiprocessing.set_start_method("spawn", force=True)
    from keyconnector.telemetry import metrics

    # Before the workers spawn: they must find PROMETHEUS_MULTIPROC_DIR when they import the client.
    metrics_side = metrics.start_parent_side(settings, listen.host)
    drain_folder = Path(tempfile.mkdtemp(prefix="keyconnector-drain-"))  # mode 0700
    os.environ[DRAIN_DIR_ENV] = str(drain_folder)
    os.environ[WORKERS_ENV] = str(workers)  # shown by /health/ready: only this process knows it
    log.info("listening on %s://%s:%d with %d worker(s)", scheme, listen.host, listen.port, workers)
    server = _draining(sharing(Server, sock), drain_folder, settings.shutdown.drain_seconds)(
        "keyconnector.http.app:create_app_from_environment",
        address=listen.host,
        port=listen.port,
        interface=Interfaces.ASGI,
        **_http_options(settings),
        workers=workers,
        loop=Loops.uvloop,
        factory=True,
        log_level=LogLevels.warning,
        log_access=False,
        log_dictconfig=GRANIAN_LOGGING,
        ssl_cert=Path(tls_cert) if tls_cert else None,
        ssl_key=Path(tls_key) if tls_key else None,
        respawn_failed_workers=True,
        workers_kill_timeout=WORKER_STOP_SECONDS,
    )
    try:
        server.serve()
    finally:
        shutil.rmtree(drain_folder, ignore_errors=True)
        metrics_side.stop()
        sock.close()
