"""Trust for outgoing TLS: the system store plus the company's private CAs.

Operators drop their CA certificates into ``/etc/bitwarden/ca-certificates/*.crt`` (upstream's
container trusts them at start-up); every outgoing connection (identity server, Vault, Azure, ...)
uses the context built here.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from pathlib import Path

import certifi

log = logging.getLogger("keyconnector.tls")


def extra_ca_files(directory: str | Path) -> list[Path]:
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".crt", ".pem"} and p.is_file())


def trust_context(ca_directory: str | Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    with contextlib.suppress(OSError):  # certifi ships its bundle; the system store is there anyway
        context.load_verify_locations(cafile=certifi.where())
    for path in extra_ca_files(ca_directory):
        try:
            context.load_verify_locations(cafile=str(path))
            log.info("trusting the certificate authorities in %s", path)
        except (ssl.SSLError, OSError) as exc:
            log.warning("ignoring %s: not a readable PEM certificate (%s)", path, exc)
    return context


_combined_bundles: dict[tuple[str, ...], str] = {}


def ca_bundle(explicit: str | None, ca_directory: str | Path, setting: str) -> str | None:
    """The CA bundle file a provider's client library should verify against, or None for its default.

    Most client libraries (boto3, hvac, the Azure SDKs, gRPC) take one PEM file rather than an
    ``ssl.SSLContext``. ``explicit`` is the provider's own ``...CaBundle`` setting (named by
    ``setting`` in errors); without it, the company CAs in ``caCertificatesDirectory`` are added to
    certifi's bundle in a file written once per process, so a Vault or KMS endpoint behind a private
    CA works with no per-provider setting at all, as upstream's container does.
    """
    from keyconnector.errors import ConfigurationError

    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigurationError(setting, f"the CA bundle {explicit} does not exist or is not a file")
        return str(path)
    extras = extra_ca_files(ca_directory)
    if not extras:
        return None
    key = tuple(str(p) for p in extras)
    cached = _combined_bundles.get(key)
    if cached is not None and Path(cached).is_file():
        return cached
    import tempfile

    parts = [Path(certifi.where()).read_text(encoding="ascii", errors="replace")]
    for extra in extras:
        with contextlib.suppress(OSError):
            parts.append(extra.read_text(encoding="ascii", errors="replace"))
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the life of the process
        "w", prefix="keyconnector-ca-", suffix=".pem", delete=False, encoding="ascii"
    )
    with handle:
        handle.write("\n".join(parts))
    _combined_bundles[key] = handle.name
    return handle.name


def ca_bundle_bytes(explicit: str | None, ca_directory: str | Path, setting: str) -> bytes | None:
    """The same trust as ``ca_bundle``, as PEM bytes (for gRPC's ``ssl_channel_credentials``)."""
    path = ca_bundle(explicit, ca_directory, setting)
    return Path(path).read_bytes() if path else None
