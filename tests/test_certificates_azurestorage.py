"""The ``azurestorage`` certificate source against Azurite, over HTTP and HTTPS.

A PFX uploaded as a blob must load exactly as upstream reads it, and the ``certificate`` key
provider built on it must unwrap a data key wrapped elsewhere (as upstream wrapped it). Every
failure names the setting to fix and never shows the account key, a SAS signature or the PFX
password, not even in the chained exceptions a traceback would print.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import traceback
from collections.abc import Mapping
from pathlib import Path

import pytest
from azure.storage.blob import ContainerSasPermissions, generate_container_sas
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from keyconnector.certificates import LoadedCertificate, load_certificate
from keyconnector.devtools import free_port
from keyconnector.errors import ConfigurationError, KeyConnectorError, UnavailableError
from keyconnector.keypairs.generate import self_signed_pfx
from keyconnector.runtime.settings import Settings, load_settings, side_of
from tests.support.azurite import ACCOUNT, ACCOUNT_KEY, Azurite, azurestorage_env, fresh_name
from tests.support.providers import assert_certificate_unwraps

PASSWORD = "pfx-" + secrets.token_urlsafe(12)
WRONG_KEY = "V3JvbmdLZXk" + ACCOUNT_KEY[11:]  # valid base64, not the account's key
BLOB = "keyconnector.pfx"


@pytest.fixture(scope="module")
def pfx_bytes() -> bytes:
    return self_signed_pfx(PASSWORD, bits=2048)


@pytest.fixture(scope="module")
def stored(azurite: Azurite, pfx_bytes: bytes) -> str:
    """A container on the HTTP Azurite holding the PFX (and a decoy blob, to see it listed)."""
    container = fresh_name("certs")
    azurite.upload(container, BLOB, pfx_bytes)
    azurite.upload(container, "other.txt", b"not a certificate")
    return container


@pytest.fixture(scope="module")
def stored_https(azurite_https: Azurite, pfx_bytes: bytes) -> str:
    container = fresh_name("certs")
    azurite_https.upload(container, BLOB, pfx_bytes)
    return container


def settings_from(env: Mapping[str, str], **extra: str) -> Settings:
    merged = dict(env)
    merged.update({f"keyConnectorSettings__{k.replace('.', '__')}": v for k, v in extra.items()})
    return load_settings(environ=merged).settings


def load(settings: Settings, prefix: str = "certificate") -> LoadedCertificate:
    return asyncio.run(load_certificate(side_of(settings, transfer=prefix.startswith("transferTo"))))


def failure(settings: Settings, expected: type[KeyConnectorError], prefix: str = "certificate") -> str:
    """The error's message; asserts that neither it nor its traceback (chained errors included) leaks."""
    with pytest.raises(expected) as caught:
        load(settings, prefix)
    printed = "".join(traceback.format_exception(caught.value))
    for secret_value in (ACCOUNT_KEY, ACCOUNT_KEY[:20], WRONG_KEY, PASSWORD, "sig="):
        assert secret_value not in printed
    return str(caught.value)


def assert_same_key_pair(loaded: LoadedCertificate, pfx_bytes: bytes) -> None:
    expected = pkcs12.load_pkcs12(pfx_bytes, PASSWORD.encode())
    assert expected.key is not None and expected.cert is not None
    pem = serialization.PublicFormat.SubjectPublicKeyInfo
    assert loaded.public_key.public_bytes(
        serialization.Encoding.PEM, pem
    ) == expected.key.public_key().public_bytes(serialization.Encoding.PEM, pem)
    assert loaded.private_key is not None
    assert loaded.certificate == expected.cert.certificate


# -- loading -----------------------------------------------------------------------------------------


def test_loads_the_pfx_and_unwraps_a_data_key_wrapped_elsewhere(
    azurite: Azurite, stored: str, pfx_bytes: bytes
) -> None:
    settings = settings_from(azurestorage_env(azurite, stored, BLOB, PASSWORD))
    loaded = load(settings)
    assert_same_key_pair(loaded, pfx_bytes)
    assert loaded.description == f"Azure Storage blob {stored}/{BLOB} at 127.0.0.1:{azurite.port}"

    certificate = pkcs12.load_pkcs12(pfx_bytes, PASSWORD.encode()).cert
    assert certificate is not None
    assert_certificate_unwraps(settings, certificate.certificate)


def test_loads_with_a_read_only_sas(azurite: Azurite, stored: str, pfx_bytes: bytes) -> None:
    sas = generate_container_sas(
        ACCOUNT,
        stored,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True),
        expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    env = azurestorage_env(azurite, stored, BLOB, PASSWORD)
    env["keyConnectorSettings__certificate__azureStorageConnectionString"] = (
        f"BlobEndpoint={azurite.endpoint};SharedAccessSignature={sas}"
    )
    assert_same_key_pair(load(settings_from(env)), pfx_bytes)

    # Without list rights, a missing blob is still named; the listing is just left out.
    message = failure(
        settings_from(env, **{"certificate.azureStorageFileName": "missing.pfx"}), ConfigurationError
    )
    assert "keyConnectorSettings__certificate__azureStorageFileName" in message
    assert "missing.pfx" in message and "holds" not in message


def test_transfer_prefix_loads_and_names_its_own_settings(
    azurite: Azurite, stored: str, pfx_bytes: bytes
) -> None:
    env = azurestorage_env(azurite, stored, BLOB, PASSWORD, prefix="transferTo.certificate")
    assert_same_key_pair(load(settings_from(env), "transferTo.certificate"), pfx_bytes)
    env["keyConnectorSettings__transferTo__certificate__azureStorageContainer"] = "absent-container"
    message = failure(settings_from(env), ConfigurationError, "transferTo.certificate")
    assert message.startswith("keyConnectorSettings__transferTo__certificate__azureStorageContainer:")


# -- HTTPS -------------------------------------------------------------------------------------------


def test_https_with_the_ca_bundle_setting(
    azurite_https: Azurite, stored_https: str, pfx_bytes: bytes
) -> None:
    env = azurestorage_env(azurite_https, stored_https, BLOB, PASSWORD)
    settings = settings_from(env, **{"certificate.azureStorageCaBundle": str(azurite_https.ca)})
    assert_same_key_pair(load(settings), pfx_bytes)


def test_https_with_the_company_ca_directory(
    azurite_https: Azurite, stored_https: str, pfx_bytes: bytes, tmp_path: Path
) -> None:
    assert azurite_https.ca is not None
    (tmp_path / "company-root.crt").write_bytes(azurite_https.ca.read_bytes())
    env = azurestorage_env(azurite_https, stored_https, BLOB, PASSWORD)
    settings = settings_from(env, caCertificatesDirectory=str(tmp_path))
    assert_same_key_pair(load(settings), pfx_bytes)


def test_https_untrusted_endpoint_is_refused_clearly(
    azurite_https: Azurite, stored_https: str, tmp_path: Path
) -> None:
    env = azurestorage_env(azurite_https, stored_https, BLOB, PASSWORD)
    settings = settings_from(env, caCertificatesDirectory=str(tmp_path / "none"))
    message = failure(settings, ConfigurationError)
    assert message.startswith("keyConnectorSettings__certificate__azureStorageCaBundle:")
    assert f"127.0.0.1:{azurite_https.port}" in message and "not trusted" in message


def test_a_ca_bundle_that_does_not_exist_is_named(azurite_https: Azurite, stored_https: str) -> None:
    env = azurestorage_env(azurite_https, stored_https, BLOB, PASSWORD)
    settings = settings_from(env, **{"certificate.azureStorageCaBundle": "/nonexistent/ca.pem"})
    message = failure(settings, ConfigurationError)
    assert message.startswith("keyConnectorSettings__certificate__azureStorageCaBundle:")


# -- what an operator gets wrong ---------------------------------------------------------------------


def test_missing_container_names_the_setting_and_lists_containers(azurite: Azurite, stored: str) -> None:
    settings = settings_from(azurestorage_env(azurite, "no-such-container", BLOB, PASSWORD))
    message = failure(settings, ConfigurationError)
    assert message.startswith("keyConnectorSettings__certificate__azureStorageContainer:")
    assert "no-such-container" in message and stored in message


def test_invalid_container_name_names_the_setting(azurite: Azurite) -> None:
    settings = settings_from(azurestorage_env(azurite, "Bad_Name", BLOB, PASSWORD))
    message = failure(settings, ConfigurationError)
    assert message.startswith("keyConnectorSettings__certificate__azureStorageContainer:")
    assert "not a valid container name" in message


def test_missing_blob_names_the_setting_and_lists_blobs(azurite: Azurite, stored: str) -> None:
    settings = settings_from(azurestorage_env(azurite, stored, "kc.pfx", PASSWORD))
    message = failure(settings, ConfigurationError)
    assert message.startswith("keyConnectorSettings__certificate__azureStorageFileName:")
    assert "'kc.pfx'" in message and BLOB in message and "other.txt" in message


def test_wrong_pfx_password_names_the_password_setting(azurite: Azurite, stored: str) -> None:
    settings = settings_from(azurestorage_env(azurite, stored, BLOB, "not-" + PASSWORD))
    message = failure(settings, ConfigurationError)
    assert message.startswith("keyConnectorSettings__certificate__azureStorageFilePassword:")
    assert "not-" not in message


def test_wrong_account_key_names_the_connection_string(azurite: Azurite, stored: str) -> None:
    env = azurestorage_env(azurite, stored, BLOB, PASSWORD)
    env["keyConnectorSettings__certificate__azureStorageConnectionString"] = azurite.connection_string(
        WRONG_KEY
    )
    message = failure(settings_from(env), ConfigurationError)
    assert message.startswith("keyConnectorSettings__certificate__azureStorageConnectionString:")
    assert "account key or SAS" in message and "wrong or expired" in message


def test_expired_sas_names_the_connection_string(azurite: Azurite, stored: str) -> None:
    sas = generate_container_sas(
        ACCOUNT,
        stored,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True),
        expiry=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
    )
    env = azurestorage_env(azurite, stored, BLOB, PASSWORD)
    env["keyConnectorSettings__certificate__azureStorageConnectionString"] = (
        f"BlobEndpoint={azurite.endpoint};SharedAccessSignature={sas}"
    )
    message = failure(settings_from(env), ConfigurationError)
    assert message.startswith("keyConnectorSettings__certificate__azureStorageConnectionString:")
    assert "wrong or expired" in message


def test_unreachable_endpoint_is_unavailable_and_names_the_connection_string() -> None:
    port = free_port()  # nothing listens there
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    env = {
        "keyConnectorSettings__certificate__provider": "azurestorage",
        "keyConnectorSettings__certificate__azureStorageConnectionString": (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint={endpoint}"
        ),
        "keyConnectorSettings__certificate__azureStorageContainer": "certs",
        "keyConnectorSettings__certificate__azureStorageFileName": BLOB,
        "keyConnectorSettings__certificate__azureStorageFilePassword": PASSWORD,
    }
    with pytest.raises(UnavailableError) as caught:
        load(settings_from(env))
    error = caught.value
    assert "keyConnectorSettings__certificate__azureStorageConnectionString" in error.component
    assert error.problem == f"cannot connect to 127.0.0.1:{port}: connection refused"
    printed = "".join(traceback.format_exception(error))
    assert ACCOUNT_KEY not in printed and ACCOUNT_KEY[:20] not in printed


@pytest.mark.parametrize(
    ("connection_string", "expected"),
    [
        (f"AccountName={ACCOUNT};{ACCOUNT_KEY}", "part 2 is none of the names it can have"),
        (f"AccountName={ACCOUNT};AccountKey{ACCOUNT_KEY[:-2]}", "part 2 is not Name=value"),
        (f"AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY[:-3]}!!", "AccountKey is not valid base64"),
        (
            f"BlobEndpoint=ftp://127.0.0.1/{ACCOUNT};AccountKey={ACCOUNT_KEY}",
            "not an http:// or https:// URL",
        ),
        (f"BlobEndpoint=http://127.0.0.1:1/x;AccountKey={ACCOUNT_KEY}", "AccountKey but no AccountName"),
        (f"DefaultEndpointsProtocol=https;AccountKey={ACCOUNT_KEY}", "names no storage account"),
        ("   ", "is not set"),
    ],
)
def test_malformed_connection_strings_are_named_without_echo(connection_string: str, expected: str) -> None:
    env = {
        "keyConnectorSettings__certificate__provider": "azurestorage",
        "keyConnectorSettings__certificate__azureStorageConnectionString": connection_string,
        "keyConnectorSettings__certificate__azureStorageContainer": "certs",
        "keyConnectorSettings__certificate__azureStorageFileName": BLOB,
    }
    message = failure(settings_from(env), ConfigurationError)
    assert message.startswith("keyConnectorSettings__certificate__azureStorageConnectionString:")
    assert expected in message
    assert ACCOUNT_KEY[:-3] not in message


@pytest.mark.parametrize(
    "missing", ["azureStorageConnectionString", "azureStorageContainer", "azureStorageFileName"]
)
def test_unset_settings_are_named(azurite: Azurite, stored: str, missing: str) -> None:
    env = azurestorage_env(azurite, stored, BLOB, PASSWORD)
    del env[f"keyConnectorSettings__certificate__{missing}"]
    message = failure(settings_from(env), ConfigurationError)
    assert message.startswith(f"keyConnectorSettings__certificate__{missing}: is not set")
