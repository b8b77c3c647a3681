"""A PFX kept as a blob in Azure Storage (upstream's ``azurestorage`` certificate provider).

The connection string is a secret from end to end: it carries the account key or a SAS, and the
SDK's own exceptions quote request URLs (with the SAS) or the string's parts. So it is parsed here
only to validate it, and every failure is turned into a message built from the error kind, the
endpoint's host:port and the setting names, never from the SDK's text.

The blob is read once, at start-up; the sync SDK runs in a thread with short timeouts and one
retry, so that an unreachable account is reported in seconds rather than after the SDK's default
minutes of back-off.
"""

from __future__ import annotations

import asyncio
import binascii
import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from keyconnector._optional import require
from keyconnector.certificates import LoadedCertificate, read_certificate
from keyconnector.errors import ConfigurationError, KeyConnectorError, UnavailableError, setting_name
from keyconnector.runtime.settings import CertificateSettings, secret
from keyconnector.runtime.trust import Trust

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 10
LISTED_NAMES = 20
"""At most this many blob or container names are quoted in a "not found" message."""

# The SDK logs every request at INFO (URLs, redacted headers): noise in the service log, and a
# request URL is close enough to the secret that it has no business there.
_http_log = logging.getLogger("keyconnector.certificates.azurestorage.http")
_http_log.setLevel(logging.WARNING)

EXAMPLE = (
    "expected 'DefaultEndpointsProtocol=https;AccountName=...;AccountKey=...;"
    "EndpointSuffix=core.windows.net' or 'BlobEndpoint=https://...;SharedAccessSignature=...', "
    "as the portal shows it under Access keys"
)

KNOWN_NAMES = frozenset(
    name.upper()
    for name in (
        "DefaultEndpointsProtocol",
        "AccountName",
        "AccountKey",
        "SharedAccessSignature",
        "EndpointSuffix",
        "UseDevelopmentStorage",
        "DevelopmentStorageProxyUri",
        *(
            f"{service}{kind}"
            for service in ("Blob", "Queue", "Table", "File", "Dfs")
            for kind in ("Endpoint", "SecondaryEndpoint")
        ),
    )
)
"""The names the Azure Storage SDKs know; like theirs, an unknown one makes the string invalid."""


@dataclasses.dataclass(frozen=True)
class _Names:
    """The settings a message can name, spelled with this source's prefix."""

    prefix: str

    @property
    def connection(self) -> str:
        return f"{self.prefix}.azureStorageConnectionString"

    @property
    def container(self) -> str:
        return f"{self.prefix}.azureStorageContainer"

    @property
    def blob(self) -> str:
        return f"{self.prefix}.azureStorageFileName"

    @property
    def password(self) -> str:
        return f"{self.prefix}.azureStorageFilePassword"

    @property
    def ca_bundle(self) -> str:
        return f"{self.prefix}.azureStorageCaBundle"

    @property
    def component(self) -> str:
        return f"the certificate provider azurestorage (the blob endpoint in {setting_name(self.connection)})"


async def load(settings: CertificateSettings, prefix: str, ca_directory: str) -> LoadedCertificate:
    names = _Names(prefix)
    connection_string = secret(settings.azure_storage_connection_string) or ""
    if not connection_string.strip():
        raise ConfigurationError(names.connection, f"is not set; {EXAMPLE}")
    container = _required(
        settings.azure_storage_container, names.container, "the blob container with the PFX"
    )
    blob = _required(settings.azure_storage_file_name, names.blob, "the PFX blob in that container")
    check_connection_string(connection_string, names.connection)
    verify = Trust.from_directory(ca_directory).bundle_file(settings.azure_storage_ca_bundle, names.ca_bundle)
    fetcher = _Fetcher(connection_string, verify, container, blob, names)
    data = await asyncio.to_thread(fetcher.fetch)
    where = f"{container}/{blob}"
    loaded = read_certificate(
        data,
        secret(settings.azure_storage_file_password),
        where=where,
        file_setting=names.blob,
        password_setting=names.password,
    )
    return dataclasses.replace(loaded, description=f"Azure Storage blob {where} at {fetcher.host}")


def _required(value: str | None, setting: str, what: str) -> str:
    if value is None or not value.strip():
        raise ConfigurationError(setting, f"is not set; it is the name of {what}")
    return value.strip()


def check_connection_string(connection_string: str, setting: str) -> None:
    """Refuse a malformed string with a message that says which part is wrong, quoting none of it.

    Mirrors how the SDK reads it (``Name=value`` pairs split on ';', names case-insensitive), so that
    anything passing here is read by the SDK the same way.
    """
    fields: dict[str, str] = {}
    for number, part in enumerate(connection_string.strip().rstrip(";").split(";"), start=1):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ConfigurationError(
                setting, f"is not a valid connection string: part {number} is not Name=value; {EXAMPLE}"
            )
        if name.strip().upper() not in KNOWN_NAMES:
            # Not quoted: a "name" that is not one is usually a pasted key or a piece of a SAS.
            raise ConfigurationError(
                setting,
                f"is not a valid connection string: part {number} is none of the names it can have "
                f"(AccountName, AccountKey, BlobEndpoint, SharedAccessSignature, ...); {EXAMPLE}",
            )
        fields[name.strip().upper()] = value.strip()
    if fields.get("USEDEVELOPMENTSTORAGE", "").lower() == "true":
        return
    endpoint = fields.get("BLOBENDPOINT")
    if endpoint:
        parts = urlsplit(endpoint)
        try:
            valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:  # a port that is not a number
            valid = False
        if not valid:
            raise ConfigurationError(setting, "its BlobEndpoint is not an http:// or https:// URL")
    elif not fields.get("ACCOUNTNAME"):
        raise ConfigurationError(
            setting, f"names no storage account (no AccountName, no BlobEndpoint); {EXAMPLE}"
        )
    if "ACCOUNTKEY" in fields:
        if not fields.get("ACCOUNTNAME"):
            raise ConfigurationError(setting, "has an AccountKey but no AccountName; both are needed")
        try:
            binascii.a2b_base64(fields["ACCOUNTKEY"].encode(), strict_mode=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(
                setting, "its AccountKey is not valid base64; copy the key again from the storage account"
            ) from None


class _Fetcher:
    """Downloads one blob and explains failures; runs in a worker thread (the SDK is blocking)."""

    def __init__(self, connection_string: str, verify: str | None, container: str, blob: str, names: _Names):
        self._connection_string = connection_string
        self._verify: str | bool = verify or True
        self._container = container
        self._blob = blob
        self._names = names
        self.host = "the blob endpoint"

    def _client(self) -> Any:
        sdk = require(
            "azure.storage.blob",
            extra="azure",
            setting=f"{self._names.prefix}.provider",
            provider="azurestorage",
        )
        try:
            client = sdk.BlobServiceClient.from_connection_string(
                self._connection_string,
                connection_verify=self._verify,
                connection_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                retry_policy=sdk.LinearRetry(backoff=1, retry_total=1, random_jitter_range=0),
                logger=_http_log,
            )
        except (ValueError, TypeError, KeyError):
            client = None
        if client is None:
            raise ConfigurationError(self._names.connection, f"is not a valid connection string; {EXAMPLE}")
        parts = urlsplit(client.url)
        self.host = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        return client

    def fetch(self) -> bytes:
        exceptions = require(
            "azure.core.exceptions",
            extra="azure",
            setting=f"{self._names.prefix}.provider",
            provider="azurestorage",
        )
        with self._client() as service:
            failure: KeyConnectorError
            try:
                data: bytes = service.get_blob_client(self._container, self._blob).download_blob().readall()
                return data
            except exceptions.AzureError as exc:
                failure = self._explain(exc, exceptions, service)
        # Raised outside the handler, so the SDK's exception (whose text may quote a SAS) is not
        # even attached as context.
        raise failure

    def _explain(self, exc: Any, exceptions: Any, service: Any) -> KeyConnectorError:
        names = self._names
        status = getattr(exc, "status_code", None)
        code = getattr(exc, "error_code", None)
        if isinstance(exc, exceptions.ResourceNotFoundError) and code == "ContainerNotFound":
            containers = _listing(lambda: service.list_containers())
            return ConfigurationError(
                names.container,
                f"there is no container '{self._container}' at {self.host}"
                + _shown(containers, "the account holds the containers", "the account holds no containers"),
            )
        if isinstance(exc, exceptions.ResourceNotFoundError) and code == "BlobNotFound":
            blobs = _listing(lambda: service.get_container_client(self._container).list_blobs())
            return ConfigurationError(
                names.blob,
                f"there is no blob '{self._blob}' in the container '{self._container}'"
                + _shown(blobs, "it holds", "the container is empty"),
            )
        if status == 404:
            return ConfigurationError(
                names.connection,
                f"{self.host} has no such storage account; check AccountName and BlobEndpoint",
            )
        if status == 400 and code in ("InvalidResourceName", "OutOfRangeInput"):
            return ConfigurationError(
                names.container,
                f"'{self._container}' is not a valid container name "
                "(3 to 63 lower-case letters, digits and single hyphens)",
            )
        if isinstance(exc, exceptions.ClientAuthenticationError) or status in (401, 403):
            detail = f" (HTTP {status})" if status else ""
            return ConfigurationError(
                names.connection,
                f"{self.host} refused its credentials{detail}: the account key or SAS in it is wrong "
                "or expired, or does not allow reading this blob",
            )
        if isinstance(exc, exceptions.ServiceRequestError | exceptions.ServiceResponseError):
            if _caused_by(exc, ssl.SSLCertVerificationError):
                return ConfigurationError(
                    names.ca_bundle,
                    f"the TLS certificate of the blob endpoint {self.host} is not trusted; put its CA "
                    f"certificate (PEM) in this setting, or in caCertificatesDirectory as a .crt file",
                )
            return UnavailableError(names.component, f"cannot connect to {self.host}: {_network_reason(exc)}")
        if status is not None and (status >= 500 or status == 429):
            return UnavailableError(
                names.component, f"{self.host} answered HTTP {status} ({code or 'no code'})"
            )
        if status is not None:
            return ConfigurationError(
                names.connection, f"{self.host} refused the request: HTTP {status} ({code or 'no code'})"
            )
        return UnavailableError(names.component, f"the request to {self.host} failed ({type(exc).__name__})")


def _listing(items: Callable[[], Iterable[Any]]) -> list[str] | None:
    """Up to ``LISTED_NAMES`` + 1 names, or None when the credentials may not list (a read-only SAS)."""
    found: list[str] = []
    try:
        for item in items():
            found.append(str(item.name))
            if len(found) > LISTED_NAMES:
                break
    except Exception:  # only a hint for the message; a read-only SAS may not list
        return None
    return found


def _shown(found: list[str] | None, holds: str, empty: str) -> str:
    if found is None:
        return ""
    if not found:
        return f"; {empty}"
    more = ", ..." if len(found) > LISTED_NAMES else ""
    return f"; {holds}: {', '.join(found[:LISTED_NAMES])}{more}"


def _chain(exc: BaseException) -> list[object]:
    """The exception and everything it wraps (causes, contexts, the SDK's and urllib3's inner errors)."""
    seen: list[object] = []
    pending: list[object] = [exc]
    while pending:
        current = pending.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        if isinstance(current, BaseException):
            pending += [current.__cause__, current.__context__, *current.args]
        for attribute in ("inner_exception", "reason", "exc"):
            pending.append(getattr(current, attribute, None))
    return seen


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(item, kind) for item in _chain(exc))


def _network_reason(exc: BaseException) -> str:
    chain = _chain(exc)
    if any(isinstance(item, ConnectionRefusedError) for item in chain):
        return "connection refused"
    if any(isinstance(item, socket.gaierror) for item in chain):
        return "the host name does not resolve"
    if any(isinstance(item, TimeoutError) or "Timeout" in type(item).__name__ for item in chain):
        return "timed out"
    if any(isinstance(item, ssl.SSLError) for item in chain):
        return "the TLS handshake failed"
    if any(isinstance(item, ConnectionResetError) for item in chain):
        return "the connection was reset"
    return "the connection failed"
