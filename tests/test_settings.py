"""The settings loader: upstream's names, ASP.NET's rules, and errors that name the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings import load_settings, side_of


def test_upstream_names_case_insensitively_with_either_separator() -> None:
    loaded = load_settings(
        {
            "KEYCONNECTORSETTINGS__DATABASE__PROVIDER": "PostgreSQL",
            "keyconnectorsettings__database__postgresqlconnectionstring": "Host=db;Password=Zq9-unlikely",
            "keyConnectorSettings:rsaKey:awsUseSymmetricEncryption": "true",
            "keyConnectorSettings__webVaultUri": "https://vault.example.com/",
            "UNRELATED": "x",
        }
    )
    settings = loaded.settings
    assert settings.database.provider == "postgresql"
    assert settings.database.postgresql_connection_string is not None
    connection_string = settings.database.postgresql_connection_string.get_secret_value()
    assert connection_string == "Host=db;Password=Zq9-unlikely"
    assert settings.rsa_key.aws_use_symmetric_encryption is True
    assert settings.web_vault_uri == "https://vault.example.com/"
    assert loaded.unknown == []
    assert "Zq9-unlikely" not in repr(settings) and "Zq9-unlikely" not in str(settings)


def test_defaults_are_upstreams() -> None:
    settings = load_settings({}).settings
    assert settings.certificate.provider == "filesystem"
    assert settings.certificate.filesystem_path == "/etc/bitwarden/key.pfx"
    assert settings.database.json_file_path == "/etc/bitwarden/data.json"
    assert settings.rsa_key.provider == "certificate"


def test_unknown_names_are_reported_not_applied() -> None:
    loaded = load_settings(
        {"keyConnectorSettings__databse__provider": "postgresql", "keyConnectorSettings__nope": "1"}
    )
    assert sorted(loaded.unknown) == ["keyConnectorSettings__databse__provider", "keyConnectorSettings__nope"]
    assert loaded.settings.database.provider == "json"  # upstream's default, not the typo's value


def test_an_appsettings_file_with_the_environment_on_top(tmp_path: Path) -> None:
    path = tmp_path / "appsettings.json"
    path.write_text(
        "\ufeff"
        + json.dumps(
            {
                "KeyConnectorSettings": {
                    "WebVaultUri": "https://from-file",
                    "Database": {"Provider": "json", "JsonFilePath": "/data/kc.json"},
                }
            }
        ),
        encoding="utf-8",
    )
    settings = load_settings(
        {"keyConnectorSettings__webVaultUri": "https://from-env"}, config_file=path
    ).settings
    assert settings.web_vault_uri == "https://from-env"
    assert settings.database.provider == "json"
    assert settings.database.json_file_path == "/data/kc.json"


def test_secret_settings_accept_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "pin"
    secret.write_text("1234\n")
    settings = load_settings({"keyConnectorSettings__rsaKey__pkcs11LoginPinFile": str(secret)}).settings
    assert settings.rsa_key.pkcs11_login_pin is not None
    assert settings.rsa_key.pkcs11_login_pin.get_secret_value() == "1234"
    with pytest.raises(ConfigurationError, match="pkcs11LoginPinFile"):
        load_settings({"keyConnectorSettings__rsaKey__pkcs11LoginPinFile": str(tmp_path / "missing")})


def test_invalid_values_name_the_setting_and_never_echo_the_value() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings({"keyConnectorSettings__rsaKey__awsUseSymmetricEncryption": "hunter2"})
    assert "keyConnectorSettings__rsaKey__awsUseSymmetricEncryption" in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [("{", "not valid JSON"), ("[1]", "JSON object")],
)
def test_a_broken_settings_file_says_so(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "appsettings.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=reason):
        load_settings({}, config_file=path)


def test_a_side_resolves_its_sections_and_their_names_once() -> None:
    settings = load_settings(
        {
            "keyConnectorSettings__rsaKey__provider": "awskms",
            "keyConnectorSettings__keyRingAnchor": "0123456789abcdef0123",
            "keyConnectorSettings__compat__writeLegacyFormat": "true",
            "keyConnectorSettings__caCertificatesDirectory": "/srv/ca",
            "keyConnectorSettings__transferTo__database__provider": "postgresql",
        }
    ).settings
    own = side_of(settings)
    assert not own.transfer
    assert (own.database, own.rsa_key, own.certificate) == (
        settings.database,
        settings.rsa_key,
        settings.certificate,
    )
    assert (own.database_prefix, own.rsa_key_prefix, own.certificate_prefix) == (
        "database",
        "rsaKey",
        "certificate",
    )
    assert own.key_ring_anchor == "0123456789abcdef0123"

    target = side_of(settings, transfer=True)
    assert target.transfer
    assert target.require_database() is settings.transfer_to.database
    assert (target.database_prefix, target.rsa_key_prefix, target.certificate_prefix) == (
        "transferTo.database",
        "transferTo.rsaKey",
        "transferTo.certificate",
    )
    # Deployment-wide: shared by both sides, except the anchor, which pins the deployment's own ring.
    assert target.ca_certificates_directory == own.ca_certificates_directory == "/srv/ca"
    assert target.write_legacy_format and own.write_legacy_format
    assert target.key_ring_anchor is None
    # A section the transferTo side lacks is named as the operator would write it.
    with pytest.raises(ConfigurationError) as caught:
        target.require_rsa_key()
    assert caught.value.setting == "transferTo.rsaKey.provider"
    with pytest.raises(ConfigurationError, match="transferTo__certificate__provider: is not set"):
        target.require_certificate()
