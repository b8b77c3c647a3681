"""The ``store`` certificate source: a certificate found by thumbprint in a .NET-style store folder.

One store holds the kinds of file that end up there: .NET's own ``<THUMBPRINT>.pfx`` (no password),
a password-protected ``.p12``, a PEM with a certificate and its key, a PEM and a DER certificate
without key, a file misnamed after another thumbprint, and a file that is no certificate at all.
Every certificate must be found by its real thumbprint, however the operator pasted it.
"""

from __future__ import annotations

import asyncio
import secrets
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyconnector.certificates import LoadedCertificate, load_certificate
from keyconnector.certificates.store import DOTNET_MY_STORE, normalize_thumbprint
from keyconnector.errors import ConfigurationError
from keyconnector.keypairs.generate import self_signed_certificate
from keyconnector.runtime.settings import Settings, load_settings, side_of
from tests.support.certstore import StoreEntry, new_entry, pfx_bytes, thumbprint, write_dotnet_pfx
from tests.support.providers import assert_certificate_unwraps

PASSWORD = "p12-" + secrets.token_urlsafe(12)
LRM, RLM, BOM = "\u200e", "\u200f", "\ufeff"


class Store:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.dotnet = new_entry("Written by dotnet")
        self.protected = new_entry("Protected p12")
        self.combined = new_entry("Combined PEM")
        self.pem_only = new_entry("PEM certificate only")
        self.der_only = new_entry("DER certificate only")
        self.dotnet_path = write_dotnet_pfx(directory, self.dotnet)
        (directory / "keyconnector.p12").write_bytes(pfx_bytes(self.protected, PASSWORD))
        pem = serialization.Encoding.PEM
        (directory / "combined.pem").write_bytes(
            self.combined.certificate.public_bytes(pem)
            + self.combined.key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (directory / "public.crt").write_bytes(self.pem_only.certificate.public_bytes(pem))
        # Named after another certificate's thumbprint: the name must not be trusted.
        (directory / f"{self.dotnet.thumbprint}.cer").write_bytes(
            self.der_only.certificate.public_bytes(serialization.Encoding.DER)
        )
        (directory / "notes.pem").write_text("not a certificate\n")
        (directory / "README.txt").write_text("ignored: not a certificate file name\n")

    @property
    def all(self) -> list[StoreEntry]:
        return [self.dotnet, self.protected, self.combined, self.pem_only, self.der_only]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("store"))


def settings_for(env: Mapping[str, str]) -> Settings:
    base = {"keyConnectorSettings__certificate__provider": "store"}
    base.update(env)
    return load_settings(environ=base).settings


def store_env(directory: Path | None, thumb: str, password: str | None = None) -> dict[str, str]:
    env = {"keyConnectorSettings__certificate__storeThumbprint": thumb}
    if directory is not None:
        env["keyConnectorSettings__certificate__storeDirectory"] = str(directory)
    if password is not None:
        env["keyConnectorSettings__certificate__storeFilePassword"] = password
    return env


def load(settings: Settings, prefix: str = "certificate") -> LoadedCertificate:
    return asyncio.run(load_certificate(side_of(settings, transfer=prefix.startswith("transferTo"))))


def failure(settings: Settings, setting: str, prefix: str = "certificate") -> str:
    """The message of the ConfigurationError, asserted to name ``setting`` and never the password."""
    with pytest.raises(ConfigurationError) as caught:
        load(settings, prefix)
    assert str(caught.value).startswith(f"keyConnectorSettings__{prefix.replace('.', '__')}__{setting}:")
    assert PASSWORD not in "".join(traceback.format_exception(caught.value))
    return caught.value.problem


def windows_dialog(thumb: str) -> str:
    """How the certificate dialog's Details tab copies it: lower-case pairs, a leading invisible mark."""
    return LRM + " ".join(thumb[i : i + 2] for i in range(0, 40, 2)).lower()


def openssl_style(thumb: str) -> str:
    """``openssl x509 -fingerprint -sha1``: colon-separated pairs."""
    return ":".join(thumb[i : i + 2] for i in range(0, 40, 2))


# -- finding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "pasted", "has_key"),
    [
        ("dotnet", windows_dialog, True),
        ("protected", openssl_style, True),
        ("combined", lambda t: BOM + t.lower() + RLM, True),
        ("pem_only", lambda t: f"  {t[:20]} {t[20:]}\t", False),
        ("der_only", lambda t: f"{RLM}{LRM}{t}", False),
    ],
)
def test_finds_each_kind_of_file_by_its_real_thumbprint(
    store: Store, which: str, pasted: Callable[[str], str], has_key: bool
) -> None:
    entry: StoreEntry = getattr(store, which)
    loaded = load(settings_for(store_env(store.directory, pasted(entry.thumbprint), PASSWORD)))
    assert loaded.certificate == entry.certificate
    assert loaded.public_key.public_numbers() == entry.key.public_key().public_numbers()
    if has_key:
        assert loaded.private_key is not None
        assert loaded.private_key.private_numbers() == entry.key.private_numbers()
    else:
        assert loaded.private_key is None
    assert entry.thumbprint in loaded.description


def test_dotnet_store_file_needs_no_password(store: Store) -> None:
    loaded = load(settings_for(store_env(store.directory, store.dotnet.thumbprint)))
    assert loaded.private_key is not None
    assert (
        loaded.description == f"certificate store {store.dotnet_path} (thumbprint {store.dotnet.thumbprint})"
    )


def test_certificate_key_provider_unwraps_a_data_key_wrapped_elsewhere(store: Store) -> None:
    settings = settings_for(store_env(store.directory, windows_dialog(store.dotnet.thumbprint)))
    assert_certificate_unwraps(settings, store.dotnet.certificate)


def test_the_same_certificate_twice_prefers_the_file_with_the_key(tmp_path: Path) -> None:
    entry = new_entry("Twice")
    (tmp_path / f"{entry.thumbprint}.pfx").write_bytes(pfx_bytes(entry, with_key=False))
    (tmp_path / f"{entry.thumbprint}.1.pfx").write_bytes(pfx_bytes(entry))
    loaded = load(settings_for(store_env(tmp_path, entry.thumbprint)))
    assert loaded.private_key is not None
    assert loaded.description.startswith(f"certificate store {tmp_path / entry.thumbprint}.1.pfx")


def test_default_directory_is_dotnets_store_under_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    entry = new_entry("In the default store")
    path = write_dotnet_pfx(tmp_path / DOTNET_MY_STORE, entry)
    assert path.parent == tmp_path / ".dotnet" / "corefx" / "cryptography" / "x509stores" / "my"
    loaded = load(settings_for(store_env(None, entry.thumbprint)))
    assert loaded.certificate == entry.certificate


def test_missing_default_directory_names_the_setting_and_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    problem = failure(settings_for(store_env(None, "A" * 40)), "storeDirectory")
    assert str(tmp_path / DOTNET_MY_STORE) in problem and "does not exist" in problem


def test_transfer_prefix_names_its_own_settings(store: Store) -> None:
    env = {
        "keyConnectorSettings__transferTo__certificate__provider": "store",
        "keyConnectorSettings__transferTo__certificate__storeThumbprint": store.combined.thumbprint,
        "keyConnectorSettings__transferTo__certificate__storeDirectory": str(store.directory),
        "keyConnectorSettings__transferTo__certificate__storeFilePassword": PASSWORD,
    }
    assert load(settings_for(env), "transferTo.certificate").certificate == store.combined.certificate
    env["keyConnectorSettings__transferTo__certificate__storeThumbprint"] = "0" * 40
    failure(settings_for(env), "storeThumbprint", "transferTo.certificate")


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "is not set"),
        (LRM + " ", "is not set"),
        ("A" * 39, "got 39 characters"),
        ("G" * 40, "'" + "G" * 40 + "' is not a SHA-1 thumbprint"),
        ("ab" * 32, "SHA-256 thumbprint"),
    ],
)
def test_thumbprint_must_be_40_hex_digits(store: Store, value: str, expected: str) -> None:
    problem = failure(settings_for(store_env(store.directory, value)), "storeThumbprint")
    assert expected in problem


def test_normalize_thumbprint_drops_only_formatting() -> None:
    thumb = "0123456789ABCDEF0123456789abcdef01234567"
    assert normalize_thumbprint(f"{BOM}{LRM}{thumb}{RLM}\n", "x") == thumb.upper()
    assert normalize_thumbprint(openssl_style(thumb.upper()), "x") == thumb.upper()


def test_no_match_lists_what_was_looked_at(store: Store) -> None:
    problem = failure(settings_for(store_env(store.directory, "0" * 40, PASSWORD)), "storeThumbprint")
    assert f"no certificate with thumbprint {'0' * 40} in {store.directory}" in problem
    assert "the 5 certificates looked at" in problem
    for entry in store.all:
        assert entry.thumbprint in problem
        assert entry.certificate.subject.rfc4514_string() in problem
    assert "not certificates: notes.pem" in problem and "README.txt" not in problem


def test_empty_store_says_so(tmp_path: Path) -> None:
    problem = failure(settings_for(store_env(tmp_path, "0" * 40)), "storeThumbprint")
    assert "holds no certificate" in problem


def test_protected_file_without_password_names_the_password_setting(store: Store) -> None:
    problem = failure(
        settings_for(store_env(store.directory, store.protected.thumbprint)), "storeFilePassword"
    )
    assert "keyconnector.p12" in problem and "the 5 certificates" not in problem
    assert "the 4 certificates looked at" in problem


def test_wrong_password_for_a_file_named_like_the_thumbprint(tmp_path: Path) -> None:
    entry = new_entry("Protected, named by thumbprint")
    (tmp_path / f"{entry.thumbprint}.pfx").write_bytes(pfx_bytes(entry, PASSWORD))
    problem = failure(
        settings_for(store_env(tmp_path, entry.thumbprint, "wrong-" + PASSWORD)), "storeFilePassword"
    )
    assert problem == f"it does not open the PFX {tmp_path / entry.thumbprint}.pfx: the password is wrong"
    problem = failure(settings_for(store_env(tmp_path, entry.thumbprint)), "storeFilePassword")
    assert problem == f"the PFX {tmp_path / entry.thumbprint}.pfx needs a password, and none is set"


def test_encrypted_pem_key_needs_the_password(tmp_path: Path) -> None:
    entry = new_entry("Encrypted PEM key")
    pem = serialization.Encoding.PEM
    (tmp_path / "kc.pem").write_bytes(
        entry.certificate.public_bytes(pem)
        + entry.key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(PASSWORD.encode())
        )
    )
    problem = failure(settings_for(store_env(tmp_path, entry.thumbprint)), "storeFilePassword")
    assert "is encrypted, and no password is set" in problem
    failure(settings_for(store_env(tmp_path, entry.thumbprint, "wrong")), "storeFilePassword")
    loaded = load(settings_for(store_env(tmp_path, entry.thumbprint, PASSWORD)))
    assert loaded.private_key is not None


def test_directory_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    problem = failure(settings_for(store_env(tmp_path / "file", "A" * 40)), "storeDirectory")
    assert "is a file" in problem


def test_an_ec_certificate_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = self_signed_certificate(key, common_name="EC")
    (tmp_path / "ec.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    problem = failure(settings_for(store_env(tmp_path, thumbprint(certificate))), "storeThumbprint")
    assert "does not hold an RSA key" in problem
