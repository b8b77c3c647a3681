"""Checked views of the settings: what the rest of the code reads, resolved once, with the message
it needs when a setting is missing.

The main one is :class:`SideSettings`. A deployment's settings describe up to two sides: its own
(``database``, ``rsaKey``, ``certificate``) and the ``transferTo`` target of upstream's start-up
transfer, of ``transfer`` and of ``rotate-key-pair``, whose sections take the same settings. Every
factory used to be handed ``(settings, transfer)`` and pick the side itself, spelling the
``transferTo.`` prefix of its messages on its own; nine copies of one choice. :func:`side_of` makes
the choice once, and a factory takes the view: its sections, the names its messages give them, and
the deployment-wide settings both sides share.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings.model import (
    CertificateSettings,
    DatabaseSettings,
    RsaKeySettings,
    Settings,
)
from keyconnector.runtime.trust import Trust

TRANSFER_PREFIX = "transferTo."
"""What every setting path of the ``transferTo`` side starts with."""

PLACEHOLDER_DOMAIN = "replace-me.invalid"
"""The domain of the URLs ``keyconnector init`` writes when it is given none. ``.invalid`` never
resolves (RFC 6761), and ``replace-me`` says what to do on sight, so a placeholder cannot silently
end up serving: ``serve`` and ``check`` refuse it by name (:func:`refuse_placeholder`)."""
IDENTITY_PLACEHOLDER = f"https://identity.{PLACEHOLDER_DOMAIN}"
"""``identityServerUri`` as ``init`` writes it without ``--identity-server-uri``."""
WEB_VAULT_PLACEHOLDER = f"https://vault.{PLACEHOLDER_DOMAIN}"
"""``webVaultUri`` as ``init`` writes it without ``--web-vault-uri``."""

DEVELOPMENT_IDENTITY_URI = "http://localhost:33656"
"""The identity URL ``make run`` writes: the development address of a Bitwarden server run from
source (its identity service listens on 33656), where nothing answers on a newcomer's machine. The
service says so once at start, in words, instead of a WARNING (``notices.development_identity_notice``)."""

KEY_PAIR_SETTINGS: dict[str, str] = {
    "awskms": "awsKeyId",
    "azurekv": "azureKeyvaultKeyName",
    "gcpkms": "googleCloudKeyId",
    "vaulttransit": "vaultTransitKeyName",
}
"""The ``rsaKey`` setting that picks the key pair, by ``rsaKey.provider`` (pkcs11, kmip and the
certificate provider choose between two, see :attr:`SideSettings.key_pair_setting`)."""

CERTIFICATE_SETTINGS: dict[str, str] = {
    "filesystem": "filesystemPath",
    "store": "storeThumbprint",
    "vault": "vaultSecretPath",
    "azurekv": "azureKeyvaultCertificateName",
    "azurestorage": "azureStorageFileName",
}
"""The ``certificate`` setting that picks the PFX, by ``certificate.provider``."""


@dataclass(frozen=True, slots=True)
class SideSettings:
    """One side of the settings: the deployment's own, or its ``transferTo`` target.

    The ``..._prefix`` properties are the settings paths of the sections (``rsaKey`` or
    ``transferTo.rsaKey``), for messages: an error names the setting the operator wrote, on the side
    they wrote it (``tests/support/messages.py`` knows these names, so that the troubleshooting page
    lists both spellings).
    """

    prefix: str
    """``""`` for the deployment's own settings, ``"transferTo."`` for the target's."""
    database: DatabaseSettings | None
    """None only on the ``transferTo`` side, when it names no database (:meth:`require_database`)."""
    rsa_key: RsaKeySettings | None
    """None only on the ``transferTo`` side, when it names no key pair (:meth:`require_rsa_key`)."""
    certificate: CertificateSettings | None
    """None only on the ``transferTo`` side, when it names no certificate (:meth:`require_certificate`)."""
    ca_certificates_directory: str
    """``caCertificatesDirectory``, deployment-wide: one process trusts one set of private CAs,
    whichever side it connects to."""
    key_ring_anchor: str | None
    """``keyRingAnchor`` on the deployment's own side; None on the ``transferTo`` side, because the
    pinned anchor is the deployment's and the target's ring has its own."""
    write_legacy_format: bool
    """``compat.writeLegacyFormat``, deployment-wide: whatever the side, this process seals records so
    that upstream can read them, or not."""

    @property
    def transfer(self) -> bool:
        """Whether this is the ``transferTo`` side."""
        return self.prefix == TRANSFER_PREFIX

    @property
    def database_prefix(self) -> str:
        return f"{self.prefix}database"

    @property
    def rsa_key_prefix(self) -> str:
        return f"{self.prefix}rsaKey"

    @property
    def certificate_prefix(self) -> str:
        return f"{self.prefix}certificate"

    @property
    def key_pair_setting(self) -> str:
        """The setting that picks *which* key pair this side uses (the PFX's path, the KMS key's id),
        for a message about the wrong key pair: ``rsaKey.provider`` only says what kind it is, and
        an operator who must point the service at another key pair changes this one."""
        rsa_key = self.rsa_key
        if rsa_key is None:
            return f"{self.rsa_key_prefix}.provider"
        if rsa_key.provider == "certificate":
            source = self.certificate.provider if self.certificate is not None else ""
            name = CERTIFICATE_SETTINGS.get(source, "provider")
            return f"{self.certificate_prefix}.{name}"
        if rsa_key.provider == "pkcs11":
            by_label = rsa_key.pkcs11_private_key_label and not rsa_key.pkcs11_private_key_id
            return f"{self.rsa_key_prefix}.{'pkcs11PrivateKeyLabel' if by_label else 'pkcs11PrivateKeyId'}"
        if rsa_key.provider == "kmip":
            by_name = rsa_key.kmip_key_name and not rsa_key.kmip_key_id
            return f"{self.rsa_key_prefix}.{'kmipKeyName' if by_name else 'kmipKeyId'}"
        return f"{self.rsa_key_prefix}.{KEY_PAIR_SETTINGS.get(rsa_key.provider, 'provider')}"

    def require_database(self) -> DatabaseSettings:
        """The database section, or a ``ConfigurationError`` naming the side's ``database.provider``."""
        if self.database is None:
            raise ConfigurationError(f"{self.database_prefix}.provider", "is not set")
        return self.database

    def require_rsa_key(self) -> RsaKeySettings:
        """The key-pair section, or a ``ConfigurationError`` naming the side's ``rsaKey.provider``."""
        if self.rsa_key is None:
            raise ConfigurationError(f"{self.rsa_key_prefix}.provider", "is not set")
        return self.rsa_key

    def require_certificate(self) -> CertificateSettings:
        """The certificate section, or a ``ConfigurationError`` naming the side's ``certificate.provider``."""
        if self.certificate is None:
            raise ConfigurationError(f"{self.certificate_prefix}.provider", "is not set")
        return self.certificate

    def trust(self) -> Trust:
        """What this side's outgoing TLS trusts (``caCertificatesDirectory``; built once per process)."""
        return Trust.from_directory(self.ca_certificates_directory)


def side_of(settings: Settings, *, transfer: bool = False) -> SideSettings:
    """The deployment's own side of ``settings``, or with ``transfer`` its ``transferTo`` side."""
    if transfer:
        target = settings.transfer_to
        return SideSettings(
            prefix=TRANSFER_PREFIX,
            database=target.database,
            rsa_key=target.rsa_key,
            certificate=target.certificate,
            ca_certificates_directory=settings.ca_certificates_directory,
            key_ring_anchor=None,
            write_legacy_format=settings.compat.write_legacy_format,
        )
    return SideSettings(
        prefix="",
        database=settings.database,
        rsa_key=settings.rsa_key,
        certificate=settings.certificate,
        ca_certificates_directory=settings.ca_certificates_directory,
        key_ring_anchor=settings.key_ring_anchor,
        write_legacy_format=settings.compat.write_legacy_format,
    )


def is_placeholder(uri: str | None) -> bool:
    """Whether ``uri`` is one of the placeholders ``keyconnector init`` writes (any host under
    :data:`PLACEHOLDER_DOMAIN`, however an operator may have edited the rest)."""
    if not uri:
        return False
    try:
        host = urlsplit(uri.strip()).hostname or ""
    except ValueError:
        return False
    return host == PLACEHOLDER_DOMAIN or host.endswith("." + PLACEHOLDER_DOMAIN)


def refuse_placeholder(setting: str, uri: str | None, replacement: str) -> None:
    """Raise a :class:`ConfigurationError` naming ``setting`` when it still holds init's placeholder."""
    if is_placeholder(uri):
        raise ConfigurationError(
            setting,
            f"is still the placeholder '{uri}' that `keyconnector init` wrote; replace it with {replacement}",
        )


def web_vault_uri(settings: Settings) -> str | None:
    """``webVaultUri``, refused while it is init's placeholder (unset stays allowed: it only costs
    browsers their access, which ``notices.cors_notice`` explains)."""
    refuse_placeholder(
        "webVaultUri",
        settings.web_vault_uri,
        "the web vault's URL, like https://vault.example.com (or remove the line if no browser uses this "
        "service)",
    )
    return settings.web_vault_uri


def identity_server_uri(settings: Settings) -> str:
    """The one setting without which nothing can be authorised: required, with a message that says why."""
    if not settings.identity_server_uri:
        raise ConfigurationError(
            "identityServerUri", "is not set; it is the URL of the Bitwarden identity server"
        )
    refuse_placeholder(
        "identityServerUri",
        settings.identity_server_uri,
        "the Bitwarden identity server's URL, like https://vault.example.com/identity",
    )
    uri = settings.identity_server_uri.strip()
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a port that is not one
    except ValueError:
        parts = urlsplit("")
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        # Only the form: a typo here used to pass pre-flight, create a data key, then crash-loop the
        # workers. Whether the server answers is a network question, asked by ``check`` and at runtime.
        raise ConfigurationError(
            "identityServerUri",
            f"'{uri}' is not an http:// or https:// URL with a host; "
            "expected the identity server's address, like https://vault.example.com/identity",
        )
    return settings.identity_server_uri
