"""A certificate picked by thumbprint from .NET's "My" store of the current user (upstream's ``store``).

Upstream opens ``X509Store(StoreName.My, StoreLocation.CurrentUser)`` and finds
``certificate.storeThumbprint`` in it. On Linux, .NET keeps that store as files: each certificate
is a PKCS#12 file named ``<THUMBPRINT>.pfx`` (``<THUMBPRINT>.<n>.pfx`` on a name clash), written
without a password, in ``$HOME/.dotnet/corefx/cryptography/x509stores/my/`` (the store name in lower
case under the user's "corefx" feature directory). A deployment that moves off upstream keeps
that folder (or mounts it), so this source reads it as it is; ``storeDirectory`` points elsewhere.

File names are not trusted: the thumbprint of every certificate found is computed (SHA-1 of its
DER encoding), so a renamed file, a ``.crt`` dropped in by hand, or a PEM holding a certificate and
its key all work. Operators copy thumbprints from the Windows certificate dialog, which inserts an
invisible left-to-right mark; that, spaces, colons and dashes are ignored.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from keyconnector.certificates import LoadedCertificate
from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import CertificateSettings, secret

DOTNET_MY_STORE = Path(".dotnet", "corefx", "cryptography", "x509stores", "my")
"""Where .NET keeps CurrentUser\\My on Linux, relative to the home directory."""

PKCS12_SUFFIXES = frozenset({".pfx", ".p12"})
CERTIFICATE_SUFFIXES = frozenset({".crt", ".cer", ".pem"})
LISTED = 20
"""At most this many certificates are listed when none matches."""

# What copying a thumbprint from a dialog, a PowerShell table or ``openssl x509 -fingerprint`` adds:
# bidirectional marks, byte-order marks, zero-width spaces, separators.
_NOISE = re.compile(r"[\s:\-\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
_PEM_KEY = re.compile(
    rb"-----BEGIN (?:RSA |ENCRYPTED )?PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", re.S
)


@dataclass(frozen=True)
class _Candidate:
    path: Path
    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey | None
    thumbprint: str
    key_problem: str | None = None  # a private key next to it that the password (or none) does not open


@dataclass
class _Scan:
    """Everything found in the store, so that a failed lookup can say what is there."""

    candidates: list[_Candidate] = field(default_factory=list)
    locked: list[Path] = field(default_factory=list)  # PKCS#12 files the password (or none) does not open
    unreadable: list[Path] = field(default_factory=list)  # no permission
    invalid: list[Path] = field(default_factory=list)  # not a certificate at all


def normalize_thumbprint(value: str | None, setting: str) -> str:
    """The 40 upper-case hex digits of a SHA-1 thumbprint, however it was pasted."""
    cleaned = _NOISE.sub("", value or "").upper()
    if not cleaned:
        raise ConfigurationError(
            setting, "is not set; it is the SHA-1 thumbprint of the certificate (40 hexadecimal digits)"
        )
    if re.fullmatch(r"[0-9A-F]{40}", cleaned):
        return cleaned
    if re.fullmatch(r"[0-9A-F]{64}", cleaned):
        problem = (
            "this is a SHA-256 thumbprint; the store is searched by the SHA-1 one (40 hexadecimal digits)"
        )
    else:
        problem = (
            f"'{cleaned}' is not a SHA-1 thumbprint: expected 40 hexadecimal digits "
            f"(spaces and colons allowed), got {len(cleaned)} characters"
        )
    raise ConfigurationError(setting, problem)


def default_directory() -> Path:
    return Path.home() / DOTNET_MY_STORE


async def load(settings: CertificateSettings, prefix: str, ca_directory: str) -> LoadedCertificate:
    thumbprint = normalize_thumbprint(settings.store_thumbprint, f"{prefix}.storeThumbprint")
    directory = Path(settings.store_directory) if settings.store_directory else default_directory()
    password = secret(settings.store_file_password)
    return await asyncio.to_thread(_find, directory, thumbprint, password, prefix)


def _find(directory: Path, thumbprint: str, password: str | None, prefix: str) -> LoadedCertificate:
    directory_setting = f"{prefix}.storeDirectory"
    password_setting = f"{prefix}.storeFilePassword"
    try:
        files = sorted(p for p in directory.iterdir() if p.is_file())
    except FileNotFoundError:
        raise ConfigurationError(
            directory_setting,
            f"the certificate store {directory} does not exist; copy the PFX there (any name ending in .pfx) "
            "or set this setting to the folder that holds it",
        ) from None
    except NotADirectoryError:
        raise ConfigurationError(directory_setting, f"{directory} is a file, not a folder") from None
    except PermissionError:
        raise ConfigurationError(
            directory_setting, f"the certificate store {directory} is not readable by this user"
        ) from None

    scan = _Scan()
    for path in files:
        _read(path, password.encode() if password else None, scan)

    matches = [c for c in scan.candidates if c.thumbprint == thumbprint]
    if matches:
        # .NET may hold the same certificate twice (with and without its key): prefer the key.
        best = next((c for c in matches if c.private_key is not None), matches[0])
        problem = next((c.key_problem for c in matches if c.key_problem), None)
        if best.private_key is None and problem:
            raise ConfigurationError(password_setting, problem)
        public = best.certificate.public_key()
        if not isinstance(public, rsa.RSAPublicKey):
            raise ConfigurationError(
                f"{prefix}.storeThumbprint",
                f"the certificate {thumbprint} in {best.path} does not hold an RSA key; "
                "the key pair must be RSA (at least 2048 bits)",
            )
        return LoadedCertificate(
            certificate=best.certificate,
            public_key=public,
            private_key=best.private_key,
            description=f"certificate store {best.path} (thumbprint {thumbprint})",
            setting=f"{prefix}.storeThumbprint",
        )

    named_like_it = [p for p in scan.locked if p.name.upper().split(".")[0] == thumbprint]
    if named_like_it:
        raise ConfigurationError(password_setting, _locked_problem(named_like_it[0], password))
    summary = _summary(directory, thumbprint, scan)
    if scan.locked:
        raise ConfigurationError(password_setting, summary)
    raise ConfigurationError(f"{prefix}.storeThumbprint", summary)


def _locked_problem(path: Path, password: str | None) -> str:
    if password:
        return f"it does not open the PFX {path}: the password is wrong"
    return f"the PFX {path} needs a password, and none is set"


def _summary(directory: Path, thumbprint: str, scan: _Scan) -> str:
    count = len(scan.candidates)
    if count:
        listed = "; ".join(
            f"{c.thumbprint} ({c.certificate.subject.rfc4514_string() or 'no subject'}, {c.path.name})"
            for c in scan.candidates[:LISTED]
        )
        more = "; ..." if count > LISTED else ""
        found = f"the {count} certificate{'s' if count != 1 else ''} looked at: {listed}{more}"
    else:
        found = "it holds no certificate (*.pfx, *.p12, *.crt, *.cer, *.pem)"
    parts = [f"no certificate with thumbprint {thumbprint} in {directory}; {found}"]
    if scan.locked:
        parts.append(f"these PKCS#12 files do not open without the right password: {_names(scan.locked)}")
    if scan.unreadable:
        parts.append(f"these files are not readable by this user: {_names(scan.unreadable)}")
    if scan.invalid:
        parts.append(f"these files are not certificates: {_names(scan.invalid)}")
    return "; ".join(parts)


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:LISTED]) + (", ..." if len(paths) > LISTED else "")


def _read(path: Path, password: bytes | None, scan: _Scan) -> None:
    suffix = path.suffix.lower()
    if suffix not in PKCS12_SUFFIXES | CERTIFICATE_SUFFIXES:
        return
    try:
        data = path.read_bytes()
    except PermissionError:
        scan.unreadable.append(path)
        return
    except OSError:
        scan.invalid.append(path)
        return
    if suffix in PKCS12_SUFFIXES:
        _read_pkcs12(path, data, password, scan)
    elif b"-----BEGIN" in data:
        _read_pem(path, data, password, scan)
    else:
        try:
            certificate = x509.load_der_x509_certificate(data)
        except ValueError:
            scan.invalid.append(path)
            return
        scan.candidates.append(_Candidate(path, certificate, None, _thumbprint(certificate)))


def _read_pkcs12(path: Path, data: bytes, password: bytes | None, scan: _Scan) -> None:
    # .NET writes its store files without a password; files put there by hand may have one.
    attempts: list[bytes | None] = [None, b""] + ([password] if password else [])
    for attempt in attempts:
        try:
            bundle = pkcs12.load_pkcs12(data, attempt)
            break
        except ValueError:
            continue
    else:
        scan.locked.append(path)
        return
    key = bundle.key if isinstance(bundle.key, rsa.RSAPrivateKey) else None
    certificates = [bundle.cert] if bundle.cert else []
    certificates += bundle.additional_certs
    if not certificates:
        scan.invalid.append(path)
    for entry in certificates:
        certificate = entry.certificate
        own_key = key if key is not None and _pairs(key, certificate) else None
        scan.candidates.append(_Candidate(path, certificate, own_key, _thumbprint(certificate)))


def _read_pem(path: Path, data: bytes, password: bytes | None, scan: _Scan) -> None:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        scan.invalid.append(path)
        return
    key: rsa.RSAPrivateKey | None = None
    problem: str | None = None
    key_block = _PEM_KEY.search(data)
    if key_block is not None:
        key, problem = _pem_key(path, key_block.group(0), password)
    for certificate in certificates:
        own_key = key if key is not None and _pairs(key, certificate) else None
        scan.candidates.append(_Candidate(path, certificate, own_key, _thumbprint(certificate), problem))


def _pem_key(path: Path, block: bytes, password: bytes | None) -> tuple[rsa.RSAPrivateKey | None, str | None]:
    """The key, or why it cannot be read (reported only if its certificate is the one wanted)."""
    try:
        key = serialization.load_pem_private_key(block, None)
    except TypeError:  # encrypted
        if password is None:
            return None, f"the private key in {path} is encrypted, and no password is set"
        try:
            key = serialization.load_pem_private_key(block, password)
        except ValueError:
            return None, f"it does not decrypt the private key in {path}: the password is wrong"
    except ValueError:
        return None, f"the private key in {path} is not readable"
    return (key, None) if isinstance(key, rsa.RSAPrivateKey) else (None, None)


def _pairs(key: rsa.RSAPrivateKey, certificate: x509.Certificate) -> bool:
    public = certificate.public_key()
    return (
        isinstance(public, rsa.RSAPublicKey) and public.public_numbers() == key.public_key().public_numbers()
    )


def _thumbprint(certificate: x509.Certificate) -> str:
    # SHA-1 is what the thumbprint is (Windows and .NET identify certificates by it); no security rests on it.
    return certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303
