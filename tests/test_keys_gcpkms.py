"""The ``gcpkms`` key provider, through the official client, against the gRPC KMS stand-in.

Everything crosses real gRPC over TLS and real OAuth2: the provider finds a service-account key
file through GOOGLE_APPLICATION_CREDENTIALS, google-auth trades a signed assertion for a token at
the stand-in's token endpoint, and the stand-in refuses any call without that token.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from google.api_core import exceptions as api_exceptions
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import KeyManagementServiceGrpcTransport

from keyconnector.devtools import free_port
from keyconnector.errors import ConfigurationError, IntegrityFailure, UnavailableError
from keyconnector.keypairs import gcpkms, open_key_provider
from keyconnector.keypairs.base import OAEP_SHA256
from keyconnector.runtime.settings import Settings, load_settings, side_of
from tests.support.gcp_kms import KeyVersion, KmsStandIn, ServiceAccount, crc32c, oaep
from tests.support.providers import ProviderEnv

PREFIX = "keyConnectorSettings__rsaKey__"
T = TypeVar("T")


@dataclass
class Gcp:
    stand_in: KmsStandIn
    account: ServiceAccount
    version: KeyVersion
    env: dict[str, str]
    monkeypatch: pytest.MonkeyPatch
    tmp_path: Path

    def settings(self, **changes: str | None) -> Settings:
        """Settings from the environment as the service reads them; ``None`` removes a variable."""
        env = dict(self.env)
        for name, value in changes.items():
            key = name if name.isupper() or name.startswith("keyConnectorSettings__") else PREFIX + name
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        for name in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
            if name in env:
                self.monkeypatch.setenv(name, env[name])
            else:
                self.monkeypatch.delenv(name, raising=False)
        return load_settings(env).settings

    def with_key(self, version: KeyVersion) -> Gcp:
        _project, _location, keyring, key, number = version.ids
        self.env.update(
            {
                PREFIX + "googleCloudKeyringId": keyring,
                PREFIX + "googleCloudKeyId": key,
                PREFIX + "googleCloudKeyVersionId": number,
            }
        )
        self.version = version
        return self


@pytest.fixture
def gcp(gcp_kms_stand_in: KmsStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Gcp:
    account = gcp_kms_stand_in.new_service_account()
    version = gcp_kms_stand_in.create_key()
    key_file = account.key_file(tmp_path / "service-account.json", gcp_kms_stand_in.token_uri)
    env = gcp_kms_stand_in.env(version, key_file)
    # No gcloud configuration of whoever runs the tests may leak in.
    env["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud")
    env["keyConnectorSettings__caCertificatesDirectory"] = str(tmp_path / "no-company-cas")
    return Gcp(gcp_kms_stand_in, account, version, env, monkeypatch, tmp_path)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def round_trip(settings: Settings, data_key: bytes) -> bytes:
    provider = await gcpkms.open(side_of(settings))
    try:
        return await provider.unwrap(await provider.wrap(data_key))
    finally:
        await provider.aclose()


def open_error(settings: Settings) -> Exception:
    with pytest.raises((ConfigurationError, UnavailableError, IntegrityFailure)) as caught:
        run(round_trip(settings, secrets.token_bytes(32)))
    return caught.value


# --------------------------------------------------------------------------------------------------
# Working paths


def test_round_trip_check_and_authenticated_calls(gcp: Gcp) -> None:
    data_key = secrets.token_bytes(32)

    async def main() -> tuple[bytes, str]:
        provider = await open_key_provider(side_of(gcp.settings()))
        try:
            wrapped = await provider.wrap(data_key)
            await provider.check()
            return await provider.unwrap(wrapped), provider.description
        finally:
            await provider.aclose()

    unwrapped, description = run(main())
    assert unwrapped == data_key
    assert gcp.version.name in description and "RSA_DECRYPT_OAEP_2048_SHA256" in description
    assert gcp.account.access_token not in description
    calls = gcp.stand_in.calls_to(gcp.version.name)
    assert [call.method for call in calls] == ["GetPublicKey", "AsymmetricDecrypt", "AsymmetricDecrypt"]
    assert {call.caller for call in calls} == {gcp.account.email}, "every call carried the issued token"
    assert gcp.account.email in gcp.stand_in.grants, "the token came from the JWT-bearer grant"


def test_unwraps_a_key_wrapped_as_upstream_does(gcp: Gcp) -> None:
    """Upstream wraps locally with the version's public key, RSA-OAEP-SHA-256; and so do we."""
    assert gcp.version.private_key is not None
    data_key = secrets.token_bytes(32)
    upstream_wrapped = gcp.version.private_key.public_key().encrypt(data_key, OAEP_SHA256)

    async def main() -> tuple[bytes, bytes]:
        provider = await gcpkms.open(side_of(gcp.settings()))
        try:
            return await provider.unwrap(upstream_wrapped), await provider.wrap(data_key)
        finally:
            await provider.aclose()

    unwrapped, ours = run(main())
    assert unwrapped == data_key
    assert gcp.version.private_key.decrypt(ours, OAEP_SHA256) == data_key


@pytest.mark.parametrize(
    ("algorithm", "hash_name"),
    [("RSA_DECRYPT_OAEP_2048_SHA1", "SHA1"), ("RSA_DECRYPT_OAEP_4096_SHA512", "SHA512")],
)
def test_the_key_algorithm_chooses_the_oaep_hash(gcp: Gcp, algorithm: str, hash_name: str) -> None:
    # KMS decrypts with the hash its algorithm names: wrapping must use the same one.
    version = gcp.stand_in.create_key(algorithm)
    gcp.with_key(version)
    data_key = secrets.token_bytes(32)

    async def main() -> tuple[bytes, bytes]:
        provider = await gcpkms.open(side_of(gcp.settings()))
        try:
            wrapped = await provider.wrap(data_key)
            return wrapped, await provider.unwrap(wrapped)
        finally:
            await provider.aclose()

    wrapped, unwrapped = run(main())
    assert unwrapped == data_key
    assert version.private_key is not None
    assert version.private_key.decrypt(wrapped, oaep(hash_name)) == data_key


def test_concurrent_unwraps(gcp: Gcp) -> None:
    keys = [secrets.token_bytes(32) for _ in range(24)]

    async def main() -> list[bytes]:
        provider = await gcpkms.open(side_of(gcp.settings()))
        try:
            wrapped = [await provider.wrap(key) for key in keys]
            return list(await asyncio.gather(*(provider.unwrap(item) for item in wrapped)))
        finally:
            await provider.aclose()

    assert run(main()) == keys
    decrypts = [
        call for call in gcp.stand_in.calls_to(gcp.version.name) if call.method == "AsymmetricDecrypt"
    ]
    assert len(decrypts) == len(keys)


def test_open_and_close_repeatedly_in_one_process(gcp: Gcp) -> None:
    assert gcp.version.private_key is not None
    data_key = secrets.token_bytes(32)
    wrapped = gcp.version.private_key.public_key().encrypt(data_key, OAEP_SHA256)
    settings = gcp.settings()

    async def once() -> bytes:
        provider = await gcpkms.open(side_of(settings))
        try:
            return await provider.unwrap(wrapped)
        finally:
            await provider.aclose()
            await provider.aclose()  # closing twice is harmless

    for _ in range(5):  # each in a fresh event loop, as successive workers or CLI commands would
        assert run(once()) == data_key


def test_a_closed_provider_refuses_work(gcp: Gcp) -> None:
    async def main() -> None:
        provider = await gcpkms.open(side_of(gcp.settings()))
        wrapped = await provider.wrap(secrets.token_bytes(32))
        await provider.aclose()
        await provider.unwrap(wrapped)

    with pytest.raises(UnavailableError):
        run(main())


def test_transfer_settings_are_used_and_named(gcp: Gcp) -> None:
    moved = {name.replace("__rsaKey__", "__transferTo__rsaKey__"): value for name, value in gcp.env.items()}
    moved[PREFIX + "provider"] = "certificate"
    moved.pop("keyConnectorSettings__transferTo__rsaKey__googleCloudKeyId")
    gcp.monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", gcp.env["GOOGLE_APPLICATION_CREDENTIALS"])
    settings = load_settings(moved).settings
    with pytest.raises(ConfigurationError) as caught:
        run(gcpkms.open(side_of(settings, transfer=True)))
    assert caught.value.setting == "transferTo.rsaKey.googleCloudKeyId"
    assert "keyConnectorSettings__transferTo__rsaKey__googleCloudKeyId" in str(caught.value)

    moved["keyConnectorSettings__transferTo__rsaKey__googleCloudKeyId"] = gcp.version.ids[3]
    data_key = secrets.token_bytes(32)

    async def main() -> bytes:
        provider = await open_key_provider(side_of(load_settings(moved).settings, transfer=True))
        try:
            return await provider.unwrap(await provider.wrap(data_key))
        finally:
            await provider.aclose()

    assert run(main()) == data_key


# --------------------------------------------------------------------------------------------------
# Trust


def test_company_ca_directory_is_trusted(gcp: Gcp) -> None:
    cas = gcp.tmp_path / "company-cas"
    cas.mkdir()
    (cas / "kms-ca.crt").write_bytes(gcp.stand_in.ca_path.read_bytes())
    settings = gcp.settings(googleCloudCaBundle=None, keyConnectorSettings__caCertificatesDirectory=str(cas))
    data_key = secrets.token_bytes(32)
    assert run(round_trip(settings, data_key)) == data_key


def test_an_untrusted_certificate_names_the_ca_bundle_setting(gcp: Gcp) -> None:
    error = open_error(gcp.settings(googleCloudCaBundle=None))
    assert isinstance(error, ConfigurationError), error
    assert error.setting == "rsaKey.googleCloudCaBundle"


def test_a_missing_ca_bundle_file_is_named(gcp: Gcp) -> None:
    error = open_error(gcp.settings(googleCloudCaBundle=str(gcp.tmp_path / "absent.pem")))
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.googleCloudCaBundle"


# --------------------------------------------------------------------------------------------------
# Configuration errors


@pytest.mark.parametrize(
    "setting",
    [
        "googleCloudProjectId",
        "googleCloudLocationId",
        "googleCloudKeyringId",
        "googleCloudKeyId",
        "googleCloudKeyVersionId",
    ],
)
def test_a_missing_setting_is_named(gcp: Gcp, setting: str) -> None:
    error = open_error(gcp.settings(**{setting: None}))
    assert isinstance(error, ConfigurationError)
    assert error.setting == f"rsaKey.{setting}"
    assert "is not set" in str(error)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("googleCloudKeyId", "projects/p/locations/l/keyRings/r/cryptoKeys/k"),
        ("googleCloudKeyVersionId", "latest"),
        ("googleCloudEndpoint", "https://cloudkms.googleapis.com"),
    ],
)
def test_a_malformed_setting_is_named(gcp: Gcp, setting: str, value: str) -> None:
    error = open_error(gcp.settings(**{setting: value}))
    assert isinstance(error, ConfigurationError)
    assert error.setting == f"rsaKey.{setting}"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("googleCloudKeyVersionId", "7"),
        ("googleCloudKeyId", "no-such-key"),
        ("googleCloudKeyringId", "no-such-ring"),
    ],
)
def test_an_unknown_key_names_its_setting(gcp: Gcp, setting: str, value: str) -> None:
    error = open_error(gcp.settings(**{setting: value}))
    assert isinstance(error, ConfigurationError), error
    assert error.setting == f"rsaKey.{setting}"
    assert "projects/kc-test-project/locations/europe-west1/keyRings/" in str(error)


def test_a_signing_key_is_refused(gcp: Gcp) -> None:
    gcp.with_key(gcp.stand_in.create_key("RSA_SIGN_PSS_2048_SHA256"))
    error = open_error(gcp.settings())
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.googleCloudKeyId"
    assert "RSA_SIGN_PSS_2048_SHA256" in str(error) and "ASYMMETRIC_DECRYPT" in str(error)


def test_a_symmetric_key_is_refused(gcp: Gcp) -> None:
    gcp.with_key(gcp.stand_in.create_key("GOOGLE_SYMMETRIC_ENCRYPTION"))
    error = open_error(gcp.settings())
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.googleCloudKeyVersionId"
    assert "GOOGLE_SYMMETRIC_ENCRYPTION" in str(error)


def test_a_disabled_key_version_is_refused(gcp: Gcp) -> None:
    gcp.version.state = "DISABLED"
    error = open_error(gcp.settings())
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.googleCloudKeyVersionId"
    assert "DISABLED" in str(error)


# --------------------------------------------------------------------------------------------------
# Credentials


def test_no_application_default_credentials(gcp: Gcp) -> None:
    error = open_error(gcp.settings(GOOGLE_APPLICATION_CREDENTIALS=None))
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.provider"
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(error)


def test_a_missing_credentials_file_is_named(gcp: Gcp) -> None:
    absent = str(gcp.tmp_path / "absent.json")
    error = open_error(gcp.settings(GOOGLE_APPLICATION_CREDENTIALS=absent))
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.provider" and absent in str(error)


def test_a_key_file_with_the_wrong_private_key_is_refused_without_showing_it(gcp: Gcp) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = gcp.account.key_file(gcp.tmp_path / "forged.json", gcp.stand_in.token_uri, other)
    error = open_error(gcp.settings(GOOGLE_APPLICATION_CREDENTIALS=str(key_file)))
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.provider"
    assert "Invalid JWT Signature" in str(error) and gcp.account.email in str(error)
    assert error.__cause__ is None and error.__suppress_context__
    key_text = key_file.read_text()
    for line in key_text.split("\\n")[1:-2]:
        assert line not in str(error)


def test_permission_denied_at_open_names_the_credentials(gcp: Gcp) -> None:
    gcp.stand_in.denied.add(gcp.account.email)
    error = open_error(gcp.settings())
    assert isinstance(error, ConfigurationError)
    assert error.setting == "rsaKey.provider"
    assert "roles/cloudkms.cryptoKeyDecrypter" in str(error) and gcp.version.key_name in str(error)


def test_permission_revoked_later_is_an_outage_that_heals(gcp: Gcp) -> None:
    async def main() -> None:
        provider = await gcpkms.open(side_of(gcp.settings()))
        try:
            data_key = secrets.token_bytes(32)
            wrapped = await provider.wrap(data_key)
            gcp.stand_in.denied.add(gcp.account.email)
            with pytest.raises(UnavailableError) as caught:
                await provider.unwrap(wrapped)
            assert "keyConnectorSettings__rsaKey__googleCloudEndpoint" in str(caught.value)
            assert "PERMISSION_DENIED" in str(caught.value) or "Permission" in str(caught.value)
            gcp.stand_in.denied.discard(gcp.account.email)
            assert await provider.unwrap(wrapped) == data_key
        finally:
            gcp.stand_in.denied.discard(gcp.account.email)
            await provider.aclose()

    run(main())


def test_the_stand_in_refuses_calls_without_an_issued_token(gcp: Gcp) -> None:
    """What makes the authenticated-calls assertions mean something."""
    roots = gcp.stand_in.ca_path.read_bytes()
    for token in (None, "ya29.never-issued"):
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        channel = grpc.secure_channel(gcp.stand_in.endpoint, credentials)
        transport = KeyManagementServiceGrpcTransport(channel=channel)
        client = kms_v1.KeyManagementServiceClient(transport=transport)
        try:
            with pytest.raises(api_exceptions.Unauthenticated):
                client.get_public_key(name=gcp.version.name, timeout=5, retry=None)
        finally:
            transport.close()  # type: ignore[no-untyped-call]
    assert gcp.stand_in.calls_to(gcp.version.name) == []


# --------------------------------------------------------------------------------------------------
# Integrity and transit corruption


def test_a_corrupted_wrapped_key_is_an_integrity_error(gcp: Gcp) -> None:
    other = gcp.stand_in.create_key()
    assert other.private_key is not None
    foreign = other.private_key.public_key().encrypt(secrets.token_bytes(32), OAEP_SHA256)

    async def main() -> list[Exception]:
        provider = await gcpkms.open(side_of(gcp.settings()))
        errors: list[Exception] = []
        try:
            wrapped = bytearray(await provider.wrap(secrets.token_bytes(32)))
            wrapped[10] ^= 0x40
            for bad in (bytes(wrapped), foreign, b"short"):
                try:
                    await provider.unwrap(bad)
                except Exception as exc:
                    errors.append(exc)
        finally:
            await provider.aclose()
        return errors

    errors = run(main())
    assert len(errors) == 3
    assert all(isinstance(error, IntegrityFailure) for error in errors), errors
    assert gcp.version.name in str(errors[0])


@pytest.mark.parametrize("fault", ["plaintext_crc32c", "unverified"])
def test_a_decrypt_response_corrupted_in_transit_is_refused(gcp: Gcp, fault: str) -> None:
    async def main() -> None:
        provider = await gcpkms.open(side_of(gcp.settings()))
        try:
            wrapped = await provider.wrap(secrets.token_bytes(32))
            gcp.version.fault = fault
            await provider.unwrap(wrapped)
        finally:
            await provider.aclose()

    with pytest.raises(UnavailableError, match="corrupted in transit"):
        run(main())


def test_a_public_key_corrupted_in_transit_is_refused(gcp: Gcp) -> None:
    gcp.version.fault = "pem_crc32c"
    error = open_error(gcp.settings())
    assert isinstance(error, UnavailableError)
    assert "corrupted in transit" in str(error)


def test_crc32c_matches_the_standard_and_the_stand_in() -> None:
    assert gcpkms.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert gcpkms.crc32c(b"") == 0
    for size in (1, 31, 256, 513):
        data = secrets.token_bytes(size)
        assert gcpkms.crc32c(data) == crc32c(data)


# --------------------------------------------------------------------------------------------------
# Outages


@pytest.fixture
def private_stand_in(tmp_path: Path) -> Iterator[KmsStandIn]:
    """A stand-in of its own, for tests that stop it."""
    with KmsStandIn(tmp_path) as stand_in:
        yield stand_in


def test_stand_in_stopped_then_back(gcp: Gcp, private_stand_in: KmsStandIn) -> None:
    account = private_stand_in.new_service_account()
    version = private_stand_in.create_key()
    key_file = account.key_file(gcp.tmp_path / "private.json", private_stand_in.token_uri)
    gcp.env = {**private_stand_in.env(version, key_file), "CLOUDSDK_CONFIG": gcp.env["CLOUDSDK_CONFIG"]}
    settings = gcp.settings()
    data_key = secrets.token_bytes(32)

    async def main() -> None:
        provider = await gcpkms.open(side_of(settings))
        try:
            wrapped = await provider.wrap(data_key)
            assert await provider.unwrap(wrapped) == data_key
            private_stand_in.stop()
            for attempt in (provider.unwrap(wrapped), provider.check()):
                with pytest.raises(UnavailableError) as caught:
                    await attempt
                assert "keyConnectorSettings__rsaKey__googleCloudEndpoint" in str(caught.value)
                assert private_stand_in.endpoint in str(caught.value)
            with pytest.raises(UnavailableError):
                await gcpkms.open(side_of(settings))

            private_stand_in.start()
            deadline = time.monotonic() + 20  # gRPC reconnects within its (5 s) backoff
            while True:
                try:
                    assert await provider.unwrap(wrapped) == data_key
                    break
                except UnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.25)
        finally:
            await provider.aclose()

    run(main())


def test_unreachable_endpoint_at_start_is_unavailable_not_fatal(gcp: Gcp) -> None:
    settings = gcp.settings(googleCloudEndpoint=f"127.0.0.1:{free_port()}")
    error = open_error(settings)
    assert isinstance(error, UnavailableError)
    assert "keyConnectorSettings__rsaKey__googleCloudEndpoint" in str(error)

    async def tolerant() -> str:
        provider = await open_key_provider(side_of(settings), tolerate_outage=True)
        try:
            return provider.description
        finally:
            await provider.aclose()

    assert "not connected yet" in run(tolerant())


# --------------------------------------------------------------------------------------------------
# Secrets


def test_debug_logging_never_shows_the_data_key_or_the_token(
    gcp: Gcp, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's own debug logging prints responses and metadata: it must stay off."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    google = logging.getLogger("google")
    google.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    data_key = secrets.token_bytes(32)
    try:
        assert run(round_trip(gcp.settings(), data_key)) == data_key
    finally:
        google.removeHandler(handler)
    logged = " ".join(str(record.__dict__) for record in records + caplog.records)
    for secret in (base64.b64encode(data_key).decode(), data_key.hex(), gcp.account.access_token):
        assert secret not in logged


def test_the_fixture_for_the_service_tests(
    gcpkms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gcpkms_provider.endpoint is not None
    host, port = gcpkms_provider.endpoint
    assert gcpkms_provider.env[PREFIX + "googleCloudEndpoint"] == f"{host}:{port}"
    assert gcpkms_provider.env[PREFIX + "provider"] == "gcpkms"
    assert len(gcpkms_provider.secrets) == 2
    monkeypatch.setenv(
        "GOOGLE_APPLICATION_CREDENTIALS", gcpkms_provider.env["GOOGLE_APPLICATION_CREDENTIALS"]
    )
    data_key = secrets.token_bytes(32)
    assert run(round_trip(load_settings(gcpkms_provider.env).settings, data_key)) == data_key
