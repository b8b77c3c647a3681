"""The configuration model, spelled exactly as upstream operators write it.

Upstream is an ASP.NET service: settings come from the ``keyConnectorSettings`` section of an
``appsettings.json`` file, overridden by environment variables such as
``keyConnectorSettings__database__provider``, with names matched case-insensitively. An operator
taking over an existing deployment keeps their env file, so this module accepts exactly those
names (and the ``:`` separator that ASP.NET also accepts), and reports anything it does not know
instead of silently ignoring a typo.

Field names are snake_case for Python; each carries its upstream camelCase name as its alias.
Secrets are ``SecretStr`` so that a ``repr`` or a log line can never show them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from keyconnector.errors import ENV_PREFIX, ConfigurationError

CONFIG_FILE_ENV = "KEYCONNECTOR_CONFIG"
"""Environment variable naming an appsettings-style JSON file (what ``serve --config`` sets)."""


def _alias(name: str) -> Any:
    return Field(default=None, alias=name)


class Section(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    @field_validator("provider", mode="before", check_fields=False)
    @classmethod
    def _lower_provider(cls, value: Any) -> Any:
        # Upstream compares provider names case-insensitively; so do we.
        return value.strip().lower() if isinstance(value, str) else value


class DatabaseSettings(Section):
    provider: str = "sqlite"
    json_file_path: str = Field(default="/etc/bitwarden/data.json", alias="jsonFilePath")
    sqlite_connection_string: SecretStr | None = _alias("sqliteConnectionString")
    postgresql_connection_string: SecretStr | None = _alias("postgreSqlConnectionString")
    mysql_connection_string: SecretStr | None = _alias("mySqlConnectionString")
    sqlserver_connection_string: SecretStr | None = _alias("sqlServerConnectionString")
    mongo_connection_string: SecretStr | None = _alias("mongoConnectionString")
    mongo_database_name: str | None = _alias("mongoDatabaseName")
    pool_size: int = Field(default=10, ge=1, le=1000, alias="poolSize")


class RsaKeySettings(Section):
    provider: str = "certificate"
    # azurekv
    azure_keyvault_uri: str | None = _alias("azureKeyvaultUri")
    azure_keyvault_key_name: str | None = _alias("azureKeyvaultKeyName")
    azure_keyvault_ad_tenant_id: str | None = _alias("azureKeyvaultAdTenantId")
    azure_keyvault_ad_app_id: str | None = _alias("azureKeyvaultAdAppId")
    azure_keyvault_ad_secret: SecretStr | None = _alias("azureKeyvaultAdSecret")
    azure_keyvault_authority_host: str | None = _alias("azureKeyvaultAuthorityHost")  # ours
    azure_keyvault_ca_bundle: str | None = _alias("azureKeyvaultCaBundle")  # ours
    # gcpkms
    google_cloud_project_id: str | None = _alias("googleCloudProjectId")
    google_cloud_location_id: str | None = _alias("googleCloudLocationId")
    google_cloud_keyring_id: str | None = _alias("googleCloudKeyringId")
    google_cloud_key_id: str | None = _alias("googleCloudKeyId")
    google_cloud_key_version_id: str | None = _alias("googleCloudKeyVersionId")
    google_cloud_endpoint: str | None = _alias("googleCloudEndpoint")  # ours: host:port of the KMS API
    google_cloud_ca_bundle: str | None = _alias("googleCloudCaBundle")  # ours
    # awskms
    aws_access_key_id: str | None = _alias("awsAccessKeyId")
    aws_access_key_secret: SecretStr | None = _alias("awsAccessKeySecret")
    aws_region: str | None = _alias("awsRegion")
    aws_key_id: str | None = _alias("awsKeyId")
    aws_use_symmetric_encryption: bool = Field(default=False, alias="awsUseSymmetricEncryption")
    aws_endpoint: str | None = _alias("awsEndpoint")  # ours: a VPC endpoint or a test server
    aws_ca_bundle: str | None = _alias("awsCaBundle")  # ours
    # pkcs11
    pkcs11_provider: str | None = _alias("pkcs11Provider")
    pkcs11_library_path: str | None = _alias("pkcs11LibraryPath")
    pkcs11_slot_token_serial_number: str | None = _alias("pkcs11SlotTokenSerialNumber")
    pkcs11_login_user_type: str | None = _alias("pkcs11LoginUserType")
    pkcs11_login_pin: SecretStr | None = _alias("pkcs11LoginPin")
    pkcs11_private_key_label: str | None = _alias("pkcs11PrivateKeyLabel")
    pkcs11_private_key_id: str | None = _alias("pkcs11PrivateKeyId")
    # vaulttransit (ours: the RSA key never leaves Vault's transit engine)
    vault_transit_server_uri: str | None = _alias("vaultTransitServerUri")
    vault_transit_token: SecretStr | None = _alias("vaultTransitToken")
    vault_transit_role_id: str | None = _alias("vaultTransitRoleId")
    vault_transit_secret_id: SecretStr | None = _alias("vaultTransitSecretId")
    vault_transit_app_role_mount_point: str = Field(default="approle", alias="vaultTransitAppRoleMountPoint")
    vault_transit_mount_point: str = Field(default="transit", alias="vaultTransitMountPoint")
    vault_transit_key_name: str | None = _alias("vaultTransitKeyName")
    vault_transit_namespace: str | None = _alias("vaultTransitNamespace")
    vault_transit_ca_bundle: str | None = _alias("vaultTransitCaBundle")


class CertificateSettings(Section):
    provider: str = "filesystem"
    # filesystem
    filesystem_path: str = Field(default="/etc/bitwarden/key.pfx", alias="filesystemPath")
    filesystem_password: SecretStr | None = _alias("filesystemPassword")
    # store
    store_thumbprint: str | None = _alias("storeThumbprint")
    store_directory: str | None = _alias("storeDirectory")  # ours; default: .NET's CurrentUser\\My on Linux
    store_file_password: SecretStr | None = _alias("storeFilePassword")  # ours
    # azurestorage
    azure_storage_connection_string: SecretStr | None = _alias("azureStorageConnectionString")
    azure_storage_container: str | None = _alias("azureStorageContainer")
    azure_storage_file_name: str | None = _alias("azureStorageFileName")
    azure_storage_file_password: SecretStr | None = _alias("azureStorageFilePassword")
    azure_storage_ca_bundle: str | None = _alias("azureStorageCaBundle")  # ours
    # azurekv
    azure_keyvault_uri: str | None = _alias("azureKeyvaultUri")
    azure_keyvault_certificate_name: str | None = _alias("azureKeyvaultCertificateName")
    azure_keyvault_ad_tenant_id: str | None = _alias("azureKeyvaultAdTenantId")
    azure_keyvault_ad_app_id: str | None = _alias("azureKeyvaultAdAppId")
    azure_keyvault_ad_secret: SecretStr | None = _alias("azureKeyvaultAdSecret")
    azure_keyvault_authority_host: str | None = _alias("azureKeyvaultAuthorityHost")  # ours
    azure_keyvault_ca_bundle: str | None = _alias("azureKeyvaultCaBundle")  # ours
    # vault
    vault_server_uri: str | None = _alias("vaultServerUri")
    vault_token: SecretStr | None = _alias("vaultToken")
    vault_secret_mount_point: str | None = _alias("vaultSecretMountPoint")
    vault_secret_path: str | None = _alias("vaultSecretPath")
    vault_secret_data_key: str | None = _alias("vaultSecretDataKey")
    vault_secret_file_password: SecretStr | None = _alias("vaultSecretFilePassword")
    vault_ca_bundle: str | None = _alias("vaultCaBundle")  # ours


class TransferSettings(Section):
    lockfile_path: str | None = _alias("lockfilePath")
    database: DatabaseSettings | None = None
    rsa_key: RsaKeySettings | None = Field(default=None, alias="rsaKey")
    certificate: CertificateSettings | None = None


class CompatSettings(Section):
    """Ours: what to keep writing for operators who may move back to upstream."""

    write_legacy_format: bool = Field(default=False, alias="writeLegacyFormat")
    """Seal new records in upstream's format (not bound to the user) so that upstream can read them."""


class AuditSettings(Section):
    """Ours: the audit trail of every user-key access (see keyconnector.audit)."""

    file: str | None = None
    """Append JSON lines to this file."""
    stdout: bool = False
    """Write JSON lines to standard output."""
    database: bool = False
    """Append to our table ``keyconnector_audit`` in the service's database (SQL backends)."""
    fail_closed: bool = Field(default=False, alias="failClosed")
    """Refuse to serve a key (503) when no sink can record the access."""


class RateLimitSettings(Section):
    """Ours: token buckets per user and per client address (0 turns a limit off)."""

    per_user_per_minute: float = Field(default=60, ge=0, alias="perUserPerMinute")
    per_user_burst: int = Field(default=20, ge=1, alias="perUserBurst")
    per_address_per_minute: float = Field(default=6000, ge=0, alias="perAddressPerMinute")
    per_address_burst: int = Field(default=600, ge=1, alias="perAddressBurst")
    # Generous: behind one corporate NAT, a few dozen clients with expired tokens must not lock out
    # the whole office.
    failed_auth_per_address_per_minute: float = Field(
        default=300, ge=0, alias="failedAuthPerAddressPerMinute"
    )
    failed_auth_burst: int = Field(default=100, ge=1, alias="failedAuthBurst")
    trusted_proxies: str = Field(default="", alias="trustedProxies")
    """Comma-separated addresses or CIDR ranges whose ``X-Forwarded-For`` is believed."""


class LoggingSettings(Section):
    """Ours, not upstream's: where request and service logs go and in which shape."""

    format: str = Field(default="text", pattern="^(text|json)$")
    file: str | None = None
    level: str = Field(default="info", pattern="^(?i)(debug|info|warning|error)$")
    access_log: bool = Field(default=True, alias="accessLog")


class MetricsSettings(Section):
    """Ours: Prometheus metrics (see keyconnector.metrics)."""

    enabled: bool = True
    """Serve ``/metrics``. Counters only: no user id, address or key ever becomes a label."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """Serve ``/metrics`` on this port instead of the service's own, so that it can stay inside the
    cluster while the service port faces clients."""
    host: str | None = None
    """The address for ``port`` (default: the service's own listening address)."""


class ShutdownSettings(Section):
    """Ours: how a stopping service drains (SIGTERM from an orchestrator, systemd or Ctrl-C)."""

    drain_seconds: float = Field(default=20.0, ge=0, le=3600, alias="drainSeconds")
    """How long requests already running may take to finish before the process exits anyway (0: stop
    at once). The workers then get up to 5 s more to close: keep the sum below the orchestrator's grace
    period (Kubernetes: 30 s by default)."""


class TracingSettings(Section):
    """Ours: OpenTelemetry traces, exported over OTLP/HTTP (``pip install 'keyconnector[otel]'``).

    The exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers,
    certificate); ``OTEL_SERVICE_NAME`` names the service (default ``keyconnector``)."""

    enabled: bool = False


class Settings(BaseSettings):
    """Everything under ``keyConnectorSettings``."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    web_vault_uri: str | None = Field(
        default=None, alias="webVaultUri", validation_alias=AliasChoices("webVaultUri", "web_vault_uri")
    )
    identity_server_uri: str | None = Field(
        default=None,
        alias="identityServerUri",
        validation_alias=AliasChoices("identityServerUri", "identity_server_uri"),
    )
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
    )
    last_access_flush_seconds: float = Field(
        default=10.0,
        gt=0,
        le=60,
        alias="lastAccessFlushSeconds",
        validation_alias=AliasChoices("lastAccessFlushSeconds", "last_access_flush_seconds"),
    )
    key_ring_refresh_seconds: float = Field(
        default=10.0,
        gt=0,
        le=60,
        alias="keyRingRefreshSeconds",
        validation_alias=AliasChoices("keyRingRefreshSeconds", "key_ring_refresh_seconds"),
    )
    """How often a running service looks for a new data-key version (rotations wait this long, plus
    a margin, before they rely on every instance sealing with the new version)."""

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


# --------------------------------------------------------------------------------------------------
# Loading


class LoadedSettings:
    """The settings plus what the loader noticed on the way (unknown names are typos, usually)."""

    def __init__(self, settings: Settings, unknown: list[str], sources: list[str]) -> None:
        self.settings = settings
        self.unknown = unknown
        self.sources = sources


def _field_map(model: type[BaseModel]) -> dict[str, tuple[str, FieldInfo]]:
    """Lower-cased upstream name -> (python field name, field)."""
    out: dict[str, tuple[str, FieldInfo]] = {}
    for name, info in model.model_fields.items():
        out[name.lower()] = (name, info)
        out[name.replace("_", "").lower()] = (name, info)
        if info.alias:
            out[info.alias.lower()] = (name, info)
    return out


def _section_model(info: FieldInfo) -> type[BaseModel] | None:
    annotation = info.annotation
    candidates = getattr(annotation, "__args__", (annotation,))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _place(
    model: type[BaseModel], target: dict[str, Any], path: list[str], value: Any, unknown: list[str], raw: str
) -> None:
    fields = _field_map(model)
    head = path[0].lower()
    if head not in fields and len(path) == 1 and head.endswith("file") and _is_secret(fields.get(head[:-4])):
        # Container secrets: every secret setting ``x`` also accepts ``xFile``, a path to read it from.
        head, value = head[:-4], _read_secret_file(raw, value)
    if head not in fields:
        unknown.append(raw)
        return
    name, info = fields[head]
    sub = _section_model(info)
    if len(path) == 1:
        if sub is not None and isinstance(value, Mapping):
            for key, inner in value.items():
                _place(model, target, [head, str(key)], inner, unknown, f"{raw}__{key}")
            return
        if sub is not None:
            unknown.append(raw)
            return
        target[name] = value
        return
    if sub is None:
        unknown.append(raw)
        return
    child = target.setdefault(name, {})
    _place(sub, child, path[1:], value, unknown, raw)


def _is_secret(entry: tuple[str, FieldInfo] | None) -> bool:
    return entry is not None and "SecretStr" in str(entry[1].annotation)


def _read_secret_file(setting: str, path: Any) -> str:
    try:
        return Path(str(path)).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigurationError(
            _dotted(setting), f"cannot read the secret file {path}: {exc.strerror}"
        ) from None


def _dotted(raw: str) -> str:
    parts = _split_env_name(raw)
    return ".".join(parts) if parts else raw


def _split_env_name(name: str) -> list[str] | None:
    lowered = name.lower()
    for prefix in (ENV_PREFIX.lower(), "keyconnectorsettings:"):
        if lowered.startswith(prefix):
            rest = name[len(prefix) :]
            return [part for part in rest.replace(":", "__").split("__") if part]
    return None


def _json_section(path: Path) -> Mapping[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigurationError("(config file)", f"the settings file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            "(config file)", f"the settings file {path} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    if not isinstance(document, dict):
        raise ConfigurationError("(config file)", f"the settings file {path} must hold a JSON object")
    for key, value in document.items():
        if key.lower() == "keyconnectorsettings" and isinstance(value, dict):
            return value
    return {}


def read_env_file(path: str | Path) -> dict[str, str]:
    """A docker-style env file, as upstream deployments keep them: ``NAME=value`` per line.

    Values are taken literally (``Data Source=/x.db`` needs no quoting); a value wrapped in one pair
    of matching quotes is unwrapped, as docker compose does. Blank lines and ``#`` comments are skipped.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigurationError("(env file)", f"cannot read the env file {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ConfigurationError("(env file)", f"{path}, line {number}: expected NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | Path | None = None
) -> LoadedSettings:
    """Merge the appsettings JSON file (if any) and the environment, environment winning.

    Raises ``ConfigurationError`` naming the first invalid setting by its upstream name.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(CONFIG_FILE_ENV):
        config_file = environ[CONFIG_FILE_ENV]
    nested: dict[str, Any] = {}
    unknown: list[str] = []
    sources: list[str] = []
    if config_file is not None:
        path = Path(config_file)
        section = _json_section(path)
        for key, value in section.items():
            _place(Settings, nested, [str(key)], value, unknown, f"{ENV_PREFIX}{key}")
        sources.append(str(path))
    env_names = sorted((k for k in environ if _split_env_name(k)), key=str.lower)
    for key in env_names:
        parts = _split_env_name(key)
        assert parts is not None
        if not parts:
            continue
        _place(Settings, nested, parts, environ[key], unknown, key)
    if env_names:
        sources.append("environment")
    try:
        settings = Settings(**nested)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(_upstream_path(Settings, [str(p) for p in first["loc"]]))
        # Never echo the input: it may be a password.
        raise ConfigurationError(location, str(first["msg"]).lower()) from None
    return LoadedSettings(settings, unknown, sources)


def load_with_env_file(
    env_file: str | Path | None, config_file: str | Path | None, *, isolated: bool = False
) -> LoadedSettings:
    """Settings as the command line gives them: ``--env-file`` lines under the real environment
    (the environment wins, as with docker's ``--env-file`` plus ``-e``), over ``--config``.

    The env file's lines are also put into ``os.environ`` (without overriding), because server
    workers inherit the environment. With ``isolated`` (a second deployment's settings, e.g. the
    target of a transfer), only the file counts and ``os.environ`` is left alone.
    """
    if isolated:
        return load_settings(read_env_file(env_file) if env_file else {}, config_file)
    if env_file:
        for name, value in read_env_file(env_file).items():
            os.environ.setdefault(name, value)
    return load_settings(config_file=config_file)


def _upstream_path(model: type[BaseModel], loc: list[str]) -> list[str]:
    out: list[str] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or part not in current.model_fields:
            out.append(part)
            current = None
            continue
        info = current.model_fields[part]
        out.append(info.alias or part)
        current = _section_model(info)
    return out


def identity_server_uri(settings: Settings) -> str:
    """The one setting without which nothing can be authorised: required, with a message that says why."""
    if not settings.identity_server_uri:
        raise ConfigurationError(
            "identityServerUri", "is not set; it is the URL of the Bitwarden identity server"
        )
    return settings.identity_server_uri


def secret(value: SecretStr | None) -> str | None:
    """Reveal a secret at the last moment, where a library needs it."""
    return value.get_secret_value() if value is not None else None
