"""The ``awskms`` provider: the data key is wrapped by an AWS KMS key that never leaves KMS.

Compatibility with upstream: ``Encrypt``/``Decrypt`` with ``RSAES_OAEP_SHA_256`` on an RSA key, or
``SYMMETRIC_DEFAULT`` on a symmetric key when ``awsUseSymmetricEncryption`` is true, so a data key
wrapped by upstream unwraps here and the other way round. Credentials are the two static settings or,
both empty, boto3's default chain (environment, shared profile, container role, instance metadata),
as upstream's SDK does.

boto3 blocks, so every call runs in a worker thread; one client (boto3 clients are thread-safe) serves
them all. Timeouts are short and there is one retry at most, so that an outage becomes a 503 within
seconds instead of a login hanging on a dead connection.

The key is looked up once, at open (``DescribeKey``), so that a wrong key id, a disabled key or an
algorithm that does not fit the key stops the service at start with a message naming the setting,
instead of failing on the first login. Later, the same problems are reported as ``UnavailableError``:
the process keeps answering 503 and recovers once the operator fixes the key or its policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from keyconnector._optional import require
from keyconnector.errors import (
    ConfigurationError,
    IntegrityFailure,
    KeyConnectorError,
    UnavailableError,
    setting_name,
)
from keyconnector.runtime.settings import RsaKeySettings, SideSettings, secret

PROVIDER = "awskms"
RSA_ALGORITHM = "RSAES_OAEP_SHA_256"
SYMMETRIC_ALGORITHM = "SYMMETRIC_DEFAULT"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
MAX_ATTEMPTS = 2  # the first call and one retry
MAX_CIPHERTEXT = 6144  # KMS's limit for CiphertextBlob

# Error codes as KMS sends them (JSON ``__type``), plus the spellings of AWS-compatible endpoints that
# answer in the query protocol's XML (moto, some gateways).
_CIPHERTEXT_REFUSED = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_BAD_SIGNATURE = frozenset({"InvalidSignatureException", "SignatureDoesNotMatch", "IncompleteSignature"})
_BAD_CREDENTIALS = _BAD_SIGNATURE | {
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidAccessKeyId",
    "ExpiredTokenException",
    "ExpiredToken",
    "MissingAuthenticationToken",
}
_DENIED = frozenset({"AccessDeniedException", "AccessDenied"})
_BUSY = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "KMSInternalException",
        "InternalFailure",
        "ServiceUnavailable",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_KEY_UNUSABLE = frozenset({"DisabledException", "KMSInvalidStateException", "InvalidKeyUsageException"})

_DEFAULT_CHAIN = (
    "boto3's default credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared credentials "
    "and config files with AWS_PROFILE, a container role, the EC2 instance metadata)"
)


@dataclass(frozen=True)
class _Context:
    """What an error message needs to name: settings under ``prefix``, the endpoint, the credentials."""

    prefix: str
    key_id: str
    region: str
    endpoint_url: str
    endpoint_setting: bool  # awsEndpoint is set (else the endpoint comes from the region)
    static_credentials: bool

    def setting(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @property
    def component(self) -> str:
        if self.endpoint_setting:
            return f"the key provider {PROVIDER} ({setting_name(self.setting('awsEndpoint'))})"
        region_setting = setting_name(self.setting("awsRegion"))
        return f"the key provider {PROVIDER} (AWS KMS in {self.region}, {region_setting})"

    @property
    def credentials(self) -> str:
        if self.static_credentials:
            return f"the credentials in {setting_name(self.setting('awsAccessKeyId'))}/awsAccessKeySecret"
        return f"the credentials found by {_DEFAULT_CHAIN}"


class AwsKmsKeyProvider:
    def __init__(self, client: Any, key_arn: str, algorithm: str, context: _Context) -> None:
        self._client = client
        self._key_arn = key_arn
        self._algorithm = algorithm
        self._context = context

    @property
    def description(self) -> str:
        return f"AWS KMS key {self._key_arn} ({self._algorithm}) at {self._context.endpoint_url}"

    @property
    def fingerprint(self) -> str:
        return f"awskms:{self._key_arn}:{self._algorithm}"

    async def wrap(self, data_key: bytes) -> bytes:
        response = await self._call(
            "Encrypt", KeyId=self._key_arn, Plaintext=data_key, EncryptionAlgorithm=self._algorithm
        )
        return bytes(response["CiphertextBlob"])

    async def unwrap(self, wrapped: bytes) -> bytes:
        if not 0 < len(wrapped) <= MAX_CIPHERTEXT:
            raise IntegrityFailure(f"the stored data key is not a KMS ciphertext ({len(wrapped)} bytes)")
        # KeyId and the algorithm are given so that KMS refuses a ciphertext of another key instead of
        # decrypting with whichever key the (symmetric) ciphertext names.
        response = await self._call(
            "Decrypt", CiphertextBlob=wrapped, KeyId=self._key_arn, EncryptionAlgorithm=self._algorithm
        )
        return bytes(response["Plaintext"])

    async def check(self) -> None:
        probe = secrets.token_bytes(32)
        if await self.unwrap(await self.wrap(probe)) != probe:
            raise IntegrityFailure(f"{self.description} does not round-trip a wrapped key")

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.close)

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        errors = _botocore_errors(self._context.prefix)
        method = getattr(self._client, _snake(operation))
        try:
            response: dict[str, Any] = await asyncio.to_thread(method, **params)
        except (errors.ClientError, errors.BotoCoreError) as exc:
            raise _translate(exc, operation, self._context, opening=False) from None
        return response


async def open(side: SideSettings) -> AwsKmsKeyProvider:
    rsa_settings = side.require_rsa_key()
    prefix = side.rsa_key_prefix
    require("boto3", extra="aws", setting=f"{prefix}.provider", provider=PROVIDER)
    _quiet_botocore()
    verify = verify_argument(side, rsa_settings)
    return await asyncio.to_thread(_connect, rsa_settings, prefix, verify)


def verify_argument(side: SideSettings, rsa_settings: RsaKeySettings) -> str:
    """boto3's ``verify``: the deployment's trust as one file, or ``awsCaBundle`` when set (boto3
    alone would trust certifi only, not the system store nor ``caCertificatesDirectory``)."""
    return side.trust().bundle_file(rsa_settings.aws_ca_bundle, f"{side.rsa_key_prefix}.awsCaBundle")


def _connect(rsa_settings: RsaKeySettings, prefix: str, verify: str | None) -> AwsKmsKeyProvider:
    """Build the client and look the key up (blocking: credential providers may call the network)."""
    boto3 = require("boto3", extra="aws", setting=f"{prefix}.provider", provider=PROVIDER)
    botocore_config = require("botocore.config", extra="aws", setting=f"{prefix}.provider", provider=PROVIDER)
    errors = _botocore_errors(prefix)

    key_id = (rsa_settings.aws_key_id or "").strip()
    if not key_id:
        raise ConfigurationError(
            f"{prefix}.awsKeyId",
            "is not set; give the KMS key id, key ARN, alias name (alias/...) or alias ARN",
        )
    access_key_id = (rsa_settings.aws_access_key_id or "").strip()
    secret_access_key = secret(rsa_settings.aws_access_key_secret) or ""
    _check_static_credentials(prefix, access_key_id, secret_access_key)
    endpoint = (rsa_settings.aws_endpoint or "").strip() or None
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"{prefix}.awsEndpoint",
                f"'{endpoint}' is not a URL; give one such as https://kms.eu-west-1.amazonaws.com "
                "(or a VPC endpoint's), or leave it empty to use the region's public endpoint",
            )

    try:
        session = boto3.session.Session(
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            # botocore reads AWS_DEFAULT_REGION and the profile; AWS_REGION is what AWS's other SDKs
            # (upstream's .NET one included) and ECS/Lambda set.
            region_name=(rsa_settings.aws_region or "").strip() or os.environ.get("AWS_REGION") or None,
        )
        region = session.region_name
    except errors.BotoCoreError as exc:
        raise _environment_error(exc, prefix, errors) from None
    if not region:
        raise ConfigurationError(
            f"{prefix}.awsRegion",
            "is not set (nor AWS_REGION, AWS_DEFAULT_REGION or the AWS profile's region); "
            "set it to the region of the KMS key, e.g. eu-west-1",
        )
    config = botocore_config.Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=32,
        user_agent_extra="keyconnector",
    )
    context = _Context(
        prefix=prefix,
        key_id=key_id,
        region=region,
        endpoint_url=endpoint or f"the AWS endpoint of {region}",
        endpoint_setting=endpoint is not None,
        static_credentials=bool(access_key_id),
    )
    try:
        client = session.client("kms", endpoint_url=endpoint, verify=verify, config=config)
    except (errors.ClientError, errors.BotoCoreError) as exc:
        raise _translate(exc, "the client set-up", context, opening=True) from None
    except ValueError:  # botocore's own check of the endpoint URL
        raise ConfigurationError(
            f"{prefix}.awsEndpoint", f"'{endpoint}' is not a valid endpoint URL"
        ) from None
    context = replace(context, endpoint_url=str(client.meta.endpoint_url))
    try:
        metadata = client.describe_key(KeyId=key_id)["KeyMetadata"]
        algorithm = _check_key(metadata, rsa_settings.aws_use_symmetric_encryption, context)
    except (errors.ClientError, errors.BotoCoreError) as exc:
        client.close()
        raise _translate(exc, "DescribeKey", context, opening=True) from None
    except KeyConnectorError:
        client.close()
        raise
    return AwsKmsKeyProvider(client, str(metadata.get("Arn") or key_id), algorithm, context)


def _check_static_credentials(prefix: str, access_key_id: str, secret_access_key: str) -> None:
    if access_key_id and not secret_access_key:
        raise ConfigurationError(
            f"{prefix}.awsAccessKeySecret",
            "is not set, but awsAccessKeyId is; set both (static credentials) or neither "
            f"(then {_DEFAULT_CHAIN} is used)",
        )
    if secret_access_key and not access_key_id:
        raise ConfigurationError(
            f"{prefix}.awsAccessKeyId",
            "is not set, but awsAccessKeySecret is; set both (static credentials) or neither "
            f"(then {_DEFAULT_CHAIN} is used)",
        )


def _check_key(metadata: dict[str, Any], symmetric: bool, context: _Context) -> str:
    """The algorithm to use with this key, or why the key cannot wrap the data key."""
    arn = metadata.get("Arn", context.key_id)
    state = metadata.get("KeyState", "Enabled")
    key_setting = context.setting("awsKeyId")
    if state in ("Unavailable", "Creating", "Updating"):
        raise UnavailableError(context.component, f"the KMS key {arn} is in the state {state}")
    if state == "Disabled":
        raise ConfigurationError(
            key_setting, f"the KMS key {arn} is disabled; enable it (aws kms enable-key)"
        )
    if state in ("PendingDeletion", "PendingReplicaDeletion"):
        raise ConfigurationError(
            key_setting,
            f"the KMS key {arn} is scheduled for deletion; cancel it at once (aws kms cancel-key-deletion): "
            "once it is deleted, the data key wrapped by it, hence every user's key, is lost",
        )
    if state != "Enabled":
        raise ConfigurationError(key_setting, f"the KMS key {arn} cannot be used: its state is {state}")
    usage = metadata.get("KeyUsage")
    if usage != "ENCRYPT_DECRYPT":
        raise ConfigurationError(
            key_setting,
            f"the KMS key {arn} is made for {usage}, not ENCRYPT_DECRYPT; use a key created with "
            "key usage ENCRYPT_DECRYPT (an RSA key, or a symmetric key with awsUseSymmetricEncryption=true)",
        )
    spec = str(metadata.get("KeySpec") or metadata.get("CustomerMasterKeySpec") or "")
    symmetric_setting = context.setting("awsUseSymmetricEncryption")
    if spec == SYMMETRIC_ALGORITHM:
        if not symmetric:
            raise ConfigurationError(
                symmetric_setting,
                f"is false, which needs an RSA key, but the KMS key {arn} is symmetric ({spec}); "
                "set it to true",
            )
        return SYMMETRIC_ALGORITHM
    if spec.startswith("RSA_"):
        if symmetric:
            raise ConfigurationError(
                symmetric_setting,
                f"is true, which needs a symmetric key, but the KMS key {arn} is an RSA key ({spec}); "
                "set it to false",
            )
        return RSA_ALGORITHM
    raise ConfigurationError(
        key_setting,
        f"the KMS key {arn} has the key spec {spec}, which cannot wrap a data key; use an RSA key "
        f"({RSA_ALGORITHM}) or a symmetric key ({SYMMETRIC_ALGORITHM}, with awsUseSymmetricEncryption=true)",
    )


def _translate(exc: Exception, operation: str, context: _Context, *, opening: bool) -> KeyConnectorError:
    """The service's error for a boto3 failure. The library's own text is kept only where it cannot
    hold a secret (AWS's error messages, URLs, profile names)."""
    errors = _botocore_errors(context.prefix)
    if isinstance(exc, errors.ClientError):
        return _translate_answer(exc, operation, context, opening=opening)
    if isinstance(exc, errors.NoCredentialsError):
        return _refused(
            context.setting("awsAccessKeyId"),
            f"is empty and {_DEFAULT_CHAIN} found no credentials; set awsAccessKeyId and "
            "awsAccessKeySecret, or give the process credentials in one of those places",
            context,
            opening,
        )
    if isinstance(exc, errors.CredentialRetrievalError):
        source = exc.kwargs.get("provider", "a credential provider")
        return UnavailableError(
            context.component,
            f"cannot fetch AWS credentials from the '{source}' provider of the default chain",
        )
    if isinstance(exc, errors.ParamValidationError):
        return _refused(
            context.setting("awsKeyId"), f"KMS refuses the key id '{context.key_id}'", context, opening
        )
    if isinstance(exc, errors.SSLError) and "certificate verify failed" in str(exc).lower():
        return _refused(
            context.setting("awsCaBundle"),
            f"the TLS certificate of {context.endpoint_url} is not trusted; put the certificate of the CA "
            "that issued it in awsCaBundle (a PEM file) or in the caCertificatesDirectory",
            context,
            opening,
        )
    if isinstance(exc, errors.HTTPClientError | errors.ConnectionError):
        return UnavailableError(
            context.component, f"cannot reach {context.endpoint_url}: {_network_reason(exc)}"
        )
    if isinstance(exc, errors.BotoCoreError):
        credential_error = _environment_error(exc, context.prefix, errors)
        if opening or not isinstance(credential_error, ConfigurationError):
            return credential_error
        return UnavailableError(context.component, str(credential_error))
    return UnavailableError(context.component, f"{operation} failed: {type(exc).__name__}")


def _translate_answer(exc: Any, operation: str, context: _Context, *, opening: bool) -> KeyConnectorError:
    code, message = _error_details(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    said = f"{code}: {message}" if message else code
    if code in _CIPHERTEXT_REFUSED and operation == "Decrypt":
        return IntegrityFailure(
            f"AWS KMS refuses to decrypt the stored data key with the key {context.key_id} ({code}): "
            "it was wrapped by another key, or altered"
        )
    if code in _BUSY or status >= 500 or status == 429:
        return UnavailableError(context.component, f"{operation} failed: {said}")
    if code in _BAD_CREDENTIALS:
        setting = (
            "awsAccessKeySecret"
            if code in _BAD_SIGNATURE and context.static_credentials
            else "awsAccessKeyId"
        )
        return _refused(
            context.setting(setting),
            f"AWS refuses {context.credentials} ({code}): the key id is unknown, the secret does not match "
            "it, or temporary credentials expired",
            context,
            opening,
        )
    if code in _DENIED or status in (401, 403):
        return _refused(
            context.setting("awsAccessKeyId"),
            f"{context.credentials} may not call kms:{operation} on the key {context.key_id} ({said}); "
            "allow kms:DescribeKey, kms:Encrypt and kms:Decrypt in the key policy or an IAM policy",
            context,
            opening,
        )
    if code == "NotFoundException":
        return _refused(
            context.setting("awsKeyId"),
            f"there is no KMS key '{context.key_id}' in {context.region} for these credentials' account "
            f"({said}); check the key id, the region and the account",
            context,
            opening,
        )
    if code in _KEY_UNUSABLE:
        return _refused(
            context.setting("awsKeyId"),
            f"the KMS key cannot be used for {operation}: {said}",
            context,
            opening,
        )
    return _refused(context.setting("awsKeyId"), f"{operation} failed: {said}", context, opening)


def _refused(setting: str, problem: str, context: _Context, opening: bool) -> KeyConnectorError:
    """At open, the operator has to fix a setting; later, the service waits for the fix (503)."""
    if opening:
        return ConfigurationError(setting, problem)
    return UnavailableError(context.component, f"{setting_name(setting)}: {problem}")


def _environment_error(exc: Exception, prefix: str, errors: Any) -> KeyConnectorError:
    """Failures of boto3 reading its own configuration (profiles, files, the environment's credentials)."""
    credentials = f"{prefix}.awsAccessKeyId"
    if isinstance(exc, errors.ProfileNotFound):
        return ConfigurationError(
            credentials,
            f"is empty, so boto3's default chain is used, and its profile is missing: {exc} "
            "(check AWS_PROFILE and the AWS config files)",
        )
    if isinstance(exc, errors.PartialCredentialsError):
        return ConfigurationError(
            credentials,
            f"is empty, so boto3's default chain is used, and it found incomplete credentials: {exc}",
        )
    if isinstance(exc, errors.ConfigParseError | errors.InvalidConfigError):
        return ConfigurationError(credentials, f"the AWS configuration cannot be read: {exc}")
    if isinstance(exc, errors.InvalidRegionError):
        return ConfigurationError(
            f"{prefix}.awsRegion", f"is not a valid AWS region name ({exc}); e.g. eu-west-1"
        )
    if isinstance(exc, errors.NoRegionError):
        return ConfigurationError(f"{prefix}.awsRegion", "is not set; set it to the region of the KMS key")
    return ConfigurationError(f"{prefix}.provider", f"boto3 cannot be set up: {type(exc).__name__}")


def _error_details(exc: Any) -> tuple[str, str]:
    """KMS's error code and message; endpoints answering in XML put both in the message."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or "")
    if "<Code>" in message:
        inner_code = re.search(r"<Code>([^<]*)</Code>", message)
        inner_message = re.search(r"<Message>([^<]*)</Message>", message)
        code = inner_code.group(1) if inner_code else code
        message = inner_message.group(1) if inner_message else ""
    return code or "an unknown error", message.strip()


def _network_reason(exc: Exception) -> str:
    errors = _botocore_errors("rsaKey")
    if isinstance(exc, errors.ReadTimeoutError):
        return f"no answer within {READ_TIMEOUT:g} s"
    if isinstance(exc, errors.ConnectTimeoutError):
        return f"no connection within {CONNECT_TIMEOUT:g} s"
    cause: BaseException | None = getattr(exc, "kwargs", {}).get("error")
    seen = 0
    while cause is not None and seen < 10:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
        seen += 1
    if isinstance(exc, errors.ConnectionClosedError):
        return "the connection was closed before an answer"
    return type(exc).__name__


def _botocore_errors(prefix: str) -> Any:
    return require("botocore.exceptions", extra="aws", setting=f"{prefix}.provider", provider=PROVIDER)


def _snake(operation: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()


def _quiet_botocore() -> None:
    """botocore's debug log prints request and response bodies: the data key, in and out of KMS."""
    logger = logging.getLogger("botocore")
    if logger.level < logging.INFO:
        logger.setLevel(logging.INFO)
