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
from keyconnector.runtime.settings.views import SideSettings, identity_server_uri, side_of

__all__ = [
    "CHOICES",
    "CONFIG_FILE_ENV",
    "IDENTIFYING",
    "ORIGIN",
    "REFUSED",
    "USED_BY",
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
]
