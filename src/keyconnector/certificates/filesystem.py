"""A certificate file on disk (PFX, PEM or DER): upstream's default is ``/etc/bitwarden/key.pfx``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from keyconnector.certificates import LoadedCertificate, read_certificate
from keyconnector.errors import ConfigurationError, KeyPairMissing
from keyconnector.runtime.settings import CertificateSettings, secret


async def load(settings: CertificateSettings, prefix: str, ca_directory: str) -> LoadedCertificate:
    path = Path(settings.filesystem_path)
    setting = f"{prefix}.filesystemPath"
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        # Whether to restore it or make one depends on the database: runtime.assemble says which.
        raise KeyPairMissing(setting, f"no PFX file at {path}") from None
    except PermissionError:
        raise ConfigurationError(
            setting,
            f"the PFX file {path} is not readable by this user; give the user the service runs as read "
            f"access (e.g. chown it to that user and chmod 600 {path})",
        ) from None
    except IsADirectoryError:
        raise KeyPairMissing(setting, f"{path} is a directory, not a PFX file") from None
    return read_certificate(
        data,
        secret(settings.filesystem_password),
        where=str(path),
        file_setting=setting,
        password_setting=f"{prefix}.filesystemPassword",
    )
