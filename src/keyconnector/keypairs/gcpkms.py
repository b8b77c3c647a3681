"""The ``gcpkms`` provider: the RSA private key never leaves Google Cloud KMS.

As upstream does, the data key is wrapped locally with the key version's public key and unwrapped
by ``AsymmetricDecrypt``, so only unwrapping (once per process) costs a KMS call. Upstream always
wraps with RSA-OAEP-SHA-256; here the hash comes from the key version's algorithm
(``RSA_DECRYPT_OAEP_<bits>_<hash>``), which is the only hash KMS will decrypt with. For the
SHA-256 keys upstream supports this is the same wrapping; the SHA-1 and SHA-512 variants, which
upstream could not use, work too.

Credentials are Google's application default credentials (``GOOGLE_APPLICATION_CREDENTIALS``,
gcloud's ADC file, the metadata server), as upstream. The official client runs over gRPC with
our own channel, so that the TLS roots (``googleCloudCaBundle`` or the company CAs), the token
fetch timeout and the reconnect backoff are ours: every call has a short deadline and at most one
retry, so an outage surfaces within seconds instead of after the client's minute of retries.

CRC32C checksums are verified both ways, as Google recommends for every KMS call; the inputs are
a few hundred bytes, once per process, so a pure-Python CRC32C is enough.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keyconnector._optional import require
from keyconnector.errors import (
    ConfigurationError,
    IntegrityFailure,
    KeyConnectorError,
    UnavailableError,
    setting_name,
)
from keyconnector.keypairs.base import rsa_fingerprint
from keyconnector.runtime.settings import RsaKeySettings, SideSettings

DEFAULT_ENDPOINT = "cloudkms.googleapis.com:443"
SCOPES = ("https://www.googleapis.com/auth/cloudkms",)
CALL_TIMEOUT = 10.0
"""Deadline of each KMS call, in seconds."""
TOKEN_TIMEOUT = 10.0
"""google-auth fetches tokens with a 120-second timeout unless told otherwise."""
RETRY_PAUSE = 0.2
DETAILS_LIMIT = 300
# gRPC's default reconnect backoff grows to two minutes: after an outage the channel would keep
# failing calls long after KMS is back. Five seconds matches how often the service retries.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)

_ALGORITHM = re.compile(r"RSA_DECRYPT_OAEP_(\d+)_(SHA1|SHA256|SHA512)")
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA1": hashes.SHA1,
    "SHA256": hashes.SHA256,
    "SHA512": hashes.SHA512,
}
_TRANSPORT_LOGGER = "google.cloud.kms_v1.services.key_management_service.transports.grpc"
_RESOURCE_ID = re.compile(r"[A-Za-z0-9_.:-]+")


# --------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), as KMS computes it for its *_crc32c fields


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class _Target:
    """Where the key lives, and how to name it in messages."""

    prefix: str
    endpoint: str
    version_name: str
    key_name: str
    caller: str = "the caller"

    def setting(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @property
    def component(self) -> str:
        return f"the key provider gcpkms ({setting_name(self.setting('googleCloudEndpoint'))})"


def _resource_id(value: str | None, prefix: str, name: str, what: str) -> str:
    if not value or not value.strip():
        raise ConfigurationError(f"{prefix}.{name}", f"is not set; it is the {what}")
    value = value.strip()
    if not _RESOURCE_ID.fullmatch(value):
        raise ConfigurationError(
            f"{prefix}.{name}", f"'{value}' is not a valid ID: give the bare {what}, not a resource path"
        )
    return value


def _target(rsa_settings: RsaKeySettings, prefix: str) -> _Target:
    project = _resource_id(rsa_settings.google_cloud_project_id, prefix, "googleCloudProjectId", "project ID")
    location = _resource_id(
        rsa_settings.google_cloud_location_id, prefix, "googleCloudLocationId", "location of the key ring"
    )
    keyring = _resource_id(
        rsa_settings.google_cloud_keyring_id, prefix, "googleCloudKeyringId", "key ring ID"
    )
    key = _resource_id(rsa_settings.google_cloud_key_id, prefix, "googleCloudKeyId", "key ID")
    version = _resource_id(
        rsa_settings.google_cloud_key_version_id, prefix, "googleCloudKeyVersionId", "key version number"
    )
    if not version.isdigit():
        raise ConfigurationError(
            f"{prefix}.googleCloudKeyVersionId", f"'{version}' is not a key version number (such as 1)"
        )
    endpoint = (rsa_settings.google_cloud_endpoint or DEFAULT_ENDPOINT).strip()
    if "://" in endpoint or "/" in endpoint or not endpoint:
        raise ConfigurationError(
            f"{prefix}.googleCloudEndpoint",
            f"'{endpoint}' is not a gRPC endpoint; write host:port, such as {DEFAULT_ENDPOINT}",
        )
    key_name = f"projects/{project}/locations/{location}/keyRings/{keyring}/cryptoKeys/{key}"
    return _Target(prefix, endpoint, f"{key_name}/cryptoKeyVersions/{version}", key_name)


# --------------------------------------------------------------------------------------------------
# Libraries


@dataclass(frozen=True)
class _Libraries:
    """The optional modules, imported once through ``require`` so a missing extra names itself."""

    grpc: Any
    kms: Any
    auth: Any
    auth_exceptions: Any
    auth_requests: Any
    auth_grpc: Any
    api_exceptions: Any

    @classmethod
    def load(cls, prefix: str) -> _Libraries:
        def get(module: str) -> Any:
            return require(module, extra="gcp", setting=f"{prefix}.provider", provider="gcpkms")

        return cls(
            grpc=get("grpc"),
            kms=get("google.cloud.kms_v1"),
            auth=get("google.auth"),
            auth_exceptions=get("google.auth.exceptions"),
            auth_requests=get("google.auth.transport.requests"),
            auth_grpc=get("google.auth.transport.grpc"),
            api_exceptions=get("google.api_core.exceptions"),
        )


class _TimedRequest:
    """google-auth's HTTP transport with our timeout: token fetches otherwise wait up to 120 s."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        limit = TOKEN_TIMEOUT if timeout is None else min(timeout, TOKEN_TIMEOUT)
        return self._inner(url, method=method, body=body, headers=headers, timeout=limit, **kwargs)


def _details(exc: BaseException) -> str:
    """The service's own explanation (resource names and status text, never a credential)."""
    text = str(getattr(exc, "message", "") or exc).strip()
    return text if len(text) <= DETAILS_LIMIT else text[:DETAILS_LIMIT] + "..."


def _credentials_source() -> str:
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    return f"GOOGLE_APPLICATION_CREDENTIALS={path}" if path else "the application default credentials"


def _identity(credentials: Any) -> str:
    email = getattr(credentials, "service_account_email", None)
    who = f"the service account {email}" if isinstance(email, str) and email != "default" else "the account"
    return f"{who} (from {_credentials_source()})"


def _credentials(libs: _Libraries, target: _Target, request: _TimedRequest) -> Any:
    """Application default credentials with a fresh token, so that bad credentials fail at start."""
    provider_setting = target.setting("provider")
    try:
        credentials, _project = libs.auth.default(scopes=list(SCOPES), request=request)
    except libs.auth_exceptions.DefaultCredentialsError as exc:
        raise ConfigurationError(
            provider_setting,
            f"no usable Google credentials for gcpkms ({_details(exc)}); set GOOGLE_APPLICATION_CREDENTIALS "
            "to a service account key file, or run where application default credentials exist (gcloud "
            "auth application-default login, or a workload with a service account attached)",
        ) from None
    try:
        credentials.refresh(request)
    except libs.auth_exceptions.RefreshError as exc:
        if getattr(exc, "retryable", False):
            raise UnavailableError(
                target.component, f"cannot get a Google access token: {_details(exc)}"
            ) from None
        raise ConfigurationError(
            provider_setting,
            f"Google refused the credentials of {_identity(credentials)} when asked for an access token: "
            f"{_details(exc)}",
        ) from None
    except libs.auth_exceptions.TransportError as exc:
        raise UnavailableError(
            target.component, f"cannot get a Google access token: {_details(exc)}"
        ) from None
    return credentials


def _client(
    libs: _Libraries, target: _Target, credentials: Any, request: _TimedRequest, roots: bytes | None
) -> Any:
    grpc = libs.grpc
    channel_credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=roots),
        grpc.metadata_call_credentials(libs.auth_grpc.AuthMetadataPlugin(credentials, request)),
    )
    channel = grpc.secure_channel(target.endpoint, channel_credentials, options=CHANNEL_OPTIONS)
    transport = libs.kms.services.key_management_service.transports.KeyManagementServiceGrpcTransport(
        channel=channel
    )
    client = libs.kms.KeyManagementServiceClient(transport=transport)
    _silence_payload_logging()  # again: creating the client may have configured loggers
    return client


def _silence_payload_logging() -> None:
    """Google's libraries log at debug level what must never be logged.

    The KMS client prints each response (the unwrapped data key) and its metadata, google-auth the
    bearer token of its requests. Both turn on whenever the root logger is at debug level
    (``logging.level=debug``) or GOOGLE_SDK_PYTHON_LOGGING_SCOPE asks for it, so the ``google``
    loggers are held at INFO, whatever else is configured.
    """
    google = logging.getLogger("google")
    if google.level < logging.INFO:
        google.setLevel(logging.INFO)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not name.startswith("google.") or not isinstance(logger, logging.Logger):
            continue
        if logging.NOTSET < logger.level < logging.INFO:
            logger.setLevel(logging.INFO)


def _translate(
    libs: _Libraries, target: _Target, exc: Exception, *, opening: bool, decrypting: bool
) -> KeyConnectorError:
    """One rule for every KMS error; at start a wrong setting is fatal, later everything but a bad
    ciphertext is treated as an outage, so that a fixed IAM grant or re-enabled version heals by itself."""
    errors = libs.api_exceptions
    details = _details(exc)
    if decrypting and isinstance(exc, errors.InvalidArgument):
        return IntegrityFailure(
            f"Google Cloud KMS refused to decrypt the stored data key with {target.version_name}: {details} "
            "(it was wrapped by another key or altered)"
        )
    if isinstance(exc, (errors.PermissionDenied, errors.Unauthenticated)):
        problem = (
            f"Google Cloud KMS refused the request of {target.caller} ({details}); give it the roles "
            f"roles/cloudkms.publicKeyViewer and roles/cloudkms.cryptoKeyDecrypter on {target.key_name}, and "
            "check that the key exists"
        )
        if opening:
            return ConfigurationError(target.setting("provider"), problem)
        return UnavailableError(target.component, problem)
    if opening and isinstance(exc, errors.NotFound):
        if details.startswith("KeyRing "):
            setting = "googleCloudKeyringId"
        elif details.startswith("CryptoKey "):
            setting = "googleCloudKeyId"
        else:
            setting = "googleCloudKeyVersionId"
        return ConfigurationError(
            target.setting(setting),
            f"Google Cloud KMS has no {target.version_name} ({details}); check the project, location, key "
            "ring, key and key version settings",
        )
    if opening and isinstance(exc, errors.FailedPrecondition) and "PENDING_GENERATION" not in details:
        return ConfigurationError(
            target.setting("googleCloudKeyVersionId"),
            f"the key version {target.version_name} cannot be used ({details}); it must be an enabled "
            "version of an asymmetric decryption key",
        )
    if opening and isinstance(exc, errors.InvalidArgument):
        return ConfigurationError(
            target.setting("googleCloudKeyVersionId"),
            f"Google Cloud KMS rejected the key version name {target.version_name}: {details}",
        )
    status = getattr(getattr(exc, "grpc_status_code", None), "name", type(exc).__name__)
    if opening and status == "UNAVAILABLE" and "CERTIFICATE_VERIFY_FAILED" in details.upper():
        return ConfigurationError(
            target.setting("googleCloudCaBundle"),
            f"the TLS certificate of {target.endpoint} is not trusted ({details}); give the certificate "
            "authority's PEM file here, or put it into the caCertificatesDirectory",
        )
    return UnavailableError(
        target.component, f"Google Cloud KMS at {target.endpoint} failed: {status}: {details}"
    )


def _call(
    libs: _Libraries,
    target: _Target,
    method: Any,
    request: dict[str, Any],
    *,
    opening: bool = False,
    decrypting: bool = False,
) -> Any:
    """One KMS call with our deadline and a single retry of a transient UNAVAILABLE."""
    errors = libs.api_exceptions
    for attempt in (1, 2):
        try:
            return method(request=request, timeout=CALL_TIMEOUT, retry=None)
        except errors.ServiceUnavailable as exc:
            if attempt == 1:
                time.sleep(RETRY_PAUSE)
                continue
            raise _translate(libs, target, exc, opening=opening, decrypting=decrypting) from None
        except errors.GoogleAPICallError as exc:
            raise _translate(libs, target, exc, opening=opening, decrypting=decrypting) from None
    raise AssertionError("unreachable")


def _corrupted(target: _Target, what: str) -> UnavailableError:
    return UnavailableError(target.component, f"the {what} was corrupted in transit (CRC32C mismatch)")


# --------------------------------------------------------------------------------------------------
# The provider


class GcpKmsKeyProvider:
    def __init__(
        self,
        libs: _Libraries,
        target: _Target,
        client: Any,
        public_key: rsa.RSAPublicKey,
        hash_name: str,
        description: str,
    ) -> None:
        self._libs = libs
        self._target = target
        self._client = client
        self._public_key = public_key
        self._hash_name = hash_name
        hash_type = _HASHES[hash_name]
        self._padding = padding.OAEP(mgf=padding.MGF1(hash_type()), algorithm=hash_type(), label=None)
        self._description = description
        self._closed = False

    @property
    def description(self) -> str:
        return self._description

    @property
    def fingerprint(self) -> str:
        return rsa_fingerprint(self._public_key, f"rsa-oaep-{self._hash_name.lower()}")

    async def wrap(self, data_key: bytes) -> bytes:
        return self._public_key.encrypt(data_key, self._padding)

    async def unwrap(self, wrapped: bytes) -> bytes:
        return await asyncio.to_thread(self._decrypt, wrapped)

    def _decrypt(self, wrapped: bytes) -> bytes:
        if self._closed:
            raise UnavailableError(self._target.component, "the provider was closed")
        request = {
            "name": self._target.version_name,
            "ciphertext": wrapped,
            "ciphertext_crc32c": crc32c(wrapped),
        }
        response = _call(self._libs, self._target, self._client.asymmetric_decrypt, request, decrypting=True)
        if not response.verified_ciphertext_crc32c:
            raise _corrupted(self._target, "request to Google Cloud KMS")
        plaintext: bytes = response.plaintext
        if response.plaintext_crc32c != crc32c(plaintext):
            raise _corrupted(self._target, "response of Google Cloud KMS")
        return plaintext

    async def check(self) -> None:
        probe = secrets.token_bytes(32)
        if await self.unwrap(await self.wrap(probe)) != probe:
            raise IntegrityFailure(f"{self._target.version_name} does not round-trip a wrapped key")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._client.transport.close)


def _open_blocking(libs: _Libraries, target: _Target, roots: bytes | None) -> GcpKmsKeyProvider:
    _silence_payload_logging()
    request = _TimedRequest(libs.auth_requests.Request())
    credentials = _credentials(libs, target, request)
    target = replace(target, caller=_identity(credentials))
    client = _client(libs, target, credentials, request, roots)
    try:
        public = _call(libs, target, client.get_public_key, {"name": target.version_name}, opening=True)
        if public.name != target.version_name:
            raise _corrupted(target, "request to Google Cloud KMS")
        if public.pem_crc32c != crc32c(public.pem.encode()):
            raise _corrupted(target, "public key sent by Google Cloud KMS")
        algorithm = str(getattr(public.algorithm, "name", public.algorithm))
        match = _ALGORITHM.fullmatch(algorithm)
        if match is None:
            raise ConfigurationError(
                target.setting("googleCloudKeyId"),
                f"the key {target.key_name} has the algorithm {algorithm}, which cannot decrypt; Key "
                "Connector needs an asymmetric decryption key (purpose ASYMMETRIC_DECRYPT, algorithm "
                "RSA_DECRYPT_OAEP_2048_SHA256 or larger, as upstream uses)",
            )
        public_key = serialization.load_pem_public_key(public.pem.encode())
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise ConfigurationError(
                target.setting("googleCloudKeyId"), f"the key {target.key_name} is not an RSA key"
            )
        protection = str(getattr(public.protection_level, "name", public.protection_level))
        description = (
            f"Google Cloud KMS key version {target.version_name} ({algorithm}, {protection}) at "
            f"{target.endpoint}"
        )
        return GcpKmsKeyProvider(libs, target, client, public_key, match.group(2), description)
    except BaseException:
        client.transport.close()
        raise


async def open(side: SideSettings) -> GcpKmsKeyProvider:
    rsa_settings = side.require_rsa_key()
    prefix = side.rsa_key_prefix
    target = _target(rsa_settings, prefix)
    libs = _Libraries.load(prefix)
    roots = root_certificates(side, rsa_settings)
    return await asyncio.to_thread(_open_blocking, libs, target, roots)


def root_certificates(side: SideSettings, rsa_settings: RsaKeySettings) -> bytes:
    """gRPC's ``root_certificates``: the deployment's trust, or ``googleCloudCaBundle`` when set
    (gRPC alone would trust its own bundled roots only)."""
    return side.trust().bundle_bytes(
        rsa_settings.google_cloud_ca_bundle, f"{side.rsa_key_prefix}.googleCloudCaBundle"
    )
