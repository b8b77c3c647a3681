"""A PFX file on disk: upstream's default, ``/etc/bitwarden/key.pfx``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from keyconnector.certificates import LoadedCertificate, from_pkcs12
from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import CertificateSettings, secret


async def load(settings: CertificateSettings, prefix: str, ca_directory: str) -> LoadedCertificate:
    path = Path(settings.filesystem_path)
    setting = f"{prefix}.filesystemPath"
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        raise ConfigurationError(
            setting, f"no PFX file at {path} (make one with `keyconnector init`)"
        ) from None
    except PermissionError:
        raise ConfigurationError(setting, f"the PFX file {path} is not readable by this user") from None
    except IsADirectoryError:
        raise ConfigurationError(setting, f"{path} is a directory, not a PFX file") from None
    return from_pkcs12(data, secret(settings.filesystem_password), f"{prefix}.filesystemPassword", str(path))
