"""The ``kmip`` key provider (ours) against a real KMIP server: PyKMIP's, over TLS with client certificates.

Both kinds of key a key manager offers: an RSA key pair (wrap with its public key here, unwrap with
the server's Decrypt in OAEP-SHA-256) and an AES key (server-side AES-GCM Encrypt and Decrypt). A
wrong setting is named; a server that cannot be reached is an outage that ends by itself; a wrap
made by another key is an integrity failure, never a wrong key handed out.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.errors import ConfigurationError, IntegrityFailure, KeyConnectorError, UnavailableError
from keyconnector.keypairs import KeyProvider, open_key_provider
from keyconnector.keypairs.kmip import KmipKeyProvider
from keyconnector.runtime.settings import load_settings, side_of
from tests.conftest import Pfx, base_env
from tests.support.kmip_manager import KmipServer
from tests.support.tcpproxy import TcpProxy

T = TypeVar("T")
RSA = "keyConnectorSettings__rsaKey__"
SIDE_SETTINGS = ("keyConnectorSettings__rsaKey__", "keyConnectorSettings__certificate__")


def opened(env: Mapping[str, str]) -> KmipKeyProvider:
    settings = load_settings(environ=dict(env)).settings

    async def main() -> KeyProvider:
        return await open_key_provider(side_of(settings))

    provider = asyncio.run(main())
    assert isinstance(provider, KmipKeyProvider)
    return provider


def using(provider: KeyProvider, operation: Callable[[KeyProvider], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await operation(provider)
        finally:
            await provider.aclose()

    return asyncio.run(main())


def open_error(env: Mapping[str, str]) -> KeyConnectorError:
    with pytest.raises(KeyConnectorError) as caught:
        using(opened(env), lambda p: p.check())
    return caught.value


def test_rsa_key_wraps_with_its_public_key_and_the_server_decrypts(kmip_server: KmipServer) -> None:
    key = kmip_server.new_rsa_key()
    provider = opened(kmip_server.settings(key))
    data_key = secrets.token_bytes(32)

    async def run(p: KeyProvider) -> tuple[bytes, bytes]:
        await p.check()
        wrapped = await p.wrap(data_key)
        return wrapped, await p.unwrap(wrapped)

    assert provider.public_key is not None
    public_key = provider.public_key
    wrapped, unwrapped = using(provider, run)
    assert unwrapped == data_key
    assert len(wrapped) == 256
    assert provider.fingerprint.startswith("rsa-oaep-sha256:")
    assert "RSA-2048" in provider.description and key.uid in provider.description
    # What any OAEP-SHA-256 implementation with the public key makes, the server decrypts.
    outside = public_key.encrypt(
        data_key, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    )
    assert using(opened(kmip_server.settings(key)), lambda p: p.unwrap(outside)) == data_key


def test_aes_key_wraps_and_unwraps_on_the_server(kmip_server: KmipServer) -> None:
    key = kmip_server.new_aes_key()
    env = kmip_server.settings(key)
    data_key = secrets.token_bytes(32)

    async def run(p: KeyProvider) -> tuple[bytes, bytes, bytes]:
        first, second = await p.wrap(data_key), await p.wrap(data_key)
        return first, second, await p.unwrap(first)

    provider = opened(env)
    first, second, unwrapped = using(provider, run)
    assert unwrapped == data_key
    assert first != second, "each wrap needs its own nonce"
    assert first.startswith(b"KMIP\x01") and data_key not in first
    assert provider.fingerprint == f"kmip:127.0.0.1:{kmip_server.port}/{key.uid}:aes-gcm"
    # A flipped bit in the tag or the ciphertext is refused, not decrypted into a wrong key.
    for position in (20, len(first) - 1):
        tampered = bytearray(first)
        tampered[position] ^= 1
        with pytest.raises(IntegrityFailure):
            using(opened(env), lambda p, t=bytes(tampered): p.unwrap(t))  # type: ignore[misc]


def test_key_found_by_name(kmip_server: KmipServer) -> None:
    rsa_key = kmip_server.new_rsa_key()
    env = kmip_server.settings(rsa_key)
    del env[f"{RSA}kmipKeyId"], env[f"{RSA}kmipPublicKeyId"]
    env[f"{RSA}kmipKeyName"] = rsa_key.name
    env[f"{RSA}kmipPublicKeyName"] = rsa_key.public_name or ""
    using(opened(env), lambda p: p.check())

    env[f"{RSA}kmipKeyName"] = "no-such-key-" + secrets.token_hex(4)
    error = open_error(env)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.kmipKeyName", error


def test_a_wrap_of_another_key_is_an_integrity_failure(kmip_server: KmipServer) -> None:
    one, other = kmip_server.new_rsa_key(), kmip_server.new_rsa_key()
    wrapped = using(opened(kmip_server.settings(one)), lambda p: p.wrap(secrets.token_bytes(32)))
    with pytest.raises(IntegrityFailure):
        using(opened(kmip_server.settings(other)), lambda p: p.unwrap(wrapped))
    aes_one, aes_other = kmip_server.new_aes_key(), kmip_server.new_aes_key()
    wrapped = using(opened(kmip_server.settings(aes_one)), lambda p: p.wrap(secrets.token_bytes(32)))
    with pytest.raises(IntegrityFailure):
        using(opened(kmip_server.settings(aes_other)), lambda p: p.unwrap(wrapped))
    with pytest.raises(IntegrityFailure):
        using(opened(kmip_server.settings(aes_other)), lambda p: p.unwrap(b"\x00" * 256))


@pytest.mark.parametrize(
    ("change", "setting", "words"),
    [
        ({"kmipServerHost": ""}, "rsaKey.kmipServerHost", "is not set"),
        ({"kmipServerPort": "70000"}, "rsaKey.kmipServerPort", "not a TCP port"),
        (
            {"kmipClientCertificate": "/nonexistent/client.crt"},
            "rsaKey.kmipClientCertificate",
            "does not exist",
        ),
        ({"kmipClientKey": ""}, "rsaKey.kmipClientKey", "is not set"),
        ({"kmipKeyId": ""}, "rsaKey.kmipKeyId", "is not set"),
        ({"kmipKeyName": "both"}, "rsaKey.kmipKeyName", "only one"),
        ({"kmipPassword": "pw-only"}, "rsaKey.kmipUsername", "needs both"),
        ({"kmipUsername": "user-only"}, "rsaKey.kmipPassword", "needs both"),
        ({"kmipKeyId": "999999"}, "rsaKey.kmipKeyId", "no such object"),
        ({"kmipCaBundle": "OTHER_CA"}, "rsaKey.kmipCaBundle", "not trusted"),
        ({"kmipPublicKeyId": ""}, "rsaKey.kmipPublicKeyId", "no link"),
    ],
)
def test_a_wrong_setting_is_named(
    kmip_server: KmipServer, change: dict[str, str], setting: str, words: str
) -> None:
    env = kmip_server.settings(kmip_server.new_rsa_key())
    for name, value in change.items():
        value = str(kmip_server.folder / "other-ca.crt") if value == "OTHER_CA" else value
        env[f"{RSA}{name}"] = value
    error = open_error(env)
    assert isinstance(error, ConfigurationError), error
    assert error.setting == setting, error
    assert words in str(error), error
    assert "keyConnectorSettings__rsaKey__" in str(error)


def test_a_client_certificate_from_another_ca_is_refused_by_name(kmip_server: KmipServer) -> None:
    env = kmip_server.settings(kmip_server.new_aes_key())
    env[f"{RSA}kmipClientCertificate"] = str(kmip_server.folder / "stranger.crt")
    env[f"{RSA}kmipClientKey"] = str(kmip_server.folder / "stranger.key")
    error = open_error(env)
    # TLS 1.3 tells the client about a refused certificate only at its first read: either way the
    # operator is pointed at the client certificate or sees the key manager as unreachable, never
    # a wrong key.
    assert isinstance(error, (ConfigurationError, UnavailableError)), error
    if isinstance(error, ConfigurationError):
        assert error.setting == "rsaKey.kmipClientCertificate", error


def test_not_a_key_it_can_use(kmip_server: KmipServer) -> None:
    key = kmip_server.new_rsa_key()
    env = kmip_server.settings(key)
    env[f"{RSA}kmipKeyId"] = key.public_uid or ""
    error = open_error(env)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.kmipKeyId", error
    assert "PUBLIC_KEY" in str(error)

    inactive = kmip_server.new_aes_key(activate=False)
    error = open_error(kmip_server.settings(inactive))
    assert isinstance(error, ConfigurationError) and "not ACTIVE" in str(error), error


def test_outage_is_unavailable_and_recovers_on_the_same_provider(kmip_server: KmipServer) -> None:
    for key in (kmip_server.new_rsa_key(), kmip_server.new_aes_key()):
        with TcpProxy(("127.0.0.1", kmip_server.port)) as proxy:
            proxy.up()
            provider = opened(kmip_server.settings(key, port=proxy.port))

            async def run(p: KeyProvider, proxy: TcpProxy = proxy) -> None:
                await p.check()
                proxy.down()
                with pytest.raises(UnavailableError) as caught:
                    await p.check()
                assert "keyConnectorSettings__rsaKey__kmipServerHost" in str(caught.value)
                proxy.up()
                await p.check()  # the same provider, a new connection

            using(provider, run)


def _command(arguments: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "keyconnector", *arguments]
    return subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=90)


def _rotate(env: dict[str, str], target: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`keyconnector rotate-key-pair` with ``target`` (rsaKey/certificate settings) as its transferTo side."""
    full = dict(env)
    for name, value in target.items():
        full[name.replace("keyConnectorSettings__", "keyConnectorSettings__transferTo__", 1)] = value
    return _command(["rotate-key-pair"], full)


@pytest.mark.timeout(300)  # nine commands and two services; CI machines are busy
def test_rotate_key_pair_to_kmip_and_back(
    kmip_server: KmipServer,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
    start_service: Any,
) -> None:
    """PFX -> KMIP AES key -> KMIP RSA key -> the PFX again, each step with `rotate-key-pair` and the old
    wraps retired; a service on the last settings serves the keys stored before the first step."""
    database = tmp_path / "kc.db"
    certificate_env = base_env(issuer, pfx, database)
    pfx_side = {k: v for k, v in certificate_env.items() if k.startswith(SIDE_SETTINGS)}
    kmip_aes = kmip_server.settings(kmip_server.new_aes_key())
    kmip_rsa = kmip_server.settings(kmip_server.new_rsa_key())
    keys = {uuid.uuid4(): base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(3)}

    first = start_service(certificate_env)
    with first.client() as client:
        for user, key in keys.items():
            bearer = {"Authorization": f"Bearer {issuer.mint(user)}"}
            assert client.post("/user-keys", json={"key": key}, headers=bearer).status_code == 200
    first.stop()

    logs = first.logs()
    current = certificate_env
    for target in (kmip_aes, kmip_rsa, pfx_side):
        moved = _rotate(current, target)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert "now also wrapped by" in moved.stdout, moved.stdout
        following = {k: v for k, v in current.items() if not k.startswith(SIDE_SETTINGS)} | target
        retired = _command(["rotate-key-pair", "--retire-old"], following)
        assert retired.returncode == 0, retired.stdout + retired.stderr
        assert "removed the wraps of" in retired.stdout, retired.stdout
        # The old side no longer opens the data key (`check` loads it as `serve` does at start-up): the
        # wraps really moved. The new side opens it in the next step's rotation and the last service.
        stale = _command(["check"], current)
        assert stale.returncode != 0, stale.stdout
        logs += moved.stdout + moved.stderr + retired.stdout + retired.stderr + stale.stdout + stale.stderr
        current = following
    last = start_service(current)
    with last.client() as client:
        for user, key in keys.items():
            bearer = {"Authorization": f"Bearer {issuer.mint(user)}"}
            assert client.get("/user-keys", headers=bearer).json() == {"key": key}
    logs += last.logs()
    assert (kmip_server.folder / "client.key").read_text().splitlines()[1] not in logs
    assert pfx.password not in logs


def test_the_server_certificate_must_name_the_host(kmip_server: KmipServer) -> None:
    """PyKMIP's own client checks the chain but not the name; this provider checks both. The same
    server, reached as 127.0.0.2 (not in its certificate), is refused."""
    key = kmip_server.new_aes_key()
    with TcpProxy(("127.0.0.1", kmip_server.port), host="127.0.0.2") as proxy:
        proxy.up()
        env = kmip_server.settings(key, port=proxy.port)
        env[f"{RSA}kmipServerHost"] = "127.0.0.2"
        error = open_error(env)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.kmipCaBundle", error
    assert "mismatch" in str(error), error


def test_password_from_a_file(kmip_server: KmipServer, tmp_path: Path) -> None:
    password = "kmip-" + secrets.token_urlsafe(12)
    (tmp_path / "kmip-password").write_text(password + "\n")
    env = kmip_server.settings(kmip_server.new_aes_key())
    env[f"{RSA}kmipUsername"] = "keyconnector"
    env[f"{RSA}kmipPasswordFile"] = str(tmp_path / "kmip-password")
    provider = opened(env)
    assert password not in provider.description
    using(provider, lambda p: p.check())
