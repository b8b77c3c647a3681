"""The settings: the model (``model``), how it is read (``loader``) and the views the rest of the
code takes of it (``views``).

Everything is re-exported here, so that a caller names the settings package and not which of its
modules holds a name: the split is for readers of the package, not for its users.
"""

from keyconnector.runtime.settings.loader import (
    CONFIG_FILE_ENV,
    LoadedSettings,
    Origin,
    load_settings,
    load_with_env_file,
    read_env_file,
    setting_paths,
)
from keyconnector.runtime.settings.model import (
    CHOICES,
    IDENTIFYING,
    ORIGIN,
    REFUSED,
    USED_BY,
    AuditSettings,
    CertificateSettings,
    CompatSettings,
    DatabaseSettings,
    HttpSettings,
    LoggingSettings,
    MetricsSettings,
    RateLimitSettings,
    RsaKeySettings,
    Section,
    Settings,
    ShutdownSettings,
    TracingSettings,
    TransferSettings,
    secret,
)
from keyconnector.runtime.settings.views import (
    DEVELOPMENT_IDENTITY_URI,
    IDENTITY_PLACEHOLDER,
    WEB_VAULT_PLACEHOLDER,
    SideSettings,
    identity_server_uri,
    side_of,
    web_vault_uri,
)

__all__ = [
    "CHOICES",
    "CONFIG_FILE_ENV",
    "DEVELOPMENT_IDENTITY_URI",
    "IDENTIFYING",
    "IDENTITY_PLACEHOLDER",
    "ORIGIN",
    "REFUSED",
    "USED_BY",
    "WEB_VAULT_PLACEHOLDER",
    "AuditSettings",
    "CertificateSettings",
    "CompatSettings",
    "DatabaseSettings",
    "HttpSettings",
    "LoadedSettings",
    "LoggingSettings",
    "MetricsSettings",
    "Origin",
    "RateLimitSettings",
    "RsaKeySettings",
    "Section",
    "Settings",
    "ShutdownSettings",
    "SideSettings",
    "TracingSettings",
    "TransferSettings",
    "identity_server_uri",
    "load_settings",
    "load_with_env_file",
    "read_env_file",
    "secret",
    "setting_paths",
    "side_of",
    "web_vault_uri",
]
