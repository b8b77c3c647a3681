"""One trust store for every outgoing TLS connection: the system store, certifi and the private CAs.

Operators drop their CA certificates into ``caCertificatesDirectory`` (``/etc/bitwarden/ca-certificates``
by default; upstream's container trusts its ``*.crt`` files at start-up). Every client that leaves
the process (identity server, databases, Vault, AWS, Azure, Google) must then trust the same set,
or a private CA would work for one and fail for the next with nothing in the settings to explain
why. So the decision is made once, here, into a :class:`Trust`, and each client asks it for the
form its library takes:

* :meth:`Trust.ssl_context` for ``ssl``/httpx/asyncpg/aiomysql,
* :meth:`Trust.bundle_file` for libraries that take one PEM file (boto3, hvac, the Azure SDKs,
  libpq, FreeTDS),
* :meth:`Trust.bundle_bytes` for gRPC.

The rule is the union: the system store (what ``ssl.get_default_verify_paths()`` names, so an
operator who ran ``update-ca-certificates`` is heard), certifi's bundle (what most Python clients
trust by default, so a slim image without a system store still reaches public endpoints), and the
folder's ``*.crt``/``*.pem`` files. All three go into one PEM text, from which the context, the
file and the bytes are made, so they cannot drift apart. A provider's own ``...CaBundle`` setting
is the one exception: an operator who names a file for one provider means exactly that file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import certifi

if TYPE_CHECKING:
    from keyconnector.runtime.settings import Settings

__all__ = ["DEFAULT_CA_DIRECTORY", "Trust", "extra_ca_files"]

log = logging.getLogger("keyconnector.tls")

DEFAULT_CA_DIRECTORY = "/etc/bitwarden/ca-certificates"
"""``caCertificatesDirectory``'s default, for callers that have no settings (tools and tests)."""

_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")


def extra_ca_files(directory: str | Path) -> list[Path]:
    """The folder's ``*.crt`` and ``*.pem`` files, sorted (none when it does not exist: the default
    folder is absent on most machines, and that means "no private CA", not an error)."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".crt", ".pem"} and p.is_file())


def _certificates(text: str) -> list[str]:
    """The PEM certificate blocks of ``text``, whitespace normalised so that duplicates compare equal."""
    blocks = []
    for match in _PEM_CERTIFICATE.finditer(text):
        body = "".join(match.group(0).split("-----")[2].split())
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        blocks.append("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n")
    return blocks


def _loads(blocks: list[str]) -> bool:
    """Whether OpenSSL accepts every block (a file that does not is skipped, not fatal: one bad file
    in the folder must not cost the service every other CA)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cadata="".join(blocks))
    except (ssl.SSLError, ValueError):
        return False
    return True


def _system_text() -> tuple[str, str | None]:
    """The system store as PEM text, and where it came from (None when this machine has none).

    ``cafile`` is the one-file form Debian, Alpine and RHEL all provide; when it is missing the
    hashed ``capath`` folder is read instead, so that the bundle file holds what ``load_default_certs``
    would have trusted."""
    paths = ssl.get_default_verify_paths()
    if paths.cafile and os.path.isfile(paths.cafile):
        with contextlib.suppress(OSError):
            return Path(paths.cafile).read_text(encoding="ascii", errors="replace"), paths.cafile
    if paths.capath and os.path.isdir(paths.capath):
        parts = []
        for entry in sorted(Path(paths.capath).iterdir()):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if entry.is_file():
                    parts.append(entry.read_text(encoding="ascii"))
        if parts:
            return "\n".join(parts), paths.capath
    return "", None


def _fingerprint(folder: str) -> tuple[object, ...]:
    """What a Trust built from ``folder`` depends on: the files' names, sizes and times, and those of
    the system store and certifi. Equal fingerprints mean an equal Trust, so it is built once."""
    entries: list[object] = [folder]
    paths = ssl.get_default_verify_paths()
    system: list[str | None] = [paths.cafile, paths.capath, certifi.where()]
    candidates: list[str | Path | None] = [*extra_ca_files(folder), *system]
    for path in candidates:
        if path is None:
            continue
        try:
            stat = os.stat(path)
        except OSError:
            entries.append((str(path), None))
            continue
        entries.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


_built: dict[tuple[object, ...], Trust] = {}
_bundle_files: dict[str, str] = {}
_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Trust:
    """What outgoing TLS trusts: immutable, built from ``caCertificatesDirectory`` once.

    ``pem`` is the deduplicated union of the system store, certifi and the folder's certificates;
    every form a client gets is made from it.
    """

    folder: str
    """``caCertificatesDirectory`` as configured, for messages ("put the CA in ...")."""
    pem: str = field(repr=False)
    sources: tuple[str, ...]
    """Where the certificates came from (system store, certifi, each folder file), for logs."""
    folder_files: tuple[str, ...] = ()
    """The folder's files that were read and trusted."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Trust:
        """The Trust of a deployment: what every client built from ``settings`` must use."""
        return cls.from_directory(settings.ca_certificates_directory)

    @classmethod
    def from_directory(cls, folder: str | Path = DEFAULT_CA_DIRECTORY) -> Trust:
        """The Trust for ``folder``; built once per content of the folder (and of the system store
        and certifi), so every caller in a process shares one object and the files are read once."""
        name = str(folder)
        key = _fingerprint(name)
        with _lock:
            cached = _built.get(key)
            if cached is None:
                cached = _built[key] = cls._build(name)
        return cached

    @classmethod
    def _build(cls, folder: str) -> Trust:
        blocks: dict[str, None] = {}  # ordered set
        sources: list[str] = []
        system, where = _system_text()
        if where is not None:
            blocks.update(dict.fromkeys(_certificates(system)))
            sources.append(where)
        with contextlib.suppress(OSError):
            blocks.update(dict.fromkeys(_certificates(Path(certifi.where()).read_text(encoding="ascii"))))
            sources.append(certifi.where())
        if not _loads(list(blocks)):  # a damaged system store: keep certifi alone rather than nothing
            log.warning("the system certificate store %s cannot be read; trusting certifi's bundle", where)
            blocks = dict.fromkeys(_certificates(Path(certifi.where()).read_text(encoding="ascii")))
            sources = [certifi.where()]
        files: list[str] = []
        for path in extra_ca_files(folder):
            try:
                found = _certificates(path.read_text(encoding="ascii"))
            except (OSError, UnicodeDecodeError) as exc:
                log.warning(
                    "ignoring %s in keyConnectorSettings__caCertificatesDirectory: not a readable PEM "
                    "certificate (%s); the authorities in it are not trusted",
                    path,
                    exc,
                )
                continue
            if not found or not _loads(found):
                log.warning(
                    "ignoring %s in keyConnectorSettings__caCertificatesDirectory: not a readable PEM "
                    "certificate (-----BEGIN CERTIFICATE-----); the authorities in it are not trusted",
                    path,
                )
                continue
            blocks.update(dict.fromkeys(found))
            files.append(str(path))
            log.info("trusting the certificate authorities in %s", path)
        return cls(folder=folder, pem="".join(blocks), sources=(*sources, *files), folder_files=tuple(files))

    def ssl_context(self) -> ssl.SSLContext:
        """A new client context trusting exactly this set (new each time: callers change it, e.g.
        ``check_hostname`` for verify-ca or a client certificate)."""
        context = ssl.create_default_context(cadata=self.pem)
        return context

    def bundle_file(self, explicit: str | None = None, setting: str = "") -> str:
        """One PEM file with this trust, for libraries that take a path rather than a context.

        ``explicit`` is a provider's own ``...CaBundle`` setting (named ``setting`` in the error): it
        wins, as the operator asked. Otherwise the file is written once per process and content
        (mode 0600, never deleted while the process runs: libraries reopen it per connection).
        """
        if explicit:
            from keyconnector.errors import ConfigurationError

            path = Path(explicit)
            if not path.is_file():
                raise ConfigurationError(setting, f"the CA bundle {explicit} does not exist or is not a file")
            return str(path)
        digest = hashlib.sha256(self.pem.encode("ascii")).hexdigest()
        with _lock:
            cached = _bundle_files.get(digest)
            if cached is not None and os.path.isfile(cached):
                return cached
            handle, name = tempfile.mkstemp(prefix="keyconnector-ca-", suffix=".pem")
            with os.fdopen(handle, "w", encoding="ascii") as out:
                out.write(self.pem)
            _bundle_files[digest] = name
            return name

    def bundle_bytes(self, explicit: str | None = None, setting: str = "") -> bytes:
        """The same trust as :meth:`bundle_file`, as PEM bytes (gRPC's ``ssl_channel_credentials``)."""
        if explicit:
            return Path(self.bundle_file(explicit, setting)).read_bytes()
        return self.pem.encode("ascii")
