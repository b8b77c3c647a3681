"""The ``azurekv`` key provider and certificate source, through the official Azure SDK, against the stand-in.

The stand-in (tests/support/azure_keyvault.py) is an HTTPS server on 127.0.0.1 behind a private CA,
speaking Entra ID's token endpoints, App Service's managed identity protocol and Key Vault's REST
API; the SDK is unmodified. Most tests use the session's stand-in with a fresh key and app
registration; the few that need a vault of their own (the challenge seen from the start, an outage)
start one. The SDK caches a vault's challenge per host and port for the whole process, so only a
fresh stand-in proves that the challenge happened.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyconnector.certificates import load_certificate
from keyconnector.devtools import free_port
from keyconnector.errors import ConfigurationError, IntegrityFailure, KeyConnectorError, UnavailableError
from keyconnector.keypairs import azurekv
from keyconnector.keypairs import certificate as certificate_provider
from keyconnector.keypairs.base import OAEP_SHA1, OAEP_SHA256
from keyconnector.runtime.settings import Settings, load_settings, side_of
from tests.support.azure_keyvault import ALL_PERMISSIONS, KeyVaultStandIn, b64url, unb64url
from tests.support.providers import ProviderEnv, assert_certificate_unwraps, run_and_close

KEY = "keyConnectorSettings__rsaKey__"
CERT = "keyConnectorSettings__certificate__"


@pytest.fixture(autouse=True)
def no_azure_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the developer's machine (an Azure CLI login, a managed identity) may take part."""
    for name in list(os.environ):
        if name.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")):
            monkeypatch.delenv(name)


@pytest.fixture
def private_vault(tmp_path: Path) -> Iterator[KeyVaultStandIn]:
    """A vault of the test's own. Its port may have served an earlier test's vault, whose challenge the
    SDK still caches for this process: forget it, so that this vault is met as a new one."""
    from azure.keyvault.certificates._shared import http_challenge_cache as certificates_cache
    from azure.keyvault.keys._shared import http_challenge_cache as keys_cache
    from azure.keyvault.secrets._shared import http_challenge_cache as secrets_cache

    standin = KeyVaultStandIn(tmp_path / "vault").start()
    for cache in (keys_cache, certificates_cache, secrets_cache):
        cache.remove_challenge_for_url(standin.url)
    yield standin
    standin.stop()


def settings_of(env: dict[str, str], *, transfer: bool = False, **extra: str) -> Settings:
    values = {k: v for k, v in env.items() if k.startswith("keyConnectorSettings__")}
    values.update(extra)
    if transfer:
        values = {
            k.replace("keyConnectorSettings__", "keyConnectorSettings__transferTo__")
            if k.startswith((KEY, CERT))
            else k: v
            for k, v in values.items()
        }
    return load_settings(environ=values).settings


def open_key(
    env: dict[str, str], *, transfer: bool = False, **extra: str
) -> azurekv.AzureKeyVaultKeyProvider:
    return asyncio.run(azurekv.open(side_of(settings_of(env, transfer=transfer, **extra), transfer=transfer)))


def open_error(env: dict[str, str], *, transfer: bool = False, **extra: str) -> KeyConnectorError:
    with pytest.raises(KeyConnectorError) as caught:
        open_key(env, transfer=transfer, **extra)
    return caught.value


def assert_no_secret(error: BaseException, *secret_values: str) -> None:
    """Neither the message nor anything chained to it shows a secret."""
    seen: BaseException | None = error
    while seen is not None:
        for value in secret_values:
            assert value not in str(seen), f"a secret leaked into {type(seen).__name__}"
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)


def round_trip(provider: azurekv.AzureKeyVaultKeyProvider) -> bytes:
    data_key = secrets.token_bytes(32)

    async def scenario() -> bytes:
        try:
            wrapped = await provider.wrap(data_key)
            assert await provider.unwrap(wrapped) == data_key
            await provider.check()
            return wrapped
        finally:
            await provider.aclose()

    return asyncio.run(scenario())


def unwrap(provider: azurekv.AzureKeyVaultKeyProvider, wrapped: bytes) -> bytes:
    return run_and_close(provider, lambda: provider.unwrap(wrapped))


def vault_encrypt(
    standin: KeyVaultStandIn, env: dict[str, str], name: str, plaintext: bytes, algorithm: str = "RSA-OAEP"
) -> bytes:
    """Key Vault's own ``encrypt``, called as upstream calls it (RSA-OAEP), outside the provider."""
    import httpx
    from azure.identity import ClientSecretCredential

    credential = ClientSecretCredential(
        standin.tenant_id,
        env[KEY + "azureKeyvaultAdAppId"],
        env[KEY + "azureKeyvaultAdSecret"],
        authority=standin.url,
        disable_instance_discovery=True,
        connection_verify=str(standin.ca_bundle),
    )
    token = credential.get_token(f"https://0.0.1:{standin.port}/.default").token
    version = standin.key(name).version
    response = httpx.post(
        f"{standin.url}/keys/{name}/{version}/encrypt?api-version=7.6",
        json={"alg": algorithm, "value": b64url(plaintext)},
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl.create_default_context(cafile=str(standin.ca_bundle)),
    )
    assert response.status_code == 200, response.text
    return unb64url(response.json()["value"])


def key_env(standin: KeyVaultStandIn, **permissions: Any) -> tuple[dict[str, str], str]:
    """Settings for a fresh key and app registration on ``standin``."""
    app = standin.add_app(**permissions)
    name = standin.add_rsa_key()
    assert app.secret is not None
    return {
        KEY + "provider": "azurekv",
        KEY + "azureKeyvaultUri": standin.url,
        KEY + "azureKeyvaultKeyName": name,
        KEY + "azureKeyvaultAdTenantId": standin.tenant_id,
        KEY + "azureKeyvaultAdAppId": app.client_id,
        KEY + "azureKeyvaultAdSecret": app.secret,
        KEY + "azureKeyvaultAuthorityHost": standin.url,
        KEY + "azureKeyvaultCaBundle": str(standin.ca_bundle),
    }, app.secret


# -- the key provider ----------------------------------------------------------------------------------


def test_round_trip_check_and_description(azurekv_key_provider: ProviderEnv) -> None:
    env = azurekv_key_provider.env
    provider = open_key(env)
    name = env[KEY + "azureKeyvaultKeyName"]
    assert name in provider.description and "127.0.0.1" in provider.description
    assert env[KEY + "azureKeyvaultAdSecret"] not in provider.description
    round_trip(provider)


def test_unwraps_a_data_key_wrapped_outside(
    azure_keyvault: KeyVaultStandIn, azurekv_key_provider: ProviderEnv
) -> None:
    env = azurekv_key_provider.env
    name = env[KEY + "azureKeyvaultKeyName"]
    data_key = secrets.token_bytes(32)
    by_public_key = azure_keyvault.public_key(name).encrypt(data_key, OAEP_SHA1)
    assert unwrap(open_key(env), by_public_key) == data_key
    by_key_vault = vault_encrypt(azure_keyvault, env, name, data_key)
    assert unwrap(open_key(env), by_key_vault) == data_key


@pytest.mark.parametrize(("algorithm", "padding"), [("RSA-OAEP", OAEP_SHA1), ("RSA-OAEP-256", OAEP_SHA256)])
def test_the_stand_in_encrypts_as_key_vault_does(
    azure_keyvault: KeyVaultStandIn, azurekv_key_provider: ProviderEnv, algorithm: str, padding: Any
) -> None:
    env = azurekv_key_provider.env
    name = env[KEY + "azureKeyvaultKeyName"]
    data_key = secrets.token_bytes(32)
    ciphertext = vault_encrypt(azure_keyvault, env, name, data_key, algorithm)
    assert azure_keyvault.key(name).private_key.decrypt(ciphertext, padding) == data_key  # type: ignore[union-attr]


def test_concurrent_unwraps(azurekv_key_provider: ProviderEnv) -> None:
    provider = open_key(azurekv_key_provider.env)
    data_keys = [secrets.token_bytes(32) for _ in range(8)]

    async def scenario() -> list[bytes]:
        try:
            wrapped = await asyncio.gather(*(provider.wrap(k) for k in data_keys))
            return list(await asyncio.gather(*(provider.unwrap(w) for w in wrapped), provider.check()))[:-1]
        finally:
            await provider.aclose()

    assert asyncio.run(scenario()) == data_keys


def test_what_the_provider_wraps_is_rsa_oaep_sha1_under_the_vault_key(
    azure_keyvault: KeyVaultStandIn, azurekv_key_provider: ProviderEnv
) -> None:
    """So that upstream (Key Vault decrypt with RSA-OAEP) reads what we write."""
    env = azurekv_key_provider.env
    wrapped = round_trip(open_key(env))
    private = azure_keyvault.key(env[KEY + "azureKeyvaultKeyName"]).private_key
    assert private.decrypt(wrapped, OAEP_SHA1)  # type: ignore[union-attr]


def test_the_challenge_flow_happens(private_vault: KeyVaultStandIn) -> None:
    env, _ = key_env(private_vault)
    round_trip(open_key(env))
    vault_calls = [s for s in private_vault.seen if s.path.startswith("/keys/")]
    first, second = vault_calls[0], vault_calls[1]
    assert (first.authorized, first.status) == (False, 401)
    assert (second.path, second.authorized, second.status) == (first.path, True, 200)
    token_requests = [s for s in private_vault.seen if s.path.endswith("/oauth2/v2.0/token")]
    assert token_requests and all(s.status == 200 for s in token_requests)
    assert all(s.authorized for s in vault_calls[1:]), "every vault call after the challenge carries a token"


def test_managed_identity_system_and_user_assigned(
    azure_keyvault: KeyVaultStandIn, azurekv_key_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", azure_keyvault.url + "/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", azure_keyvault.identity_header)
    env = {
        k: v
        for k, v in azurekv_key_provider.env.items()
        if not k.endswith(("AdSecret", "AdAppId", "AdTenantId"))
    }
    azure_keyvault.add_managed_identity()
    round_trip(open_key(env))

    user_assigned = azure_keyvault.add_managed_identity(client_id=secrets.token_hex(8))
    round_trip(open_key(env, **{KEY + "azureKeyvaultAdAppId": user_assigned.client_id}))
    minted = [s for s in azure_keyvault.seen if s.path == "/msi/token"]
    assert len(minted) >= 2 and all(s.status == 200 for s in minted)

    error = open_error(env, **{KEY + "azureKeyvaultAdAppId": "not-assigned-here"})
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.azureKeyvaultAdAppId"
    assert_no_secret(error, azure_keyvault.identity_header)


def test_rotated_key_still_unwraps_what_an_older_version_wrapped(
    azure_keyvault: KeyVaultStandIn, azurekv_key_provider: ProviderEnv
) -> None:
    env = azurekv_key_provider.env
    name = env[KEY + "azureKeyvaultKeyName"]
    old_version = azure_keyvault.key(name).version
    data_key = secrets.token_bytes(32)
    wrapped = azure_keyvault.public_key(name).encrypt(data_key, OAEP_SHA1)
    azure_keyvault.add_rsa_key(name)  # Key Vault's rotation: a new version becomes the current one
    provider = open_key(env)
    assert azure_keyvault.key(name).version in provider.description
    assert unwrap(provider, wrapped) == data_key
    decrypts = [
        s for s in azure_keyvault.seen if s.path.startswith(f"/keys/{name}/") and s.path.endswith("/decrypt")
    ]
    assert [s.status for s in decrypts] == [400, 200], "the current version refuses, the old one decrypts"
    assert decrypts[-1].path == f"/keys/{name}/{old_version}/decrypt"


def test_a_wrapped_key_the_vault_refuses_is_an_integrity_error(azurekv_key_provider: ProviderEnv) -> None:
    other = azurekv_key_provider.env
    with pytest.raises(IntegrityFailure, match="another key"):
        unwrap(open_key(other), secrets.token_bytes(256))


# -- configuration errors -----------------------------------------------------------------------------


def test_wrong_client_secret_names_the_secret_setting(azurekv_key_provider: ProviderEnv) -> None:
    wrong = "wrong~" + secrets.token_urlsafe(20)
    error = open_error(azurekv_key_provider.env, **{KEY + "azureKeyvaultAdSecret": wrong})
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.azureKeyvaultAdSecret"
    assert "keyConnectorSettings__rsaKey__azureKeyvaultAdSecret" in str(error)
    assert "AADSTS7000215" in str(error)
    assert_no_secret(error, wrong, *azurekv_key_provider.secrets)


def test_unknown_app_and_other_tenant_name_their_settings(azurekv_key_provider: ProviderEnv) -> None:
    env = azurekv_key_provider.env
    error = open_error(env, **{KEY + "azureKeyvaultAdAppId": "00000000-0000-0000-0000-000000000001"})
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.azureKeyvaultAdAppId"
    assert_no_secret(error, *azurekv_key_provider.secrets)

    other_tenant = "00000000-0000-0000-0000-000000000002"
    error = open_error(env, **{KEY + "azureKeyvaultAdTenantId": other_tenant})
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.azureKeyvaultAdTenantId"
    assert other_tenant in str(error)
    assert_no_secret(error, *azurekv_key_provider.secrets)


def test_unknown_key_non_rsa_key_and_key_without_decrypt(
    azure_keyvault: KeyVaultStandIn, azurekv_key_provider: ProviderEnv
) -> None:
    env = azurekv_key_provider.env
    setting = "rsaKey.azureKeyvaultKeyName"
    error = open_error(env, **{KEY + "azureKeyvaultKeyName": "no-such-key"})
    assert isinstance(error, ConfigurationError) and error.setting == setting
    assert "no-such-key" in str(error)

    error = open_error(env, **{KEY + "azureKeyvaultKeyName": azure_keyvault.add_ec_key()})
    assert isinstance(error, ConfigurationError) and error.setting == setting
    assert "RSA" in error.problem and "EC" in error.problem

    sign_only = azure_keyvault.add_rsa_key(key_ops=("sign", "verify"))
    error = open_error(env, **{KEY + "azureKeyvaultKeyName": sign_only})
    assert isinstance(error, ConfigurationError) and error.setting == setting
    assert "encrypt and decrypt" in error.problem

    small = azure_keyvault.add_rsa_key(bits=1024)
    error = open_error(env, **{KEY + "azureKeyvaultKeyName": small})
    assert isinstance(error, ConfigurationError) and "1024" in error.problem


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("azureKeyvaultUri", None, "is not set"),
        ("azureKeyvaultUri", "http://127.0.0.1:1/", "https://"),
        ("azureKeyvaultUri", "my-vault", "https://"),
        ("azureKeyvaultUri", "https://my-vault.vault.azure.net/keys/k", "path"),
        ("azureKeyvaultKeyName", None, "is not set"),
        ("azureKeyvaultKeyName", "not a name", "not a Key Vault key name"),
        ("azureKeyvaultAdTenantId", None, "is not set"),
        ("azureKeyvaultAdAppId", None, "is not set"),
        ("azureKeyvaultAuthorityHost", "http://login.example", "https://"),
        ("azureKeyvaultCaBundle", "/nonexistent/ca.pem", "does not exist"),
    ],
)
@pytest.mark.parametrize("transfer", [False, True])
def test_missing_or_wrong_settings_are_named(
    azurekv_key_provider: ProviderEnv, setting: str, value: str | None, problem: str, transfer: bool
) -> None:
    env = dict(azurekv_key_provider.env)
    if value is None:
        del env[KEY + setting]
    else:
        env[KEY + setting] = value
    error = open_error(env, transfer=transfer)
    assert isinstance(error, ConfigurationError)
    prefix = "transferTo.rsaKey" if transfer else "rsaKey"
    assert error.setting == f"{prefix}.{setting}"
    assert problem in error.problem
    assert_no_secret(error, *azurekv_key_provider.secrets)


def test_transfer_target_opens(azurekv_key_provider: ProviderEnv) -> None:
    round_trip(open_key(azurekv_key_provider.env, transfer=True))
    with pytest.raises(ConfigurationError, match="transferTo__rsaKey__provider"):
        asyncio.run(azurekv.open(side_of(load_settings(environ={}).settings, transfer=True)))


def test_missing_permissions_say_which(azure_keyvault: KeyVaultStandIn) -> None:
    env, secret = key_env(azure_keyvault, permissions=frozenset())
    error = open_error(env)
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.azureKeyvaultAdAppId"
    assert "'get' permission on keys" in error.problem and "Key Vault Crypto User" in error.problem
    assert_no_secret(error, secret)

    env, secret = key_env(azure_keyvault, permissions=frozenset({"keys/get"}))
    with pytest.raises(ConfigurationError, match="'decrypt' permission on keys") as caught:
        round_trip(open_key(env))
    assert_no_secret(caught.value, secret)


# -- trust ---------------------------------------------------------------------------------------------


def test_ca_from_the_ca_certificates_directory(
    azure_keyvault: KeyVaultStandIn, azurekv_key_provider: ProviderEnv, tmp_path: Path
) -> None:
    env = {k: v for k, v in azurekv_key_provider.env.items() if not k.endswith("CaBundle")}
    folder = tmp_path / "ca-certificates"
    folder.mkdir()
    (folder / "company.crt").write_bytes(azure_keyvault.ca_bundle.read_bytes())
    round_trip(open_key(env, **{"keyConnectorSettings__caCertificatesDirectory": str(folder)}))


def test_untrusted_vault_certificate_names_the_ca_bundle_setting(
    azurekv_key_provider: ProviderEnv, tmp_path: Path
) -> None:
    env = {k: v for k, v in azurekv_key_provider.env.items() if not k.endswith("CaBundle")}
    error = open_error(env, **{"keyConnectorSettings__caCertificatesDirectory": str(tmp_path)})
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.azureKeyvaultCaBundle"
    assert "not trusted" in error.problem
    assert_no_secret(error, *azurekv_key_provider.secrets)


# -- outages -------------------------------------------------------------------------------------------


def test_vault_stopped_is_unavailable_naming_the_vault_uri(private_vault: KeyVaultStandIn) -> None:
    env, secret = key_env(private_vault)
    provider = open_key(env)
    wrapped = asyncio.run(provider.wrap(secrets.token_bytes(32)))
    private_vault.stop()

    async def after_the_outage() -> None:
        for attempt in (provider.check(), provider.unwrap(wrapped)):
            with pytest.raises(UnavailableError) as caught:
                await attempt
            assert "keyConnectorSettings__rsaKey__azureKeyvaultUri" in caught.value.component
            assert "connection refused" in caught.value.problem
            assert_no_secret(caught.value, secret)
        await provider.aclose()

    asyncio.run(after_the_outage())


def test_opening_against_a_stopped_vault_is_unavailable(private_vault: KeyVaultStandIn) -> None:
    env, secret = key_env(private_vault)
    private_vault.stop()
    error = open_error(env)
    assert isinstance(error, UnavailableError)
    assert "keyConnectorSettings__rsaKey__azureKeyvaultUri" in error.component
    assert private_vault.url in error.problem
    assert_no_secret(error, secret)


def test_sign_in_endpoint_down_names_the_authority_host(private_vault: KeyVaultStandIn) -> None:
    env, secret = key_env(private_vault)
    error = open_error(env, **{KEY + "azureKeyvaultAuthorityHost": f"https://127.0.0.1:{free_port()}"})
    assert isinstance(error, UnavailableError)
    assert "keyConnectorSettings__rsaKey__azureKeyvaultAuthorityHost" in error.component
    assert "cannot sign in" in error.problem
    assert_no_secret(error, secret)


# -- the certificate source ----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/x-pkcs12", "application/x-pem-file"])
def test_certificate_source_yields_certificate_and_private_key(
    azure_keyvault: KeyVaultStandIn, azurekv_certificate_provider: ProviderEnv, content_type: str
) -> None:
    name, key, cert = azure_keyvault.add_certificate(content_type=content_type)
    settings = settings_of(azurekv_certificate_provider.env, **{CERT + "azureKeyvaultCertificateName": name})
    loaded = asyncio.run(load_certificate(side_of(settings)))
    assert loaded.certificate == cert
    assert loaded.private_key is not None
    assert loaded.private_key.private_numbers() == key.private_numbers()
    assert name in loaded.description
    assert all(value not in loaded.description for value in azurekv_certificate_provider.secrets)

    assert_certificate_unwraps(settings, cert)


def test_certificate_fixture_as_the_service_uses_it(azurekv_certificate_provider: ProviderEnv) -> None:
    settings = settings_of(azurekv_certificate_provider.env)
    assert settings.rsa_key.provider == "certificate"

    async def scenario() -> None:
        provider = await certificate_provider.open(side_of(settings))
        assert "Azure Key Vault certificate" in provider.description
        await provider.check()

    asyncio.run(scenario())


def test_certificate_source_errors_name_settings(
    azure_keyvault: KeyVaultStandIn, azurekv_certificate_provider: ProviderEnv
) -> None:
    env = azurekv_certificate_provider.env

    def error_of(transfer: bool = False, **extra: str) -> KeyConnectorError:
        settings = settings_of(env, transfer=transfer, **extra)
        with pytest.raises(KeyConnectorError) as caught:
            asyncio.run(load_certificate(side_of(settings, transfer=transfer)))
        assert_no_secret(caught.value, *azurekv_certificate_provider.secrets)
        return caught.value

    error = error_of(**{CERT + "azureKeyvaultCertificateName": "no-such-cert"})
    assert (
        isinstance(error, ConfigurationError) and error.setting == "certificate.azureKeyvaultCertificateName"
    )
    error = error_of(transfer=True, **{CERT + "azureKeyvaultCertificateName": "no-such-cert"})
    assert isinstance(error, ConfigurationError)
    assert error.setting == "transferTo.certificate.azureKeyvaultCertificateName"
    error = error_of(**{CERT + "azureKeyvaultAdSecret": "wrong"})
    assert isinstance(error, ConfigurationError) and error.setting == "certificate.azureKeyvaultAdSecret"

    no_secrets = azure_keyvault.add_app(permissions=ALL_PERMISSIONS - {"secrets/get"})
    assert no_secrets.secret is not None
    error = error_of(
        **{
            CERT + "azureKeyvaultAdAppId": no_secrets.client_id,
            CERT + "azureKeyvaultAdSecret": no_secrets.secret,
        }
    )
    assert isinstance(error, ConfigurationError) and "'get' permission on secrets" in error.problem

    env_without_name = {k: v for k, v in env.items() if not k.endswith("CertificateName")}
    settings = settings_of(env_without_name)
    with pytest.raises(ConfigurationError, match="azureKeyvaultCertificateName: is not set"):
        asyncio.run(load_certificate(side_of(settings)))
