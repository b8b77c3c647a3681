"""HashiCorp Vault, against real OpenBao dev servers (HTTP and HTTPS): the ``vault`` certificate source
(a PFX in KV version 2, as upstream reads it) and the ``vaulttransit`` key provider (ours).

Every failure must name the setting to fix and never show a token, a secret ID or the PFX password,
not even in the chained exceptions a traceback prints; an unreachable or sealed Vault is an outage
(``UnavailableError``), not a configuration error.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import secrets
import shutil
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from keyconnector.certificates import LoadedCertificate, load_certificate
from keyconnector.errors import ConfigurationError, IntegrityFailure, KeyConnectorError, UnavailableError
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs import vaulttransit as vaulttransit_module
from keyconnector.keypairs.generate import self_signed_pfx
from keyconnector.keypairs.vaulttransit import VaultTransitKeyProvider
from keyconnector.runtime.settings import Settings, load_settings, side_of
from tests.support.openbao import KV_MOUNT, OpenBao
from tests.support.providers import ProviderEnv

T = TypeVar("T")
PASSWORD = "pfx-" + secrets.token_urlsafe(12)
DECOY = "decoy-value-" + secrets.token_hex(8)
CERT = "keyConnectorSettings__certificate__"
RSA = "keyConnectorSettings__rsaKey__"
# What upstream's certificate provider does, spelled out here rather than imported from the product.
UPSTREAM_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


@pytest.fixture(scope="module")
def pfx_bytes() -> bytes:
    return self_signed_pfx(PASSWORD, bits=2048)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def settings_from(env: Mapping[str, str], **extra: str) -> Settings:
    merged = dict(env)
    merged.update({f"keyConnectorSettings__{k.replace('.', '__')}": v for k, v in extra.items()})
    return load_settings(environ=merged).settings


def assert_no_leak(exc: BaseException, values: tuple[str, ...]) -> str:
    printed = "".join(traceback.format_exception(exc)) + repr(exc)
    for value in values:
        assert value and value not in printed, "a secret leaked into an error"
    return str(exc)


# -- the vault certificate source ----------------------------------------------------------------------


def cert_env(server: OpenBao, path: str, token: str, **extra: str) -> dict[str, str]:
    env = {
        "keyConnectorSettings__rsaKey__provider": "certificate",
        f"{CERT}provider": "vault",
        f"{CERT}vaultServerUri": server.url,
        f"{CERT}vaultToken": token,
        f"{CERT}vaultSecretPath": path,
        f"{CERT}vaultSecretDataKey": "pfx",
        f"{CERT}vaultSecretFilePassword": PASSWORD,
    }
    env.update({f"{CERT}{k}": v for k, v in extra.items()})
    return env


def load(settings: Settings, prefix: str = "certificate") -> LoadedCertificate:
    return asyncio.run(load_certificate(side_of(settings, transfer=prefix.startswith("transferTo"))))


def load_failure(
    settings: Settings, expected: type[KeyConnectorError], leaks: tuple[str, ...], prefix: str = "certificate"
) -> Any:
    with pytest.raises(expected) as caught:
        load(settings, prefix)
    assert_no_leak(caught.value, leaks)
    return caught.value


@pytest.fixture
def stored(openbao: OpenBao, pfx_bytes: bytes) -> tuple[str, str]:
    """A fresh secret holding the PFX (and a decoy key) on the HTTP server, and a token that reads only it."""
    path = openbao.put_secret({"pfx": b64(pfx_bytes), "note": DECOY})
    return path, openbao.kv_reader(path)


def assert_same_key_pair(loaded: LoadedCertificate, pfx_bytes: bytes) -> None:
    expected = pkcs12.load_pkcs12(pfx_bytes, PASSWORD.encode()).key
    assert isinstance(expected, rsa.RSAPrivateKey)
    assert loaded.private_key is not None
    assert loaded.private_key.private_numbers() == expected.private_numbers()


def test_certificate_provider_on_vault_unwraps_a_data_key_wrapped_as_upstream_did(
    openbao: OpenBao, stored: tuple[str, str], pfx_bytes: bytes
) -> None:
    path, token = stored
    settings = settings_from(cert_env(openbao, path, token))  # no mount point: upstream's default, secret
    public = pkcs12.load_pkcs12(pfx_bytes, PASSWORD.encode()).key.public_key()  # type: ignore[union-attr]
    data_key = secrets.token_bytes(32)
    wrapped = public.encrypt(data_key, UPSTREAM_OAEP)

    async def scenario() -> tuple[bytes, str]:
        provider = await open_key_provider(side_of(settings))
        try:
            await provider.check()
            return await provider.unwrap(wrapped), provider.description
        finally:
            await provider.aclose()

    unwrapped, description = asyncio.run(scenario())
    assert unwrapped == data_key
    assert f"secret/{path}" in description and openbao.url in description
    assert token not in description and PASSWORD not in description


def test_custom_mount_point_and_base64_with_line_breaks(openbao: OpenBao, pfx_bytes: bytes) -> None:
    wrapped_lines = base64.encodebytes(pfx_bytes).decode()  # 76-column lines, as `base64` without -w0
    path = openbao.put_secret({"pfx": wrapped_lines}, mount=KV_MOUNT)
    token = openbao.kv_reader(path, mount=KV_MOUNT)
    loaded = load(settings_from(cert_env(openbao, path, token, vaultSecretMountPoint=KV_MOUNT)))
    assert_same_key_pair(loaded, pfx_bytes)
    assert f"{KV_MOUNT}/{path}" in loaded.description


def test_over_tls_with_vault_ca_bundle(openbao_tls: OpenBao, pfx_bytes: bytes) -> None:
    path = openbao_tls.put_secret({"pfx": b64(pfx_bytes)})
    token = openbao_tls.kv_reader(path)
    env = cert_env(openbao_tls, path, token, vaultCaBundle=str(openbao_tls.ca_file))
    assert_same_key_pair(load(settings_from(env)), pfx_bytes)


def test_over_tls_with_the_ca_in_the_ca_certificates_directory(
    openbao_tls: OpenBao, pfx_bytes: bytes, tmp_path: Path
) -> None:
    assert openbao_tls.ca_file is not None
    folder = tmp_path / "ca-certificates"
    folder.mkdir()
    shutil.copy(openbao_tls.ca_file, folder / "company-vault.crt")
    path = openbao_tls.put_secret({"pfx": b64(pfx_bytes)})
    token = openbao_tls.kv_reader(path)
    settings = settings_from(cert_env(openbao_tls, path, token), caCertificatesDirectory=str(folder))
    assert_same_key_pair(load(settings), pfx_bytes)


def test_an_untrusted_tls_server_names_the_ca_bundle_setting(openbao_tls: OpenBao, pfx_bytes: bytes) -> None:
    path = openbao_tls.put_secret({"pfx": b64(pfx_bytes)})
    token = openbao_tls.kv_reader(path)
    error = load_failure(settings_from(cert_env(openbao_tls, path, token)), ConfigurationError, (token,))
    assert error.setting == "certificate.vaultCaBundle"
    assert "not trusted" in error.problem and "keyConnectorSettings__certificate__vaultCaBundle" in str(error)


def test_scheme_mismatches_name_the_server_uri(openbao: OpenBao, openbao_tls: OpenBao) -> None:
    plain_to_tls = settings_from(
        cert_env(openbao_tls, "x", "t", vaultServerUri=openbao_tls.url.replace("https", "http"))
    )
    error = load_failure(plain_to_tls, ConfigurationError, ())
    assert error.setting == "certificate.vaultServerUri" and "HTTPS" in error.problem
    tls_to_plain = settings_from(
        cert_env(openbao, "x", "t", vaultServerUri=openbao.url.replace("http", "https"))
    )
    error = load_failure(tls_to_plain, ConfigurationError, ())
    assert error.setting == "certificate.vaultServerUri" and "does not speak TLS" in error.problem


@pytest.mark.parametrize("missing", ["vaultServerUri", "vaultToken", "vaultSecretPath", "vaultSecretDataKey"])
def test_missing_settings_are_named(openbao: OpenBao, stored: tuple[str, str], missing: str) -> None:
    path, token = stored
    env = cert_env(openbao, path, token)
    del env[CERT + missing]
    error = load_failure(settings_from(env), ConfigurationError, (token, PASSWORD))
    assert error.setting == f"certificate.{missing}" and "is not set" in error.problem


def test_a_server_uri_that_is_not_a_url(openbao: OpenBao, stored: tuple[str, str]) -> None:
    path, token = stored
    env = cert_env(openbao, path, token, vaultServerUri="vault.example.com:8200")
    assert (
        load_failure(settings_from(env), ConfigurationError, (token,)).setting == "certificate.vaultServerUri"
    )


def test_an_invalid_token(openbao: OpenBao, stored: tuple[str, str]) -> None:
    path, _ = stored
    bad = "s." + secrets.token_urlsafe(18)
    error = load_failure(settings_from(cert_env(openbao, path, bad)), ConfigurationError, (bad, PASSWORD))
    assert error.setting == "certificate.vaultToken"
    assert "invalid, expired or revoked" in error.problem


def test_a_token_whose_policy_does_not_reach_the_secret(openbao: OpenBao, stored: tuple[str, str]) -> None:
    path, _ = stored
    other = openbao.kv_reader(openbao.put_secret({"pfx": "x"}))
    error = load_failure(settings_from(cert_env(openbao, path, other)), ConfigurationError, (other, PASSWORD))
    assert error.setting == "certificate.vaultToken"
    assert "do not grant 'read'" in error.problem and f"secret/data/{path}" in error.problem


def test_transfer_settings_are_named_with_their_prefix(openbao: OpenBao, stored: tuple[str, str]) -> None:
    path, _ = stored
    bad = "s." + secrets.token_urlsafe(18)
    env = {
        k.replace(CERT, "keyConnectorSettings__transferTo__certificate__"): v
        for k, v in cert_env(openbao, path, bad).items()
    }
    error = load_failure(settings_from(env), ConfigurationError, (bad,), prefix="transferTo.certificate")
    assert error.setting == "transferTo.certificate.vaultToken"
    assert "keyConnectorSettings__transferTo__certificate__vaultToken" in str(error)


def test_an_unknown_secret_path(openbao: OpenBao) -> None:
    root = openbao.root_token
    error = load_failure(
        settings_from(cert_env(openbao, "keyconnector/nothing-here", root)), ConfigurationError, (root,)
    )
    assert error.setting == "certificate.vaultSecretPath" and "keyconnector/nothing-here" in error.problem


def test_a_deleted_latest_version(openbao: OpenBao, stored: tuple[str, str]) -> None:
    path, token = stored
    openbao.client().secrets.kv.v2.delete_latest_version_of_secret(path)
    error = load_failure(settings_from(cert_env(openbao, path, token)), ConfigurationError, (token,))
    assert error.setting == "certificate.vaultSecretPath" and "deleted" in error.problem


def test_an_unknown_mount_point(openbao: OpenBao, stored: tuple[str, str]) -> None:
    path, _ = stored
    root = openbao.root_token
    env = cert_env(openbao, path, root, vaultSecretMountPoint="no-such-mount")
    error = load_failure(settings_from(env), ConfigurationError, (root,))
    assert error.setting == "certificate.vaultSecretMountPoint" and "no-such-mount" in error.problem


def test_a_missing_data_key_lists_the_keys_present_but_not_their_values(
    openbao: OpenBao, stored: tuple[str, str]
) -> None:
    path, token = stored
    env = cert_env(openbao, path, token, vaultSecretDataKey="certificate")
    error = load_failure(settings_from(env), ConfigurationError, (token, PASSWORD, DECOY))
    assert error.setting == "certificate.vaultSecretDataKey"
    assert "'note'" in error.problem and "'pfx'" in error.problem and "'certificate'" in error.problem


def test_a_value_that_is_not_base64(openbao: OpenBao) -> None:
    path = openbao.put_secret({"pfx": "-----BEGIN CERTIFICATE----- not base64!"})
    token = openbao.kv_reader(path)
    error = load_failure(settings_from(cert_env(openbao, path, token)), ConfigurationError, (token,))
    assert error.setting == "certificate.vaultSecretDataKey" and "base64" in error.problem


@pytest.mark.parametrize(
    "password", ["wrong-password-that-is-not-the-pfx-one", None], ids=["wrong", "missing"]
)
def test_a_wrong_or_missing_pfx_password(
    openbao: OpenBao, stored: tuple[str, str], password: str | None
) -> None:
    path, token = stored
    env = cert_env(openbao, path, token)
    if password is None:
        del env[CERT + "vaultSecretFilePassword"]
    else:
        env[CERT + "vaultSecretFilePassword"] = password
    error = load_failure(
        settings_from(env), ConfigurationError, tuple(v for v in (token, PASSWORD, password) if v)
    )
    assert error.setting == "certificate.vaultSecretFilePassword"


# -- the vaulttransit key provider ---------------------------------------------------------------------


def transit_env(server: OpenBao, key: str, **extra: str) -> dict[str, str]:
    env = {
        f"{RSA}provider": "vaulttransit",
        f"{RSA}vaultTransitServerUri": server.url,
        f"{RSA}vaultTransitKeyName": key,
    }
    env.update({f"{RSA}{k}": v for k, v in extra.items()})
    return env


def approle_env(server: OpenBao, key: str, **role_options: str) -> tuple[dict[str, str], Any]:
    role = server.approle(server.transit_policy(key), **role_options)
    return transit_env(
        server, key, vaultTransitRoleId=role.role_id, vaultTransitSecretId=role.secret_id
    ), role


def with_provider(settings: Settings, use: Callable[[VaultTransitKeyProvider], Awaitable[T]]) -> T:
    """Open, use and close a provider inside one event loop (as the service does)."""

    async def scenario() -> T:
        provider = await vaulttransit_module.open(side_of(settings))
        try:
            return await use(provider)
        finally:
            await provider.aclose()

    return asyncio.run(scenario())


def open_failure(settings: Settings, expected: type[KeyConnectorError], leaks: tuple[str, ...]) -> Any:
    with pytest.raises(expected) as caught:
        with_provider(settings, lambda provider: provider.check())
    assert_no_leak(caught.value, leaks)
    return caught.value


def test_transit_round_trip_with_a_token(openbao: OpenBao) -> None:
    key = openbao.new_transit_key("rsa-2048")
    token = openbao.token(openbao.transit_policy(key))
    data_key = secrets.token_bytes(32)

    async def use(provider: VaultTransitKeyProvider) -> tuple[bytes, bytes, str, Any]:
        await provider.check()
        wrapped = await provider.wrap(data_key)
        return wrapped, await provider.unwrap(wrapped), provider.description, provider.public_key

    wrapped, unwrapped, description, public = with_provider(
        settings_from(transit_env(openbao, key, vaultTransitToken=token)), use
    )
    assert unwrapped == data_key
    assert wrapped.startswith(b"vault:v1:")
    # The stored form is Vault's own ciphertext: Vault itself decrypts it.
    plain = openbao.client().secrets.transit.decrypt_data(key, wrapped.decode())["data"]["plaintext"]
    assert base64.b64decode(plain) == data_key
    assert key in description and "rsa-2048" in description and token not in description
    exported = openbao.client().secrets.transit.read_key(key)["data"]["keys"]["1"]["public_key"]
    assert (
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        == exported
    )


def test_transit_round_trip_with_approle_survives_token_expiry(openbao: OpenBao) -> None:
    key = openbao.new_transit_key("rsa-3072")
    env, _ = approle_env(openbao, key, token_ttl="2s", token_max_ttl="2s")
    data_key = secrets.token_bytes(32)

    async def use(provider: VaultTransitKeyProvider) -> bytes:
        wrapped = await provider.wrap(data_key)
        await asyncio.sleep(2.5)  # the AppRole token is now expired
        return await provider.unwrap(wrapped)

    assert with_provider(settings_from(env), use) == data_key


def test_approle_logs_in_again_when_its_token_is_revoked(openbao: OpenBao) -> None:
    key = openbao.new_transit_key()
    env, role = approle_env(openbao, key)
    data_key = secrets.token_bytes(32)

    async def use(provider: VaultTransitKeyProvider) -> bytes:
        wrapped = await provider.wrap(data_key)
        assert await asyncio.to_thread(openbao.revoke_role_tokens, role) >= 1
        results = await asyncio.gather(*(provider.unwrap(wrapped) for _ in range(4)))
        assert set(results) == {data_key}
        return await provider.unwrap(wrapped)

    assert with_provider(settings_from(env), use) == data_key


def test_a_revoked_token_is_an_outage_naming_the_token_setting(openbao: OpenBao) -> None:
    key = openbao.new_transit_key()
    token = openbao.token(openbao.transit_policy(key))

    async def use(provider: VaultTransitKeyProvider) -> UnavailableError:
        wrapped = await provider.wrap(secrets.token_bytes(32))
        await asyncio.to_thread(openbao.client().auth.token.revoke, token)
        with pytest.raises(UnavailableError) as caught:
            await provider.unwrap(wrapped)
        return caught.value

    error = with_provider(settings_from(transit_env(openbao, key, vaultTransitToken=token)), use)
    assert_no_leak(error, (token,))
    assert "keyConnectorSettings__rsaKey__vaultTransitToken" in str(error)


@pytest.mark.parametrize("key_type", ["aes256-gcm96", "chacha20-poly1305"])
def test_a_symmetric_transit_key_is_refused(openbao: OpenBao, key_type: str) -> None:
    key = openbao.new_transit_key(key_type)
    token = openbao.token(openbao.transit_policy(key))
    error = open_failure(
        settings_from(transit_env(openbao, key, vaultTransitToken=token)), ConfigurationError, (token,)
    )
    assert error.setting == "rsaKey.vaultTransitKeyName"
    assert key_type in error.problem and "RSA" in error.problem and "public key" in error.problem


def test_ciphertexts_of_other_keys_are_integrity_errors(openbao: OpenBao) -> None:
    key, other_rsa, other_aes = (
        openbao.new_transit_key(),
        openbao.new_transit_key("rsa-4096"),
        openbao.new_transit_key("aes256-gcm96"),
    )
    root = openbao.client()
    plaintext = b64(secrets.token_bytes(32))
    foreign = [
        root.secrets.transit.encrypt_data(other_rsa, plaintext)["data"]["ciphertext"].encode(),
        root.secrets.transit.encrypt_data(other_aes, plaintext)["data"]["ciphertext"].encode(),
        root.secrets.transit.encrypt_data(key, plaintext)["data"]["ciphertext"]
        .replace("vault:v1:", "vault:v7:")
        .encode(),
        secrets.token_bytes(256),  # what the certificate provider stores: not a transit ciphertext at all
    ]
    token = openbao.token(openbao.transit_policy(key))

    async def use(provider: VaultTransitKeyProvider) -> list[BaseException]:
        outcomes = await asyncio.gather(*(provider.unwrap(w) for w in foreign), return_exceptions=True)
        return [o for o in outcomes if isinstance(o, BaseException)]

    errors = with_provider(settings_from(transit_env(openbao, key, vaultTransitToken=token)), use)
    assert len(errors) == len(foreign) and all(isinstance(e, IntegrityFailure) for e in errors), errors


def test_concurrent_unwraps_are_correct(openbao: OpenBao, vaulttransit_provider: ProviderEnv) -> None:
    data_keys = [secrets.token_bytes(32) for _ in range(24)]

    async def use(provider: VaultTransitKeyProvider) -> list[bytes]:
        wrapped = await asyncio.gather(*(provider.wrap(k) for k in data_keys))
        return list(await asyncio.gather(*(provider.unwrap(w) for w in wrapped)))

    assert with_provider(settings_from(vaulttransit_provider.env), use) == data_keys


def test_transit_over_tls(openbao_tls: OpenBao) -> None:
    key = openbao_tls.new_transit_key()
    env, role = approle_env(openbao_tls, key)
    error = open_failure(settings_from(env), ConfigurationError, (role.secret_id,))
    assert error.setting == "rsaKey.vaultTransitCaBundle" and "not trusted" in error.problem
    settings = settings_from(env, **{"rsaKey.vaultTransitCaBundle": str(openbao_tls.ca_file)})
    with_provider(settings, lambda provider: provider.check())


def test_a_namespace_is_passed_through(openbao: OpenBao) -> None:
    namespace = f"team-{uuid.uuid4().hex[:8]}"
    openbao.client().sys.create_namespace(namespace)
    inside = openbao.client(namespace=namespace)
    inside.sys.enable_secrets_engine("transit", path="transit")
    key = openbao.new_transit_key(client=inside)
    root = openbao.root_token
    env = transit_env(openbao, key, vaultTransitToken=root, vaultTransitNamespace=namespace)
    description = with_provider(settings_from(env), _checked_description)
    assert namespace in description
    # Without the namespace, the key is looked for (and not found) in the root namespace.
    del env[f"{RSA}vaultTransitNamespace"]
    assert (
        open_failure(settings_from(env), ConfigurationError, (root,)).setting == "rsaKey.vaultTransitKeyName"
    )


async def _checked_description(provider: VaultTransitKeyProvider) -> str:
    await provider.check()
    return provider.description


def _transit_config_cases(server: OpenBao) -> list[tuple[str, dict[str, str], str]]:
    key = server.new_transit_key()
    policy = server.transit_policy(key)
    role = server.approle(policy)
    token = server.token(policy)
    unreadable = server.token(server.transit_policy(key, read_key=False))
    approle = {"vaultTransitRoleId": role.role_id, "vaultTransitSecretId": role.secret_id}
    bad_secret = "bad-" + secrets.token_hex(8)
    cases = [
        (
            "no server uri",
            {**transit_env(server, key, vaultTransitToken=token), f"{RSA}vaultTransitServerUri": ""},
            "vaultTransitServerUri",
        ),
        ("no key name", transit_env(server, "", vaultTransitToken=token), "vaultTransitKeyName"),
        ("no credentials", transit_env(server, key), "vaultTransitToken"),
        (
            "role without secret",
            transit_env(server, key, vaultTransitRoleId=role.role_id),
            "vaultTransitSecretId",
        ),
        (
            "secret without role",
            transit_env(server, key, vaultTransitSecretId=role.secret_id),
            "vaultTransitRoleId",
        ),
        (
            "token and approle",
            transit_env(server, key, vaultTransitToken=token, **approle),
            "vaultTransitToken",
        ),
        (
            "invalid token",
            transit_env(server, key, vaultTransitToken="s." + secrets.token_urlsafe(18)),
            "vaultTransitToken",
        ),
        (
            "wrong secret id",
            transit_env(server, key, vaultTransitRoleId=role.role_id, vaultTransitSecretId=bad_secret),
            "vaultTransitSecretId",
        ),
        (
            "wrong approle mount",
            transit_env(server, key, vaultTransitAppRoleMountPoint="elsewhere", **approle),
            "vaultTransitAppRoleMountPoint",
        ),
        (
            "unknown key",
            transit_env(server, "no-such-key", vaultTransitToken=server.root_token),
            "vaultTransitKeyName",
        ),
        (
            "unknown mount",
            transit_env(server, key, vaultTransitToken=server.root_token, vaultTransitMountPoint="nowhere"),
            "vaultTransitMountPoint",
        ),
        ("policy without read", transit_env(server, key, vaultTransitToken=unreadable), "vaultTransitToken"),
    ]
    return cases


def test_transit_configuration_errors_name_their_setting(openbao: OpenBao) -> None:
    for label, env, setting in _transit_config_cases(openbao):
        leaks = tuple(v for k, v in env.items() if k.endswith(("Token", "SecretId")) and v)
        error = open_failure(settings_from(env), ConfigurationError, leaks)
        assert error.setting == f"rsaKey.{setting}", (label, str(error))


def test_transit_errors_under_transfer_to_carry_the_prefix(openbao: OpenBao) -> None:
    env = {
        k.replace(RSA, "keyConnectorSettings__transferTo__rsaKey__"): v
        for k, v in transit_env(openbao, "k").items()
    }

    async def scenario() -> None:
        await vaulttransit_module.open(side_of(settings_from(env), transfer=True))

    with pytest.raises(ConfigurationError) as caught:
        asyncio.run(scenario())
    assert caught.value.setting == "transferTo.rsaKey.vaultTransitToken"


# -- outages, on a server of this test's own ------------------------------------------------------------


def test_a_sealed_or_stopped_vault_is_unavailable(pfx_bytes: bytes) -> None:
    server = OpenBao()
    try:
        server.start().prepare()
        path = server.put_secret({"pfx": b64(pfx_bytes)})
        reader = server.kv_reader(path)
        cert_settings = settings_from(cert_env(server, path, reader))
        key = server.new_transit_key()
        env, role = approle_env(server, key)
        settings = settings_from(env)
        leaks = (reader, role.secret_id, PASSWORD)

        async def scenario() -> list[BaseException]:
            provider = await vaulttransit_module.open(side_of(settings))
            errors: list[BaseException] = []

            async def all_unavailable(*attempts: Awaitable[object]) -> None:
                for attempt in attempts:
                    with pytest.raises(UnavailableError) as caught:
                        await attempt
                    errors.append(caught.value)

            def load() -> Awaitable[object]:
                return load_certificate(
                    dataclasses.replace(side_of(cert_settings), ca_certificates_directory="/nonexistent")
                )

            try:
                wrapped = await provider.wrap(secrets.token_bytes(32))
                await provider.check()
                await asyncio.to_thread(server.client().sys.seal)
                await all_unavailable(provider.check(), provider.unwrap(wrapped), load())
                await asyncio.to_thread(server.stop)
                await all_unavailable(
                    provider.check(),
                    provider.unwrap(wrapped),
                    vaulttransit_module.open(side_of(settings)),
                    load(),
                )
            finally:
                await provider.aclose()
            return errors

        errors = asyncio.run(scenario())
    finally:
        server.destroy()
    sealed, stopped = errors[:3], errors[3:]
    for error in errors:
        assert_no_leak(error, leaks)
    assert all("sealed" in str(e) for e in sealed), sealed
    assert all("connection refused" in str(e) for e in stopped), stopped
    assert all(
        "keyConnectorSettings__rsaKey__vaultTransitServerUri" in str(e) for e in errors[:2] + errors[3:6]
    )
    assert all("keyConnectorSettings__certificate__vaultServerUri" in str(e) for e in (errors[2], errors[6]))


# -- the fixtures that the service-level tests use ------------------------------------------------------


def test_the_provider_fixtures_open_and_round_trip(
    vault_certificate_provider: ProviderEnv, vaulttransit_provider: ProviderEnv
) -> None:
    async def description_after_check(settings: Settings) -> str:
        provider = await open_key_provider(side_of(settings))
        try:
            await provider.check()
            return provider.description
        finally:
            await provider.aclose()

    for provided in (vault_certificate_provider, vaulttransit_provider):
        assert provided.endpoint is not None
        assert f"http://127.0.0.1:{provided.endpoint[1]}" in provided.env.values()
        description = asyncio.run(description_after_check(settings_from(provided.env)))
        assert not any(value in description for value in provided.secrets)


def test_an_approle_token_is_revoked_on_close(openbao: OpenBao) -> None:
    key = openbao.new_transit_key()
    env, role = approle_env(openbao, key)
    with_provider(settings_from(env), lambda provider: provider.check())
    assert openbao.revoke_role_tokens(role) == 0
