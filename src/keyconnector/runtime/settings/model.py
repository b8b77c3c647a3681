"""The configuration model, spelled exactly as upstream operators write it.

Field names are snake_case for Python; each carries its upstream camelCase name as its alias, the
one spelling the loader (``loader.py``), the messages and the configuration reference
(``keyconnector.ops.reference``) all go by. Secrets are ``SecretStr`` so that a ``repr`` or a log
line can never show them.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

USED_BY = "usedBy"
"""``json_schema_extra`` key on every setting: the providers that read it (``keyconnector.ops.reference``).

Each entry is ``all``, a provider name of the setting's own section (``awskms`` in ``rsaKey``: the
setting matters when ``rsaKey.provider`` is ``awskms``), or ``<section>.provider=<name>`` for a
setting that depends on another section's provider. Kept on the field itself so that a new setting
cannot reach the configuration reference without saying who uses it (a test enforces it)."""

ORIGIN = "origin"
"""``json_schema_extra`` key: ``upstream`` (the name upstream's operators already use) or ``ours``."""

CHOICES = "choices"
"""``json_schema_extra`` key on a ``provider`` field: ``module:NAME`` of the registry of its values
(the dict the service itself dispatches on, so the reference cannot list a provider that does not exist)."""

IDENTIFYING = "identifying"
"""``json_schema_extra`` key, true on a setting that is not a secret but names an account, a tenant, a
user or a key (``awsAccessKeyId``, ``kmipUsername``): ``keyconnector config show`` hides it unless
``--reveal-names``, so that its output can be pasted into a ticket without mapping the deployment."""

REFUSED = "refused"
"""``json_schema_extra`` key on a ``provider`` field: ``module:NAME`` of values that are recognised
only to be refused with an explanation (upstream's removed ``mongo``)."""


_PATH_CHARACTERS = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]+")
"""What a URL path may hold unescaped (RFC 3986 ``pchar`` and ``/``): no query, fragment or space."""


def _meta(
    *used_by: str,
    ours: bool = False,
    choices: str | None = None,
    refused: str | None = None,
    identifying: bool = False,
) -> dict[str, Any]:
    extra: dict[str, Any] = {USED_BY: list(used_by), ORIGIN: "ours" if ours else "upstream"}
    if identifying:
        extra[IDENTIFYING] = True
    if choices is not None:
        extra[CHOICES] = choices
    if refused is not None:
        extra[REFUSED] = refused
    return extra


def _alias(name: str, *used_by: str, ours: bool = False, identifying: bool = False) -> Any:
    return Field(
        default=None, alias=name, json_schema_extra=_meta(*used_by, ours=ours, identifying=identifying)
    )


class Section(BaseModel):
    model_config = ConfigDict(
        populate_by_name=True, extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    @field_validator("provider", mode="before", check_fields=False)
    @classmethod
    def _lower_provider(cls, value: Any) -> Any:
        # Upstream compares provider names case-insensitively; so do we.
        return value.strip().lower() if isinstance(value, str) else value


_SQL = ("sqlite", "postgresql", "mysql", "sqlserver")
_SERVERS = ("postgresql", "mysql", "sqlserver")


class DatabaseSettings(Section):
    """Where user keys and the wrapped data key are stored. Upstream's tables are used in place."""

    provider: str = Field(
        default="json",
        json_schema_extra=_meta(
            "all",
            choices="keyconnector.storage.registry:BACKENDS",
            refused="keyconnector.storage.registry:REMOVED",
        ),
    )
    """The backend. Unset, it is upstream's default, the JSON file at ``jsonFilePath`` (unless another
    database's connection string is set: that is refused as ambiguous). ``mongo`` is refused with the
    way out (``keyconnector transfer`` from a mongodump)."""
    json_file_path: str = Field(
        default="/etc/bitwarden/data.json", alias="jsonFilePath", json_schema_extra=_meta("json")
    )
    """The JSON file database; a lock file next to it serialises writers across processes."""
    sqlite_connection_string: SecretStr | None = _alias("sqliteConnectionString", "sqlite")
    """ADO.NET style, e.g. ``Data Source=/etc/bitwarden/kc.db``."""
    postgresql_connection_string: SecretStr | None = _alias("postgreSqlConnectionString", "postgresql")
    """ADO.NET style (``Host=db;Port=5432;Database=kc;Username=kc;Password=...``) or a URL."""
    mysql_connection_string: SecretStr | None = _alias("mySqlConnectionString", "mysql")
    """ADO.NET style (``Server=db;Port=3306;Database=kc;Uid=kc;Pwd=...``) or a URL; MySQL or MariaDB."""
    sqlserver_connection_string: SecretStr | None = _alias("sqlServerConnectionString", "sqlserver")
    """ADO.NET style (``Server=tcp:db,1433;Database=kc;User Id=kc;Password=...``) or a URL."""
    mongo_connection_string: SecretStr | None = _alias("mongoConnectionString", "mongo")
    """Accepted so that an old env file still loads; ``mongo`` itself is refused with a migration hint."""
    mongo_database_name: str | None = _alias("mongoDatabaseName", "mongo")
    """As ``mongoConnectionString``: read, never used."""
    pool_size: int = Field(
        default=10, ge=1, le=1000, alias="poolSize", json_schema_extra=_meta(*_SERVERS, ours=True)
    )
    """Connections per worker process; a ``Maximum Pool Size`` in the connection string wins."""
    allow_new_data_key: bool = Field(
        default=False, alias="allowNewDataKey", json_schema_extra=_meta("all", ours=True)
    )
    """Let ``serve`` make a new data key for a database that already holds user records but no data
    key (``serve --allow-new-data-key`` says the same once). Off, that is refused: a new key can never
    open those records, so it is almost always the wrong database or a lost ``ApplicationDatas`` row.
    It never replaces a stored data key that this key pair cannot open."""
    create_schema: bool = Field(
        default=False, alias="createSchema", json_schema_extra=_meta("sqlite", *_SERVERS, ours=True)
    )
    """Let ``serve`` create Key Connector's schema in a database that holds only tables of something
    else (``serve --create-schema`` says the same once). Off, such a database is refused: it is
    usually a connection string pointing at another application's database."""


class RsaKeySettings(Section):
    """The RSA key pair that wraps the data key: a PFX, an HSM, or a cloud KMS key."""

    provider: str = Field(
        default="certificate", json_schema_extra=_meta("all", choices="keyconnector.keypairs:PROVIDERS")
    )
    """Where the key pair lives; ``certificate`` and ``pkcs11`` also read the ``certificate`` section."""
    wrap_algorithm: str = Field(
        default="RSA-OAEP",
        alias="wrapAlgorithm",
        json_schema_extra=_meta(
            "certificate",
            "pkcs11",
            "azurekv",
            ours=True,
            choices="keyconnector.keypairs.base:WRAP_ALGORITHMS",
        ),
    )
    """How the key pair wraps the data key: ``RSA-OAEP`` (OAEP with SHA-1, upstream's) or
    ``RSA-OAEP-256`` (OAEP with SHA-256). ``ApplicationDatas`` keeps upstream's SHA-1 wrap either way,
    so upstream can still read it; an existing deployment moves with ``rotate-key-pair`` (docs/fips.md)."""
    # azurekv
    azure_keyvault_uri: str | None = _alias("azureKeyvaultUri", "azurekv")
    """The vault's URL, e.g. ``https://my-vault.vault.azure.net/``."""
    azure_keyvault_key_name: str | None = _alias("azureKeyvaultKeyName", "azurekv")
    """The RSA key's name; older enabled versions are tried too after a rotation in Key Vault."""
    azure_keyvault_ad_tenant_id: str | None = _alias("azureKeyvaultAdTenantId", "azurekv", identifying=True)
    """Entra ID tenant of the app registration."""
    azure_keyvault_ad_app_id: str | None = _alias("azureKeyvaultAdAppId", "azurekv", identifying=True)
    """The app (client) id; without a secret it picks a user-assigned managed identity."""
    azure_keyvault_ad_secret: SecretStr | None = _alias("azureKeyvaultAdSecret", "azurekv")
    """The app's client secret; empty means managed identity."""
    azure_keyvault_authority_host: str | None = _alias("azureKeyvaultAuthorityHost", "azurekv", ours=True)
    """Entra ID authority for sovereign clouds (default: the public cloud's)."""
    azure_keyvault_ca_bundle: str | None = _alias("azureKeyvaultCaBundle", "azurekv", ours=True)
    """PEM file of CAs to trust for Key Vault and Entra ID instead of the system store."""
    # gcpkms
    google_cloud_project_id: str | None = _alias("googleCloudProjectId", "gcpkms", identifying=True)
    """The Google Cloud project of the key ring."""
    google_cloud_location_id: str | None = _alias("googleCloudLocationId", "gcpkms")
    """The key ring's location, e.g. ``europe-west1`` or ``global``."""
    google_cloud_keyring_id: str | None = _alias("googleCloudKeyringId", "gcpkms")
    """The key ring."""
    google_cloud_key_id: str | None = _alias("googleCloudKeyId", "gcpkms")
    """The asymmetric-decryption key."""
    google_cloud_key_version_id: str | None = _alias("googleCloudKeyVersionId", "gcpkms")
    """The key version; its public key wraps, its private half unwraps inside KMS."""
    google_cloud_endpoint: str | None = _alias("googleCloudEndpoint", "gcpkms", ours=True)
    """``host:port`` of the KMS API, for a private endpoint (default: Google's)."""
    google_cloud_ca_bundle: str | None = _alias("googleCloudCaBundle", "gcpkms", ours=True)
    """PEM file of CAs to trust for the KMS API and the token endpoint."""
    # awskms
    aws_access_key_id: str | None = _alias("awsAccessKeyId", "awskms", identifying=True)
    """Static credentials; leave both empty for boto3's default chain (environment, profile, roles)."""
    aws_access_key_secret: SecretStr | None = _alias("awsAccessKeySecret", "awskms")
    """The secret half of ``awsAccessKeyId``."""
    aws_region: str | None = _alias("awsRegion", "awskms")
    """The key's region (default: ``AWS_REGION`` or the profile's)."""
    aws_key_id: str | None = _alias("awsKeyId", "awskms", identifying=True)
    """Key id, ARN or ``alias/...``."""
    aws_use_symmetric_encryption: bool = Field(
        default=False, alias="awsUseSymmetricEncryption", json_schema_extra=_meta("awskms")
    )
    """``SYMMETRIC_DEFAULT`` instead of ``RSAES_OAEP_SHA_256``: must match how the stored key was wrapped."""
    aws_endpoint: str | None = _alias("awsEndpoint", "awskms", ours=True)
    """A VPC endpoint or another KMS-compatible URL (default: the region's public endpoint)."""
    aws_ca_bundle: str | None = _alias("awsCaBundle", "awskms", ours=True)
    """PEM file of CAs to trust for the KMS endpoint."""
    # pkcs11
    pkcs11_provider: str | None = _alias("pkcs11Provider", "pkcs11")
    """``opensc`` or ``yubihsm``: each implies the usual library path, so none has to be written."""
    pkcs11_library_path: str | None = _alias("pkcs11LibraryPath", "pkcs11")
    """The PKCS#11 module (``.so``) to load; wins over ``pkcs11Provider``'s default."""
    pkcs11_slot_token_serial_number: str | None = _alias(
        "pkcs11SlotTokenSerialNumber", "pkcs11", identifying=True
    )
    """Picks the token by serial number, stable across reboots unlike slot numbers."""
    pkcs11_login_user_type: str | None = _alias("pkcs11LoginUserType", "pkcs11")
    """``user``, ``so`` or ``context_specific``."""
    pkcs11_login_pin: SecretStr | None = _alias("pkcs11LoginPin", "pkcs11")
    """The token's PIN."""
    pkcs11_private_key_label: str | None = _alias("pkcs11PrivateKeyLabel", "pkcs11")
    """The private key's ``CKA_LABEL``. Ignored when ``pkcs11PrivateKeyId`` is set, as upstream does
    (with a warning when it names another key)."""
    pkcs11_private_key_id: str | None = _alias("pkcs11PrivateKeyId", "pkcs11")
    """The private key's id as upstream reads it: an unsigned 64-bit number, in decimal or with ``0x``,
    matching the ``CKA_ID`` of its 8 bytes in little-endian order (``1`` is ``01 00 00 00 00 00 00 00``).
    Hex bytes as ``pkcs11-tool`` prints them are accepted where upstream reads no number: with a letter
    or a separator (``0a1b``, ``0a:1b``), or explicitly (``hex:0102``); other text is the id's UTF-8
    bytes. ``check`` shows which reading found the key."""
    # vaulttransit (ours: the RSA key never leaves Vault's transit engine)
    vault_transit_server_uri: str | None = _alias("vaultTransitServerUri", "vaulttransit", ours=True)
    """Vault's (or OpenBao's) URL."""
    vault_transit_token: SecretStr | None = _alias("vaultTransitToken", "vaulttransit", ours=True)
    """A token allowed to encrypt and decrypt with the key; AppRole is preferred (tokens expire)."""
    vault_transit_role_id: str | None = _alias(
        "vaultTransitRoleId", "vaulttransit", ours=True, identifying=True
    )
    """AppRole role id, instead of a token."""
    vault_transit_secret_id: SecretStr | None = _alias("vaultTransitSecretId", "vaulttransit", ours=True)
    """AppRole secret id."""
    vault_transit_app_role_mount_point: str = Field(
        default="approle",
        alias="vaultTransitAppRoleMountPoint",
        json_schema_extra=_meta("vaulttransit", ours=True),
    )
    """Where the AppRole auth method is mounted."""
    vault_transit_mount_point: str = Field(
        default="transit", alias="vaultTransitMountPoint", json_schema_extra=_meta("vaulttransit", ours=True)
    )
    """Where the transit engine is mounted."""
    vault_transit_key_name: str | None = _alias("vaultTransitKeyName", "vaulttransit", ours=True)
    """The transit key (an RSA type: ``rsa-2048`` or larger)."""
    vault_transit_namespace: str | None = _alias("vaultTransitNamespace", "vaulttransit", ours=True)
    """Vault Enterprise / OpenBao namespace."""
    vault_transit_ca_bundle: str | None = _alias("vaultTransitCaBundle", "vaulttransit", ours=True)
    """PEM file of CAs to trust for Vault."""
    # kmip (ours: the key stays in a KMIP key manager; mutual TLS authenticates the service)
    kmip_server_host: str | None = _alias("kmipServerHost", "kmip", ours=True)
    """The key manager's host name or address (its certificate must name it)."""
    kmip_server_port: int = Field(
        default=5696, alias="kmipServerPort", json_schema_extra=_meta("kmip", ours=True)
    )
    """The KMIP port (5696 is IANA's)."""
    kmip_client_certificate: str | None = _alias("kmipClientCertificate", "kmip", ours=True)
    """PEM file of the client certificate the key manager knows this service by (chain allowed)."""
    kmip_client_key: str | None = _alias("kmipClientKey", "kmip", ours=True)
    """PEM file of the client certificate's private key (unencrypted; protect it with file modes)."""
    kmip_ca_bundle: str | None = _alias("kmipCaBundle", "kmip", ours=True)
    """PEM file of CAs to trust for the key manager instead of the deployment's trust store."""
    kmip_key_id: str | None = _alias("kmipKeyId", "kmip", ours=True)
    """Unique identifier of the key: an RSA private key (server-side OAEP-SHA-256 decryption) or an
    AES key (server-side AES-GCM). Give this or ``kmipKeyName``."""
    kmip_key_name: str | None = _alias("kmipKeyName", "kmip", ours=True)
    """The key's Name attribute, located at start-up; it must name exactly one object."""
    kmip_public_key_id: str | None = _alias("kmipPublicKeyId", "kmip", ours=True)
    """For an RSA key whose server keeps no Link to its public key: the public key's unique identifier."""
    kmip_public_key_name: str | None = _alias("kmipPublicKeyName", "kmip", ours=True)
    """Or the public key's Name attribute."""
    kmip_username: str | None = _alias("kmipUsername", "kmip", ours=True, identifying=True)
    """Username credential sent with every request, for key managers that want one besides the certificate."""
    kmip_password: SecretStr | None = _alias("kmipPassword", "kmip", ours=True)
    """The password that goes with ``kmipUsername``."""


class CertificateSettings(Section):
    """The PFX holding the key pair, read when ``rsaKey.provider`` is ``certificate`` (the whole key
    pair) or ``pkcs11`` (only the public key, for wrapping)."""

    provider: str = Field(
        default="filesystem", json_schema_extra=_meta("all", choices="keyconnector.certificates:SOURCES")
    )
    """Where the PFX comes from."""
    # filesystem
    filesystem_path: str = Field(
        default="/etc/bitwarden/key.pfx", alias="filesystemPath", json_schema_extra=_meta("filesystem")
    )
    """The PFX file; keep it readable by the service's user only (``serve`` warns otherwise)."""
    filesystem_password: SecretStr | None = _alias("filesystemPassword", "filesystem")
    """The PFX's password."""
    # store
    store_thumbprint: str | None = _alias("storeThumbprint", "store")
    """SHA-1 thumbprint as copied from Windows (spaces and invisible marks are ignored)."""
    store_directory: str | None = _alias("storeDirectory", "store", ours=True)
    """The folder standing for the store (default: .NET's CurrentUser\\My on Linux)."""
    store_file_password: SecretStr | None = _alias("storeFilePassword", "store", ours=True)
    """Password of the PFX files in the store folder."""
    # azurestorage
    azure_storage_connection_string: SecretStr | None = _alias("azureStorageConnectionString", "azurestorage")
    """The storage account's connection string (account key or SAS); ``BlobEndpoint`` overrides the URL."""
    azure_storage_container: str | None = _alias("azureStorageContainer", "azurestorage")
    """The blob container."""
    azure_storage_file_name: str | None = _alias("azureStorageFileName", "azurestorage")
    """The PFX blob's name."""
    azure_storage_file_password: SecretStr | None = _alias("azureStorageFilePassword", "azurestorage")
    """The PFX's password."""
    azure_storage_ca_bundle: str | None = _alias("azureStorageCaBundle", "azurestorage", ours=True)
    """PEM file of CAs to trust for the blob endpoint."""
    # azurekv
    azure_keyvault_uri: str | None = _alias("azureKeyvaultUri", "azurekv")
    """The vault's URL."""
    azure_keyvault_certificate_name: str | None = _alias("azureKeyvaultCertificateName", "azurekv")
    """The certificate; its PKCS#12 (or PEM) secret holds the private key."""
    azure_keyvault_ad_tenant_id: str | None = _alias("azureKeyvaultAdTenantId", "azurekv", identifying=True)
    """Entra ID tenant of the app registration."""
    azure_keyvault_ad_app_id: str | None = _alias("azureKeyvaultAdAppId", "azurekv", identifying=True)
    """The app (client) id; without a secret it picks a user-assigned managed identity."""
    azure_keyvault_ad_secret: SecretStr | None = _alias("azureKeyvaultAdSecret", "azurekv")
    """The app's client secret; empty means managed identity."""
    azure_keyvault_authority_host: str | None = _alias("azureKeyvaultAuthorityHost", "azurekv", ours=True)
    """Entra ID authority for sovereign clouds (default: the public cloud's)."""
    azure_keyvault_ca_bundle: str | None = _alias("azureKeyvaultCaBundle", "azurekv", ours=True)
    """PEM file of CAs to trust for Key Vault and Entra ID."""
    # vault
    vault_server_uri: str | None = _alias("vaultServerUri", "vault")
    """Vault's URL (KV version 2)."""
    vault_token: SecretStr | None = _alias("vaultToken", "vault")
    """A token that may read the secret."""
    vault_secret_mount_point: str | None = _alias("vaultSecretMountPoint", "vault")
    """The KV engine's mount (default ``secret``)."""
    vault_secret_path: str | None = _alias("vaultSecretPath", "vault")
    """The secret's path under the mount."""
    vault_secret_data_key: str | None = _alias("vaultSecretDataKey", "vault")
    """The key inside the secret whose value is the PFX, base64-encoded."""
    vault_secret_file_password: SecretStr | None = _alias("vaultSecretFilePassword", "vault")
    """The PFX's password."""
    vault_ca_bundle: str | None = _alias("vaultCaBundle", "vault", ours=True)
    """PEM file of CAs to trust for Vault."""


class TransferSettings(Section):
    """Upstream's start-up transfer: when the lock file is absent and both a target database and a
    target key pair are given below (they take the same settings as the service's own sections),
    ``serve`` first copies every user key there, verifies them, then writes the lock file. Otherwise
    the start-up transfer is skipped, as upstream does."""

    lockfile_path: str | None = Field(
        default="/etc/bitwarden/transfer.lock", alias="lockfilePath", json_schema_extra=_meta("all")
    )
    """The lock file marking the start-up transfer done (upstream's default path). Empty: never run
    the start-up transfer."""
    database: DatabaseSettings | None = None
    rsa_key: RsaKeySettings | None = Field(default=None, alias="rsaKey")
    certificate: CertificateSettings | None = None


class CompatSettings(Section):
    """Ours: what to keep writing for operators who may move back to upstream."""

    write_legacy_format: bool = Field(
        default=False, alias="writeLegacyFormat", json_schema_extra=_meta("all", ours=True)
    )
    """Seal new records in upstream's format (not bound to the user) so that upstream can read them."""


class AuditSettings(Section):
    """Ours: the audit trail of every user-key access (see keyconnector.audit)."""

    file: str | None = Field(default=None, json_schema_extra=_meta("all", ours=True))
    """Append JSON lines to this file."""
    stdout: bool = Field(default=False, json_schema_extra=_meta("all", ours=True))
    """Write JSON lines to standard output."""
    database: bool = Field(
        default=False, json_schema_extra=_meta(*(f"database.provider={p}" for p in _SQL), ours=True)
    )
    """Append to our table ``keyconnector_audit`` in the service's database (SQL backends)."""
    fail_closed: bool = Field(default=False, alias="failClosed", json_schema_extra=_meta("all", ours=True))
    """Refuse to serve a key (503) when no sink can record the access."""
    checkpoint_seconds: float = Field(
        default=60, gt=0, alias="checkpointSeconds", json_schema_extra=_meta("all", ours=True)
    )
    """How often each chain's head is written into the other sinks and logged as an anchor (and at stop)."""


class RateLimitSettings(Section):
    """Ours: token buckets per user and per client address (0 turns a limit off)."""

    per_user_per_minute: float = Field(
        default=60, ge=0, alias="perUserPerMinute", json_schema_extra=_meta("all", ours=True)
    )
    """Sustained requests per user; a real client makes a handful per login."""
    per_user_burst: int = Field(
        default=20, ge=1, alias="perUserBurst", json_schema_extra=_meta("all", ours=True)
    )
    """Requests a user may make at once before the per-minute rate applies."""
    # The per-address defaults hold a login storm behind one reverse proxy (every client sharing its
    # address) with room to spare: see bench/README.md, "Rate-limit defaults", for the arithmetic.
    per_address_per_minute: float = Field(
        default=60000, ge=0, alias="perAddressPerMinute", json_schema_extra=_meta("all", ours=True)
    )
    """Sustained requests per client address (an IPv6 /64) on ``/user-keys``. Past it, a token that does
    not verify gets 429 instead of 401; a token that verifies is never refused by a per-address limit."""
    per_address_burst: int = Field(
        default=6000, ge=1, alias="perAddressBurst", json_schema_extra=_meta("all", ours=True)
    )
    """Requests an address may make at once."""
    failed_auth_per_address_per_minute: float = Field(
        default=1200, ge=0, alias="failedAuthPerAddressPerMinute", json_schema_extra=_meta("all", ours=True)
    )
    """Refused tokens per address (an IPv6 /64) and minute; past it, the next refused token gets 429
    instead of 401 or 403. A token that verifies is still served (it was not the one failing)."""
    failed_auth_burst: int = Field(
        default=600, ge=1, alias="failedAuthBurst", json_schema_extra=_meta("all", ours=True)
    )
    """Refused tokens an address may send at once."""
    trusted_proxies: str = Field(
        default="", alias="trustedProxies", json_schema_extra=_meta("all", ours=True)
    )
    """Comma-separated addresses or CIDR ranges whose ``X-Forwarded-For`` is believed. Empty behind a
    reverse proxy, every client has the proxy's address: the service logs a WARNING naming this
    setting (and ``/health/ready`` shows it) when an untrusted peer forwards a request."""


class LoggingSettings(Section):
    """Ours, not upstream's: where request and service logs go and in which shape."""

    format: str = Field(default="text", pattern="^(text|json)$", json_schema_extra=_meta("all", ours=True))
    """``json`` for one JSON object per line, for log collectors."""
    file: str | None = Field(default=None, json_schema_extra=_meta("all", ours=True))
    """Write logs to this file instead of standard error."""
    level: str = Field(
        default="info", pattern="^(?i)(debug|info|warning|error)$", json_schema_extra=_meta("all", ours=True)
    )
    """The least severe level written; client libraries stay at WARNING (debug lines may hold secrets)."""
    access_log: bool = Field(default=True, alias="accessLog", json_schema_extra=_meta("all", ours=True))
    """One line per request (method, path, status, time, request id; never a token)."""


class MetricsSettings(Section):
    """Ours: Prometheus metrics (see keyconnector.telemetry.metrics)."""

    enabled: bool = Field(default=True, json_schema_extra=_meta("all", ours=True))
    """Serve ``/metrics``. Counters only: no user id, address or key ever becomes a label."""
    port: int | None = Field(default=None, ge=1, le=65535, json_schema_extra=_meta("all", ours=True))
    """Serve ``/metrics`` on this port instead of the service's own, so that it can stay inside the
    cluster while the service port faces clients."""
    host: str | None = Field(default=None, json_schema_extra=_meta("all", ours=True))
    """The address for ``port`` (default: the service's own listening address)."""


class ShutdownSettings(Section):
    """Ours: how a stopping service drains (SIGTERM from an orchestrator, systemd or Ctrl-C)."""

    drain_seconds: float = Field(
        default=20.0, ge=0, le=3600, alias="drainSeconds", json_schema_extra=_meta("all", ours=True)
    )
    """How long requests already running may take to finish before the process exits anyway (0: stop
    at once). The workers then get up to 5 s more to close: keep the sum below the orchestrator's grace
    period (Kubernetes: 30 s by default)."""


class HttpSettings(Section):
    """Ours: how long and how much one client may hold the service (slow and idle clients, floods of
    parallel requests under one token). The README's security section explains the defaults."""

    header_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600, alias="headerTimeoutSeconds", json_schema_extra=_meta("all", ours=True)
    )
    """How long a connection may take to send a complete request head, counted from when it opens and
    again from each answer on a kept-alive connection: it is the idle (keep-alive) timeout as well, since
    the server has one timer for both. Behind a load balancer that keeps connections to the service
    open, set it above the balancer's idle timeout (AWS ALB: 60 s), so that the balancer closes first."""
    body_timeout_seconds: float = Field(
        default=20.0, gt=0, le=3600, alias="bodyTimeoutSeconds", json_schema_extra=_meta("all", ours=True)
    )
    """How long the whole body of a POST or PUT may take to arrive, counted from the request's arrival;
    a body still arriving then gets 408 and the connection is closed, and nothing is written. A key's
    body is under 2 KB (at most 64 KB is read), so even a poor mobile link sends it within a second."""
    max_requests_in_flight_per_user: int = Field(
        default=8, ge=0, alias="maxRequestsInFlightPerUser", json_schema_extra=_meta("all", ours=True)
    )
    """How many ``/user-keys`` requests one user (the token's subject) may have running at once in one
    worker process (0: no cap); one more gets 429. A client normally has one; HTTP/1.1 already runs one
    request at a time per connection, so this bounds what many connections under one token can hold."""


class TracingSettings(Section):
    """Ours: OpenTelemetry traces, exported over OTLP/HTTP (``pip install 'keyconnector[otel]'``).

    The exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers,
    certificate); ``OTEL_SERVICE_NAME`` names the service (default ``keyconnector``)."""

    enabled: bool = Field(default=False, json_schema_extra=_meta("all", ours=True))
    """Export a span per request, with child spans for the key provider and the database."""


class Settings(BaseSettings):
    """Everything under ``keyConnectorSettings``."""

    model_config = SettingsConfigDict(
        populate_by_name=True, extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    web_vault_uri: str | None = Field(
        default=None,
        alias="webVaultUri",
        validation_alias=AliasChoices("webVaultUri", "web_vault_uri"),
        json_schema_extra=_meta("all"),
    )
    """The web vault's URL: the one origin allowed by CORS (the admin console's "test" button)."""
    path_base: str | None = Field(
        default=None,
        alias="pathBase",
        validation_alias=AliasChoices("pathBase", "path_base"),
        json_schema_extra=_meta("all", ours=True),
    )
    """A path prefix the reverse proxy forwards unstripped, such as ``/key-connector`` (Bitwarden's
    installer nginx strips it; other proxies may not). ``/key-connector/user-keys`` is then served as
    ``/user-keys``; the unprefixed paths keep answering too (the orchestrator's health probes, a proxy
    that strips), as ASP.NET Core's ``UsePathBase`` does. Logs and metrics name the unprefixed route."""
    identity_server_uri: str | None = Field(
        default=None,
        alias="identityServerUri",
        validation_alias=AliasChoices("identityServerUri", "identity_server_uri"),
        json_schema_extra=_meta("all"),
    )
    """The Bitwarden identity server; required. Tokens are checked against its discovery document."""
    database: DatabaseSettings = DatabaseSettings()
    rsa_key: RsaKeySettings = Field(
        default=RsaKeySettings(), alias="rsaKey", validation_alias=AliasChoices("rsaKey", "rsa_key")
    )
    certificate: CertificateSettings = CertificateSettings()
    transfer_to: TransferSettings = Field(
        default=TransferSettings(),
        alias="transferTo",
        validation_alias=AliasChoices("transferTo", "transfer_to"),
    )
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    http: HttpSettings = HttpSettings()
    tracing: TracingSettings = TracingSettings()
    compat: CompatSettings = CompatSettings()
    audit: AuditSettings = AuditSettings()
    rate_limit: RateLimitSettings = Field(
        default=RateLimitSettings(),
        alias="rateLimit",
        validation_alias=AliasChoices("rateLimit", "rate_limit"),
    )
    ca_certificates_directory: str = Field(
        default="/etc/bitwarden/ca-certificates",
        alias="caCertificatesDirectory",
        validation_alias=AliasChoices("caCertificatesDirectory", "ca_certificates_directory"),
        json_schema_extra=_meta("all"),
    )
    """``*.crt`` files of private CAs trusted for every outgoing TLS connection, as upstream's image does."""
    last_access_flush_seconds: float = Field(
        default=10.0,
        gt=0,
        le=60,
        alias="lastAccessFlushSeconds",
        validation_alias=AliasChoices("lastAccessFlushSeconds", "last_access_flush_seconds"),
        json_schema_extra=_meta("all", ours=True),
    )
    """How late ``LastAccessDate`` may be written: batched, so a read never waits on (or fails by) a write."""
    key_ring_refresh_seconds: float = Field(
        default=10.0,
        gt=0,
        le=60,
        alias="keyRingRefreshSeconds",
        validation_alias=AliasChoices("keyRingRefreshSeconds", "key_ring_refresh_seconds"),
        json_schema_extra=_meta("all", ours=True),
    )
    """How often a running service looks for a new data-key version (rotations wait this long, plus
    a margin, before they rely on every instance sealing with the new version)."""
    key_ring_anchor: str | None = Field(
        default=None,
        alias="keyRingAnchor",
        validation_alias=AliasChoices("keyRingAnchor", "key_ring_anchor"),
        json_schema_extra=_meta("all", ours=True),
    )
    """The key ring's anchor (20 hex digits, from the start-up log, ``check`` or ``stats``). Set, every
    process refuses a key ring that is not authenticated by that deployment's key, even at a cold start
    (see the README's threat model): a database writer cannot then swap in a ring of their own."""

    @field_validator("key_ring_anchor")
    @classmethod
    def _anchor_form(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        text = value.strip().lower()
        if len(text) != 20 or any(c not in "0123456789abcdef" for c in text):
            raise ValueError(
                "must be the 20 hex digits that `keyconnector check` shows as the key ring's anchor"
            )
        return text

    @field_validator("path_base")
    @classmethod
    def _path_base_form(cls, value: str | None) -> str | None:
        if value is None or not value.strip() or value.strip() == "/":
            return None
        text = value.strip().rstrip("/")
        segments = text.split("/")
        if (
            not text.startswith("/")
            or any(segment in {"", ".", ".."} for segment in segments[1:])
            or not _PATH_CHARACTERS.fullmatch(text)
        ):
            raise ValueError(
                "must be a path prefix like /key-connector: starting with '/', without '//', '.' or '..' "
                "segments, a query or a fragment"
            )
        return text

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what ``load_settings`` hands in: it already merged the JSON file and the environment
        # with upstream's case-insensitive rules, which pydantic-settings' own env source cannot express
        # (it would not know the appsettings section or the ':' separator).
        return (init_settings,)


def secret(value: SecretStr | None) -> str | None:
    """Reveal a secret at the last moment, where a library needs it."""
    return value.get_secret_value() if value is not None else None
