"""Where a certificate (and, for the ``certificate`` key provider, its private key) comes from.

:func:`load_certificate` takes the side of the settings (``SideSettings``: the deployment's own or
the ``transferTo`` target's) and hands one module per source its section and context:
``async def load(settings, prefix, ca_directory) -> LoadedCertificate``; ``certificate.provider``
picks the module by name. Adding a source means adding one module and one line to ``SOURCES``.

Sources that hold a file (a path, a Vault secret, a blob) read it with ``read_certificate``, which
takes what upstream's release takes there: PKCS#12, and PEM or DER certificates (PEM also with the
private key). It tells the formats apart by their bytes, not by a file name, so that a PEM file given
where a PFX was expected is named as such instead of being reported as a wrong password.

``prefix`` is ``certificate`` or ``transferTo.certificate`` (so errors name the right setting);
``ca_directory`` is ``caCertificatesDirectory``, for sources that fetch over TLS (see
``keyconnector.runtime.trust.Trust``, built from it). A source that cannot reach its server raises
``UnavailableError``; a wrong setting raises ``ConfigurationError``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyconnector.errors import ConfigurationError, KeyPairMissing, did_you_mean
from keyconnector.runtime.settings import SideSettings

MIN_RSA_BITS = 2048

SOURCES: dict[str, str] = {
    "filesystem": "keyconnector.certificates.filesystem",
    "store": "keyconnector.certificates.store",
    "vault": "keyconnector.certificates.vault",
    "azurekv": "keyconnector.certificates.azurekv",
    "azurestorage": "keyconnector.certificates.azurestorage",
}


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    certificate: x509.Certificate | None
    public_key: rsa.RSAPublicKey
    private_key: rsa.RSAPrivateKey | None
    description: str  # where it came from, for logs and `keyconnector check`; never a secret
    setting: str = ""
    """The setting that chose this certificate (``certificate.filesystemPath``, ``...storeThumbprint``),
    so that a key provider refusing it names what to change rather than ``certificate.provider``;
    empty when a source does not say."""


async def load_certificate(side: SideSettings) -> LoadedCertificate:
    """Load the certificate the side's ``certificate`` section names."""
    settings = side.require_certificate()
    prefix = side.certificate_prefix
    module_name = SOURCES.get(settings.provider)
    if module_name is None:
        raise ConfigurationError(
            f"{prefix}.provider",
            f"unknown certificate provider '{settings.provider}'; "
            f"choose one of: {', '.join(sorted(SOURCES))}{did_you_mean(settings.provider, SOURCES)}",
        )
    module = importlib.import_module(module_name)
    loaded: LoadedCertificate = await module.load(settings, prefix, side.ca_certificates_directory)
    check_key_size(loaded.public_key, loaded.setting or f"{prefix}.provider")
    return loaded


def check_key_size(key: rsa.RSAPublicKey, setting: str) -> None:
    if key.key_size < MIN_RSA_BITS:
        raise ConfigurationError(
            setting,
            f"the RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} bits are required "
            "(make a new key pair with `keyconnector init`, then `keyconnector rotate-key-pair`)",
        )


def from_pkcs12(
    data: bytes, password: str | None, setting: str, where: str, *, file_setting: str = ""
) -> LoadedCertificate:
    """Open a PFX/PKCS#12 blob, as every PFX-based source stores it. ``setting`` names the password,
    ``file_setting`` the PFX itself (for :attr:`LoadedCertificate.setting`)."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    attempts = [password.encode()] if password else [None, b""]
    last_error: Exception | None = None
    for attempt in attempts:
        try:
            bundle = pkcs12.load_pkcs12(data, attempt)
            break
        except ValueError as exc:
            last_error = exc
    else:
        hint = (
            "the password is wrong; set it to the password the PFX was exported with"
            if password
            else "it needs a password, and none is set; set this to the password the PFX was exported with"
        )
        raise ConfigurationError(setting, f"cannot open the PFX at {where}: {hint}") from last_error
    cert = bundle.cert.certificate if bundle.cert else None
    key = bundle.key
    if cert is None and key is None and len(bundle.additional_certs) == 1:
        # A certificate exported without its key (what the pkcs11 provider needs: the key stays
        # on the token) comes back as an "additional" certificate, with no key to pair it with.
        cert = bundle.additional_certs[0].certificate
    if key is not None and not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigurationError(setting, f"the PFX at {where} holds a {type(key).__name__}, not an RSA key")
    if cert is None and key is None:
        raise ConfigurationError(setting, f"the PFX at {where} holds neither a certificate nor a key")
    public = key.public_key() if key is not None else cert.public_key()  # type: ignore[union-attr]
    if not isinstance(public, rsa.RSAPublicKey):
        raise ConfigurationError(setting, f"the certificate at {where} does not hold an RSA key")
    return LoadedCertificate(
        certificate=cert, public_key=public, private_key=key, description=where, setting=file_setting
    )


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_PEM_CERTIFICATES = frozenset({"CERTIFICATE", "X509 CERTIFICATE"})
_PEM_PRIVATE_KEYS = frozenset({"PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "EC PRIVATE KEY"})


def read_certificate(
    data: bytes, password: str | None, *, where: str, file_setting: str, password_setting: str
) -> LoadedCertificate:
    """A certificate file in any form upstream's release loads: PKCS#12, PEM or DER.

    ``file_setting`` names where the file comes from (for a file that is no certificate at all) and
    ``password_setting`` the password (for a PFX or an encrypted PEM key it does not open). The
    password is tried only on what is encrypted: a PEM file never gets a password error for its
    certificate, and a PFX tells a wrong password from a file that is not a PFX.
    """
    if b"-----BEGIN " in data:
        return _from_pem(data, password, where, file_setting, password_setting)
    kind = _der_kind(data)
    if kind == "pkcs12":
        return from_pkcs12(data, password, password_setting, where, file_setting=file_setting)
    if kind == "private key":
        raise ConfigurationError(
            file_setting,
            f"{where} is a DER private key without its certificate; give the certificate (PEM or DER), or "
            "a PFX or PEM file holding the certificate and its key",
        )
    if kind == "sequence":
        try:
            certificate = x509.load_der_x509_certificate(data)
        except ValueError:
            pass
        else:
            return _loaded(certificate, None, file_setting, f"{where} (DER certificate)")
    # Not a damaged copy of the right file but no key pair at all: restore or make, as for a missing one.
    raise KeyPairMissing(file_setting, f"{where} is neither a PFX (PKCS#12) nor a PEM or DER certificate")


def _der_kind(data: bytes) -> str | None:
    """What a DER (or BER) blob is, from its first element: a PFX starts with version 3, a private key
    with version 0, a certificate with a nested SEQUENCE. Enough to choose the parser and to name
    the file in an error; the parser has the last word."""
    if len(data) < 4 or data[0] != 0x30:
        return None
    first = data[1]
    start = 2 if first <= 0x80 else 2 + (first & 0x7F)  # 0x80: BER's indefinite length (some PFX)
    if first > 0x84 or start + 2 >= len(data):
        return None
    tag, length = data[start], data[start + 1]
    if tag == 0x02 and length == 1:
        version = data[start + 2]
        return "pkcs12" if version == 3 else ("private key" if version in (0, 1) else None)
    return "sequence" if tag == 0x30 else None


def _from_pem(
    data: bytes, password: str | None, where: str, file_setting: str, password_setting: str
) -> LoadedCertificate:
    blocks = [(match.group(1).decode(), match.group(0)) for match in _PEM_BLOCK.finditer(data)]
    certificates: list[x509.Certificate] = []
    keys: list[bytes] = []
    for label, block in blocks:
        if label in _PEM_CERTIFICATES:
            try:
                certificates.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                raise ConfigurationError(
                    file_setting, f"a certificate in the PEM file {where} cannot be read"
                ) from None
        elif label in _PEM_PRIVATE_KEYS:
            keys.append(block)
    if not certificates:
        held = ", ".join(dict.fromkeys(label for label, _ in blocks)) or "no complete PEM block"
        raise ConfigurationError(
            file_setting,
            f"the PEM file {where} holds no certificate (it holds: {held}); give the key pair's "
            "certificate, with its private key where the key provider needs it",
        )
    if len(keys) > 1:
        raise ConfigurationError(
            file_setting, f"the PEM file {where} holds {len(keys)} private keys; keep only the key pair's"
        )
    if not keys:
        return _loaded(certificates[0], None, file_setting, f"{where} (PEM certificate)")
    key = _pem_private_key(keys[0], password, where, file_setting, password_setting)
    numbers = key.public_key().public_numbers()
    for certificate in certificates:
        public = certificate.public_key()
        if isinstance(public, rsa.RSAPublicKey) and public.public_numbers() == numbers:
            return _loaded(certificate, key, file_setting, f"{where} (PEM certificate and private key)")
    raise ConfigurationError(
        file_setting,
        f"none of the certificates in the PEM file {where} belongs to its private key; put the key "
        "pair's certificate next to its key",
    )


def _pem_private_key(
    block: bytes, password: str | None, where: str, file_setting: str, password_setting: str
) -> rsa.RSAPrivateKey:
    unreadable = ConfigurationError(file_setting, f"the private key in the PEM file {where} cannot be read")
    try:
        key = serialization.load_pem_private_key(block, None)
    except TypeError:  # encrypted: only now does the password matter
        if not password:
            raise ConfigurationError(
                password_setting,
                f"the private key in the PEM file {where} is encrypted, and no password is set",
            ) from None
        try:
            key = serialization.load_pem_private_key(block, password.encode())
        except ValueError:
            raise ConfigurationError(
                password_setting, f"it does not decrypt the private key in the PEM file {where}"
            ) from None
        except UnsupportedAlgorithm:
            raise unreadable from None
    except (ValueError, UnsupportedAlgorithm):
        raise unreadable from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigurationError(
            file_setting, f"the PEM file {where} holds a {type(key).__name__}, not an RSA key"
        )
    return key


def _loaded(
    certificate: x509.Certificate, key: rsa.RSAPrivateKey | None, setting: str, description: str
) -> LoadedCertificate:
    public = certificate.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise ConfigurationError(setting, f"the certificate in {description} does not hold an RSA key")
    return LoadedCertificate(
        certificate=certificate, public_key=public, private_key=key, description=description, setting=setting
    )
