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
