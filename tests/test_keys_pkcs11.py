"""The ``pkcs11`` key provider against SoftHSM2 (Debian's softhsm2, loaded in this process).

The session's tokens and keys come from tests/support/softhsm.py: a primary token with the main key
pair (label ``kc``, id ``0a1b``) and a spare one, and a second token with another key pair under the
same label and id. Certificates are PFX files without the private key. Debian's OpenSC library is
loaded too, for the ``opensc`` default path; this machine has no smart card, so it shows no token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import secrets
import sqlite3
import subprocess
import sys
import sysconfig
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from pkcs11.util.rsa import decode_rsa_private_key

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.errors import (
    ConfigurationError,
    IntegrityFailure,
    KeyConnectorError,
    UnavailableError,
    setting_name,
)
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs import pkcs11 as provider_module
from keyconnector.keypairs.base import OAEP_SHA1
from keyconnector.runtime.settings import RsaKeySettings, load_settings, side_of
from tests.conftest import Pfx, base_env
from tests.support.providers import ProviderEnv
from tests.support.softhsm import PREFIX, SOFTHSM_LIBRARY, HsmKey, SoftHsmSession, certificate_pfx

OPENSC = f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}/opensc-pkcs11.so"


# -- helpers ----------------------------------------------------------------------------------------------


def changed(env: dict[str, str], **changes: str | None) -> dict[str, str]:
    """``env`` with some rsaKey settings changed (None removes one)."""
    out = dict(env)
    for name, value in changes.items():
        out.pop(PREFIX + name, None)
        if value is not None:
            out[PREFIX + name] = value
    return out


def as_transfer(env: dict[str, str]) -> dict[str, str]:
    return {
        k.replace("keyConnectorSettings__", "keyConnectorSettings__transferTo__"): v
        for k, v in env.items()
        if k.startswith("keyConnectorSettings__")
    }


@contextlib.asynccontextmanager
async def opened(
    env: dict[str, str], *, transfer: bool = False
) -> AsyncIterator[provider_module.Pkcs11KeyProvider]:
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("keyConnectorSettings")})
    provider = await provider_module.open(side_of(settings.settings, transfer=transfer))
    try:
        yield provider
    finally:
        await provider.aclose()


def open_error(env: dict[str, str], *, transfer: bool = False) -> KeyConnectorError:
    async def main() -> None:
        async with opened(env, transfer=transfer):
            pass

    with pytest.raises(KeyConnectorError) as caught:
        asyncio.run(main())
    return caught.value


def assert_no_secret(exc: BaseException, *values: str) -> None:
    """Neither the message nor anything a traceback would print (chained exceptions included)."""
    printed = "".join(traceback.format_exception(exc)) + repr(exc)
    for value in values:
        assert value not in printed


def public_key(key: HsmKey) -> rsa.RSAPublicKey:
    return key.private_key.public_key()


def slot_of(serial: str) -> int:
    return int(
        pkcs11.lib(os.path.realpath(SOFTHSM_LIBRARY)).get_token(token_serial=serial.encode()).slot.slot_id
    )


def close_all_sessions(serial: str) -> None:
    """C_CloseAllSessions on the token's slot, called on the library directly, not through python-pkcs11.

    It also ends the login: PKCS#11 logs an application out when its last session on a token closes.
    """
    library = ctypes.CDLL(os.path.realpath(SOFTHSM_LIBRARY))
    assert library.C_CloseAllSessions(ctypes.c_ulong(slot_of(serial))) == 0


@pytest.fixture
def main_env(softhsm: SoftHsmSession) -> dict[str, str]:
    return softhsm.env(softhsm.main_key)


@pytest.fixture
def all_secrets(softhsm: SoftHsmSession) -> Iterator[tuple[str, ...]]:
    yield (
        softhsm.primary.pin,
        softhsm.primary.so_pin,
        softhsm.second.pin,
        softhsm.second.so_pin,
        softhsm.main_key.pfx_password,
        softhsm.second_key.pfx_password,
    )


# -- round trips and upstream compatibility ---------------------------------------------------------------


def test_round_trip_check_and_description(softhsm: SoftHsmSession, main_env: dict[str, str]) -> None:
    async def main() -> None:
        async with opened(main_env) as provider:
            data_key = secrets.token_bytes(32)
            wrapped = await provider.wrap(data_key)
            assert len(wrapped) == 256 and data_key not in wrapped
            assert await provider.unwrap(wrapped) == data_key
            await provider.check()
            assert softhsm.primary.serial in provider.description
            assert "'kc'" in provider.description and softhsm.primary.pin not in provider.description

    asyncio.run(main())


def test_data_key_wrapped_outside_the_token_unwraps_on_it(
    softhsm: SoftHsmSession, main_env: dict[str, str]
) -> None:
    """Upstream wraps with the certificate's public key (OAEP SHA-1); the token must unwrap that."""
    data_key = secrets.token_bytes(32)
    wrapped_outside = public_key(softhsm.main_key).encrypt(data_key, OAEP_SHA1)

    async def main() -> bytes:
        async with opened(main_env) as provider:
            assert await provider.unwrap(wrapped_outside) == data_key
            return await provider.wrap(data_key)

    wrapped_here = asyncio.run(main())
    # And what this provider wraps, the key pair unwraps anywhere (the certificate provider, upstream).
    assert softhsm.main_key.private_key.decrypt(wrapped_here, OAEP_SHA1) == data_key


def test_provider_is_chosen_by_rsa_key_provider(main_env: dict[str, str]) -> None:
    async def main() -> None:
        settings = load_settings(environ=main_env).settings
        provider = await open_key_provider(side_of(settings))
        try:
            assert isinstance(provider, provider_module.Pkcs11KeyProvider)
            await provider.check()
        finally:
            await provider.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("key_id", ["0a1b", "0a:1b", " 0A 1B ", "hex:0A1B", "0a-1b"])
def test_key_by_id_in_hex_bytes_as_pkcs11_tool_prints_it(
    softhsm: SoftHsmSession, main_env: dict[str, str], key_id: str
) -> None:
    env = changed(main_env, pkcs11PrivateKeyLabel=None, pkcs11PrivateKeyId=key_id)
    data_key = secrets.token_bytes(32)

    async def main() -> None:
        async with opened(env) as provider:
            assert (
                await provider.unwrap(public_key(softhsm.main_key).encrypt(data_key, OAEP_SHA1)) == data_key
            )

    asyncio.run(main())


def test_key_by_label_and_id(main_env: dict[str, str]) -> None:
    """Both set and both right: the id chooses; the label agreeing draws no warning."""

    async def main() -> None:
        async with opened(changed(main_env, pkcs11PrivateKeyId="0a1b")) as provider:
            await provider.check()
            assert provider.label_warning is None

    asyncio.run(main())


def test_token_chosen_by_serial_among_two(softhsm: SoftHsmSession) -> None:
    """Both tokens hold a key labelled 'kc' with id 0a1b: only the serial number tells them apart."""
    env = softhsm.env(softhsm.second_key, softhsm.second)
    data_key = secrets.token_bytes(32)

    async def main() -> None:
        async with opened(env) as provider:
            assert softhsm.second.serial in provider.description
            assert (
                await provider.unwrap(public_key(softhsm.second_key).encrypt(data_key, OAEP_SHA1)) == data_key
            )
            with pytest.raises(IntegrityFailure):
                await provider.unwrap(public_key(softhsm.main_key).encrypt(data_key, OAEP_SHA1))

    asyncio.run(main())
    # The second token's certificate with the primary token's key of the same label: not a pair.
    error = open_error(
        changed(env, pkcs11SlotTokenSerialNumber=softhsm.primary.serial, pkcs11LoginPin=softhsm.primary.pin)
    )
    assert isinstance(error, ConfigurationError)
    assert "not a key pair" in str(error)


def test_serial_number_is_compared_liberally(softhsm: SoftHsmSession, main_env: dict[str, str]) -> None:
    async def main() -> None:
        async with opened(changed(main_env, pkcs11SlotTokenSerialNumber=softhsm.primary.serial.upper())) as p:
            await p.check()

    asyncio.run(main())


def test_transfer_prefix(softhsm: SoftHsmSession, main_env: dict[str, str]) -> None:
    async def main() -> None:
        async with opened(as_transfer(main_env), transfer=True) as provider:
            await provider.check()

    asyncio.run(main())
    error = open_error(as_transfer(changed(main_env, pkcs11PrivateKeyLabel="nope")), transfer=True)
    assert "keyConnectorSettings__transferTo__rsaKey__pkcs11PrivateKeyLabel" in str(error)


def test_pkcs11_provider_fixture_gives_a_fresh_working_key(pkcs11_provider: ProviderEnv) -> None:
    assert pkcs11_provider.endpoint is None
    assert "SOFTHSM2_CONF" in pkcs11_provider.env
    assert pkcs11_provider.env["keyConnectorSettings__certificate__provider"] == "filesystem"

    async def main() -> None:
        async with opened(pkcs11_provider.env) as provider:
            await provider.check()
            for value in pkcs11_provider.secrets:
                assert value not in provider.description

    asyncio.run(main())


# -- configuration errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "setting", "words"),
    [
        ({"pkcs11LoginPin": "wrong-pin-1234"}, "pkcs11LoginPin", "refused the PIN"),
        ({"pkcs11LoginPin": None}, "pkcs11LoginPin", "is not set"),
        (
            {"pkcs11SlotTokenSerialNumber": "0000deadbeef0000"},
            "pkcs11SlotTokenSerialNumber",
            "tokens present",
        ),
        ({"pkcs11SlotTokenSerialNumber": None}, "pkcs11SlotTokenSerialNumber", "several tokens"),
        ({"pkcs11PrivateKeyLabel": "no-such-key"}, "pkcs11PrivateKeyLabel", "'spare' (id 02)"),
        (
            {"pkcs11PrivateKeyLabel": None, "pkcs11PrivateKeyId": "ffff"},
            "pkcs11PrivateKeyId",
            "'kc' (id 0a1b)",
        ),
        ({"pkcs11PrivateKeyLabel": None}, "pkcs11PrivateKeyLabel", "pkcs11PrivateKeyId"),
        ({"pkcs11LibraryPath": "/nonexistent/libpkcs11.so"}, "pkcs11LibraryPath", "no file at"),
        ({"pkcs11LibraryPath": "/"}, "pkcs11LibraryPath", "directory"),
        (
            {"pkcs11LibraryPath": None, "pkcs11Provider": "thales"},
            "pkcs11Provider",
            "unknown PKCS#11 provider",
        ),
        ({"pkcs11LibraryPath": None}, "pkcs11Provider", "is not set"),
        ({"pkcs11LoginUserType": "admin"}, "pkcs11LoginUserType", "unknown user type"),
        ({"pkcs11PrivateKeyLabel": "spare"}, "pkcs11PrivateKeyLabel", "not a key pair"),
    ],
)
def test_configuration_errors_name_the_setting(
    main_env: dict[str, str],
    all_secrets: tuple[str, ...],
    changes: dict[str, str | None],
    setting: str,
    words: str,
) -> None:
    error = open_error(changed(main_env, **changes))
    assert isinstance(error, ConfigurationError), error
    assert error.setting == f"rsaKey.{setting}"
    assert f"keyConnectorSettings__rsaKey__{setting}" in str(error)
    assert words in str(error)
    assert_no_secret(error, *all_secrets, "wrong-pin-1234")


def test_library_that_does_not_load(main_env: dict[str, str], tmp_path: Path) -> None:
    garbage = tmp_path / "libgarbage.so"
    garbage.write_bytes(b"not an ELF file")
    error = open_error(changed(main_env, pkcs11LibraryPath=str(garbage)))
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.pkcs11LibraryPath"
    assert "cannot load" in str(error)

    not_pkcs11 = pkcs11._pkcs11.__file__  # a real shared library, just not a PKCS#11 one
    error = open_error(changed(main_env, pkcs11LibraryPath=not_pkcs11))
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.pkcs11LibraryPath"
    assert "not a PKCS#11 library" in str(error)


def test_certificate_settings_are_required(main_env: dict[str, str]) -> None:
    error = open_error(
        changed(main_env) | {"keyConnectorSettings__certificate__filesystemPath": "/nonexistent.pfx"}
    )
    assert isinstance(error, ConfigurationError) and error.setting == "certificate.filesystemPath"


def test_wrong_pin_twice_still_says_wrong_pin(main_env: dict[str, str], all_secrets: tuple[str, ...]) -> None:
    """A failed login leaves nothing behind that turns the next attempt into another error."""
    for _ in range(2):
        error = open_error(changed(main_env, pkcs11LoginPin="0000"))
        assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.pkcs11LoginPin"
        assert_no_secret(error, *all_secrets)


def test_security_officer_sees_no_key(softhsm: SoftHsmSession, all_secrets: tuple[str, ...]) -> None:
    """SoftHSM lets the SO log in but shows it no private key: the message says which user type to use."""
    env = changed(
        softhsm.env(softhsm.second_key, softhsm.second),
        pkcs11LoginUserType="so",
        pkcs11LoginPin=softhsm.second.so_pin,
    )
    error = open_error(env)
    assert isinstance(error, ConfigurationError)
    assert error.setting in ("rsaKey.pkcs11PrivateKeyLabel", "rsaKey.pkcs11LoginUserType"), error
    assert_no_secret(error, *all_secrets)


def test_same_token_twice_in_one_process(
    softhsm: SoftHsmSession, main_env: dict[str, str], tmp_path: Path
) -> None:
    """Two providers on one token share its login: closing one leaves the other working.

    The second one loads the library through a symbolic link, which must not load it a second time.
    """
    link = tmp_path / "libsofthsm-link.so"
    link.symlink_to(SOFTHSM_LIBRARY)
    spare_env = changed(
        softhsm.env(softhsm.spare_key),
        pkcs11PrivateKeyLabel=None,
        pkcs11PrivateKeyId="hex:02",
        pkcs11LibraryPath=str(link),
    )

    async def main() -> None:
        async with opened(main_env) as first:
            async with opened(spare_env) as second:
                await first.check()
                await second.check()
            await first.check()  # the second one's close did not log the first one out
            with pytest.raises(ConfigurationError) as caught:
                async with opened(changed(main_env, pkcs11LoginPin="another-pin")):
                    pass
            assert caught.value.setting == "rsaKey.pkcs11LoginPin"
            assert "another-pin" not in str(caught.value)
            await first.check()

    asyncio.run(main())


def test_context_specific_login_for_a_key_that_always_authenticates(
    softhsm: SoftHsmSession, tmp_path: Path
) -> None:
    """A key with CKA_ALWAYS_AUTHENTICATE needs the PIN again before each decryption."""
    token = softhsm.primary
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    label = "always-" + secrets.token_hex(4)
    attributes = decode_rsa_private_key(der) | {
        pkcs11.Attribute.TOKEN: True,
        pkcs11.Attribute.PRIVATE: True,
        pkcs11.Attribute.SENSITIVE: True,
        pkcs11.Attribute.LABEL: label,
        pkcs11.Attribute.ID: bytes.fromhex("a1"),
        pkcs11.Attribute.ALWAYS_AUTHENTICATE: True,
    }
    lib = pkcs11.lib(os.path.realpath(SOFTHSM_LIBRARY))
    with lib.get_token(token_serial=token.serial.encode()).open(rw=True, user_pin=token.pin) as session:
        created = session.create_object(attributes)
        assert created[pkcs11.Attribute.ALWAYS_AUTHENTICATE] is True
    key = HsmKey(label, "a1", private_key, certificate_pfx(private_key, tmp_path / "always.pfx", "pw"), "pw")
    data_key = secrets.token_bytes(32)
    wrapped = public_key(key).encrypt(data_key, OAEP_SHA1)

    async def main(user_type: str) -> None:
        async with opened(changed(softhsm.env(key), pkcs11LoginUserType=user_type)) as provider:
            for _ in range(3):
                assert await provider.unwrap(wrapped) == data_key

    asyncio.run(main("context_specific"))
    asyncio.run(main("user"))  # the key demands it, so it is done whatever the user type


# -- the opensc and yubihsm defaults ----------------------------------------------------------------------


def test_opensc_default_path_is_debians_library() -> None:
    assert Path(OPENSC).is_file(), "Debian's OpenSC is missing: run `make test`"
    path, setting = provider_module.library_path(RsaKeySettings(pkcs11Provider="opensc"))
    assert path == os.path.realpath(OPENSC) and setting == "rsaKey.pkcs11Provider"


def test_opensc_without_a_token_gives_a_clear_error(
    main_env: dict[str, str], all_secrets: tuple[str, ...]
) -> None:
    """No smart card here: OpenSC loads and shows no token, which is an outage (503), not a crash."""
    for library in (
        {"pkcs11Provider": "opensc", "pkcs11LibraryPath": None},
        {"pkcs11LibraryPath": OPENSC.replace("/opensc-pkcs11.so", "/pkcs11/opensc-pkcs11.so")},
    ):
        error = open_error(changed(main_env, **library))
        assert isinstance(error, UnavailableError), error
        assert "keyConnectorSettings__rsaKey__pkcs11SlotTokenSerialNumber" in str(error)
        assert os.path.realpath(OPENSC) in str(error) and "no initialised token" in str(error)
        assert_no_secret(error, *all_secrets)


def test_yubihsm_default_path_lists_where_it_looked() -> None:
    candidates = provider_module.default_library_candidates("yubihsm")
    assert not any(Path(c).exists() for c in candidates), "this test expects no YubiHSM library installed"
    with pytest.raises(ConfigurationError) as caught:
        provider_module.library_path(RsaKeySettings(pkcs11Provider="YubiHSM"))
    assert caught.value.setting == "rsaKey.pkcs11LibraryPath"
    assert "pkcs11/yubihsm_pkcs11.so" in str(caught.value) and "/usr/lib64/" in str(caught.value)


# -- concurrency, integrity and recovery ------------------------------------------------------------------


def test_concurrent_unwraps_are_all_correct(softhsm: SoftHsmSession, main_env: dict[str, str]) -> None:
    data_keys = [secrets.token_bytes(32) for _ in range(50)]
    wrapped = [public_key(softhsm.main_key).encrypt(k, OAEP_SHA1) for k in data_keys]

    async def main() -> list[bytes]:
        async with opened(main_env) as provider:
            checks = [provider.check() for _ in range(5)]
            results = await asyncio.gather(*(provider.unwrap(w) for w in wrapped), *checks)
            return [r for r in results if r is not None]

    assert asyncio.run(main()) == data_keys


def test_a_foreign_ciphertext_is_an_integrity_error_and_the_session_survives(
    softhsm: SoftHsmSession, main_env: dict[str, str]
) -> None:
    foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()

    async def main() -> None:
        async with opened(main_env) as provider:
            with pytest.raises(IntegrityFailure):
                await provider.unwrap(foreign.encrypt(secrets.token_bytes(32), OAEP_SHA1))
            with pytest.raises(IntegrityFailure):
                await provider.unwrap(b"\x01" * 100)  # not even the key's size
            await provider.check()

    asyncio.run(main())


def test_session_recovers_after_all_sessions_were_closed(
    softhsm: SoftHsmSession, main_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    data_key = secrets.token_bytes(32)
    wrapped = public_key(softhsm.main_key).encrypt(data_key, OAEP_SHA1)

    async def main() -> None:
        async with opened(main_env) as provider:
            assert await provider.unwrap(wrapped) == data_key
            close_all_sessions(softhsm.primary.serial)
            assert await provider.unwrap(wrapped) == data_key
            await provider.check()

    with caplog.at_level("WARNING", logger="keyconnector.keypairs.pkcs11"):
        asyncio.run(main())
    assert "SessionHandleInvalid" in caplog.text, "the session should really have been lost"


def test_session_recovers_after_the_library_was_reinitialised(
    softhsm: SoftHsmSession, main_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """C_Finalize (+ C_Initialize) from elsewhere in the process: every handle is gone, as after a restart."""
    data_key = secrets.token_bytes(32)
    wrapped = public_key(softhsm.main_key).encrypt(data_key, OAEP_SHA1)

    library = pkcs11.lib(os.path.realpath(SOFTHSM_LIBRARY))

    async def main() -> None:
        async with opened(main_env) as provider:
            await provider.check()
            library.reinitialize()
            assert await provider.unwrap(wrapped) == data_key
            library.finalize()  # and not even initialised again
            assert await provider.unwrap(wrapped) == data_key

    with caplog.at_level("WARNING", logger="keyconnector.keypairs.pkcs11"):
        asyncio.run(main())
    assert caplog.text.count("opening a new session") == 2, caplog.text


def test_key_gone_from_the_token_is_unavailable_then_recovers(
    softhsm: SoftHsmSession, tmp_path: Path, all_secrets: tuple[str, ...]
) -> None:
    """A 503 while the key cannot be used, and the same provider works again once it is back."""
    token = softhsm.primary
    key = softhsm.hsm.import_key(token, "gone-" + secrets.token_hex(4), "c0ffee", tmp_path)
    data_key = secrets.token_bytes(32)
    wrapped = public_key(key).encrypt(data_key, OAEP_SHA1)

    def pkcs11_tool(*args: str) -> None:
        subprocess.run(
            [
                "pkcs11-tool",
                "--module",
                SOFTHSM_LIBRARY,
                "--token-label",
                token.label,
                "--login",
                "--pin",
                token.pin,
                *args,
            ],
            env={**os.environ, **softhsm.hsm.env},
            check=True,
            capture_output=True,
            timeout=60,
        )

    async def main() -> None:
        async with opened(softhsm.env(key)) as provider:
            assert await provider.unwrap(wrapped) == data_key
            pkcs11_tool("--delete-object", "--type", "privkey", "--label", key.label)
            close_all_sessions(token.serial)
            with pytest.raises(UnavailableError) as caught:
                await provider.unwrap(wrapped)
            assert "keyConnectorSettings__rsaKey__pkcs11SlotTokenSerialNumber" in str(caught.value)
            assert key.label in str(caught.value)
            assert_no_secret(caught.value, *all_secrets)

            softhsm.hsm.import_key(token, key.label, key.key_id, tmp_path / "again", key.private_key)
            assert await provider.unwrap(wrapped) == data_key

    (tmp_path / "again").mkdir()
    asyncio.run(main())


def test_closed_provider(main_env: dict[str, str]) -> None:
    async def main() -> None:
        async with opened(main_env) as provider:
            pass
        await provider.aclose()  # twice is fine
        with pytest.raises(UnavailableError):
            await provider.unwrap(b"\x00" * 256)

    asyncio.run(main())


# -- pkcs11PrivateKeyId as upstream's release reads it ---------------------------------------------------


UPSTREAM_ID = "0100000000000000"  # CKA_ID 01 00 00 00 00 00 00 00: upstream's pkcs11PrivateKeyId=1


@dataclass(frozen=True)
class UpstreamKeys:
    key: HsmKey  # CKA_ID 01 00 00 00 00 00 00 00, as upstream's docs make it
    decoy: HsmKey  # CKA_ID 01 (one byte), labelled as the operator's stale label says


@pytest.fixture(scope="module")
def upstream_keys(softhsm: SoftHsmSession, tmp_path_factory: pytest.TempPathFactory) -> UpstreamKeys:
    """An upstream deployment's key, and a decoy that the old hex reading of ``1`` (CKA_ID ``01``) and
    the stale label would both have chosen instead."""
    folder = tmp_path_factory.mktemp("upstream-keys")
    key = softhsm.hsm.import_key(softhsm.primary, "upstream-kc", UPSTREAM_ID, folder)
    decoy = softhsm.hsm.import_key(softhsm.primary, "stale-label", "01", folder)
    return UpstreamKeys(key, decoy)


def upstream_env(softhsm: SoftHsmSession, keys: UpstreamKeys, key_id: str) -> dict[str, str]:
    """Upstream's env for an HSM: the key by id, and a label left over that names another key."""
    return changed(softhsm.env(keys.key), pkcs11PrivateKeyLabel=keys.decoy.label, pkcs11PrivateKeyId=key_id)


def certificate_file(key: HsmKey, folder: Path, encoding: str) -> Path:
    """The key pair's certificate alone, as PEM (what Bitwarden's help tells HSM users to give) or DER."""
    bundle = pkcs12.load_pkcs12(key.certificate_pfx.read_bytes(), key.pfx_password.encode())
    entry = bundle.cert or bundle.additional_certs[0]
    form = serialization.Encoding.PEM if encoding == "PEM" else serialization.Encoding.DER
    path = folder / f"{key.label}.{encoding.lower()}"
    path.write_bytes(entry.certificate.public_bytes(form))
    return path


def with_certificate_file(env: dict[str, str], path: Path) -> dict[str, str]:
    out = {k: v for k, v in env.items() if not k.startswith("keyConnectorSettings__certificate__")}
    out["keyConnectorSettings__certificate__provider"] = "filesystem"
    out["keyConnectorSettings__certificate__filesystemPath"] = str(path)
    return out


@pytest.mark.parametrize("encoding", ["PEM", "DER"])
def test_the_certificate_may_be_pem_or_der(
    softhsm: SoftHsmSession, main_env: dict[str, str], tmp_path: Path, encoding: str
) -> None:
    env = with_certificate_file(main_env, certificate_file(softhsm.main_key, tmp_path, encoding))
    data_key = secrets.token_bytes(32)

    async def main() -> None:
        async with opened(env) as provider:
            assert f"({encoding} certificate)" in provider.description
            wrapped = await provider.wrap(data_key)
            assert softhsm.main_key.private_key.decrypt(wrapped, OAEP_SHA1) == data_key
            assert await provider.unwrap(wrapped) == data_key

    asyncio.run(main())


@pytest.mark.parametrize("key_id", ["1", "0x1", "0X0000000000000001", " 1 ", "0001", "+1"])
def test_upstream_id_is_a_little_endian_number_and_the_label_is_ignored(
    softhsm: SoftHsmSession, upstream_keys: UpstreamKeys, key_id: str
) -> None:
    data_key = secrets.token_bytes(32)

    async def main() -> None:
        async with opened(upstream_env(softhsm, upstream_keys, key_id)) as provider:
            wrapped = public_key(upstream_keys.key).encrypt(data_key, OAEP_SHA1)
            assert await provider.unwrap(wrapped) == data_key
            assert provider.key_id_match is not None
            assert "upstream's number 1" in provider.key_id_match
            assert "01 00 00 00 00 00 00 00" in provider.key_id_match
            assert provider.label_warning is not None
            assert "'stale-label'" in provider.label_warning and "'upstream-kc'" in provider.label_warning
            assert "keyConnectorSettings__rsaKey__pkcs11PrivateKeyLabel" in provider.label_warning
            assert "01 00 00 00 00 00 00 00" in provider.description

    asyncio.run(main())


def test_hex_bytes_are_read_only_where_upstream_cannot_read_a_number(
    softhsm: SoftHsmSession, main_env: dict[str, str]
) -> None:
    """``0a1b`` was hex bytes here and is no number upstream: still hex bytes, and ``check`` says so."""

    async def main() -> None:
        async with opened(changed(main_env, pkcs11PrivateKeyLabel=None, pkcs11PrivateKeyId="0a1b")) as p:
            assert p.key_id_match is not None
            assert "hex bytes" in p.key_id_match and "0a 1b" in p.key_id_match
            assert p.label_warning is None

    asyncio.run(main())


@pytest.mark.parametrize(
    ("key_id", "number", "cka_id", "hint"),
    [
        ("0x0A1B", "2587", "1b 0a 00 00 00 00 00 00", "hex:0a1b"),  # 0x was hex bytes here once
        ("02", "2", "02 00 00 00 00 00 00 00", "hex:02"),  # so were bare digits
    ],
)
def test_when_both_readings_are_possible_upstreams_wins_and_the_error_says_how_to_write_ours(
    softhsm: SoftHsmSession,
    main_env: dict[str, str],
    all_secrets: tuple[str, ...],
    key_id: str,
    number: str,
    cka_id: str,
    hint: str,
) -> None:
    error = open_error(changed(main_env, pkcs11PrivateKeyLabel=None, pkcs11PrivateKeyId=key_id))
    assert isinstance(error, ConfigurationError), error
    assert error.setting == "rsaKey.pkcs11PrivateKeyId"
    message = str(error)
    assert f"upstream's number {number}" in message and cka_id in message
    assert f"{setting_name('rsaKey.pkcs11PrivateKeyId')}={hint}" in message
    assert_no_secret(error, *all_secrets)

    async def main() -> None:  # and the spelling the message suggests works
        env = softhsm.env(softhsm.spare_key if key_id == "02" else softhsm.main_key)
        async with opened(changed(env, pkcs11PrivateKeyLabel=None, pkcs11PrivateKeyId=hint)) as provider:
            await provider.check()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("key_id", "words"),
    [
        ("18446744073709551616", "larger than upstream's unsigned 64-bit"),
        ("0x10000000000000000", "larger than upstream's unsigned 64-bit"),
        ("0x0a:1b", "write hex:0a:1b"),
        ("0xzz", "not a hexadecimal number"),
        ("#1a", "decimal or with 0x"),
        ("&h1a", "decimal or with 0x"),
        ("hex:", "no hex digits"),
        ("hex:0g", "not hex bytes"),
        ("-1", "not an unsigned number"),
    ],
)
def test_key_ids_upstream_would_read_otherwise_or_not_at_all_are_refused(key_id: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        provider_module.parse_key_id(key_id, "rsaKey.pkcs11PrivateKeyId")
    assert caught.value.setting == "rsaKey.pkcs11PrivateKeyId"
    assert words in str(caught.value)


def test_key_id_readings() -> None:
    def readings(text: str) -> list[tuple[str, bytes]]:
        return [(r.form, r.cka_id) for r in provider_module.parse_key_id(text, "rsaKey.pkcs11PrivateKeyId")]

    number, hex_bytes, text = provider_module.UPSTREAM_NUMBER, provider_module.HEX_BYTES, provider_module.TEXT
    assert readings("18446744073709551615") == [(number, b"\xff" * 8)]
    assert readings("0x0102") == [(number, b"\x02\x01" + bytes(6))]
    assert readings("abc") == [(hex_bytes, b"\x0a\xbc"), (text, b"abc")]
    assert readings("01 02") == [(hex_bytes, b"\x01\x02"), (text, b"01 02")]
    assert readings("hex:0102") == [(hex_bytes, b"\x01\x02")]
    assert readings("my-key") == [(text, b"my-key")]


def test_serve_and_check_take_over_an_upstream_hsm_deployment(
    softhsm: SoftHsmSession,
    upstream_keys: UpstreamKeys,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
    start_service,  # type: ignore[no-untyped-def]
) -> None:
    """Upstream's env file as its docs write it (id 1, a stale label, the certificate as PEM) against
    a real ``serve``, then ``keyconnector check`` on the same deployment names the reading that matched."""
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    for name in [n for n in env if n.startswith(("keyConnectorSettings__certificate__", PREFIX))]:
        del env[name]
    env.update(upstream_env(softhsm, upstream_keys, "1"))
    env = with_certificate_file(env, certificate_file(upstream_keys.key, tmp_path, "PEM"))
    user = uuid.uuid4()
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
    service = start_service(env)
    with service.client() as client:
        assert client.post("/user-keys", json={"key": key}, headers=headers).status_code == 200
        assert client.get("/user-keys", headers=headers).json() == {"key": key}
    service.stop()
    log = service.log_path.read_text()
    assert "upstream's number 1" in log and "stale-label" in log
    # The data key was wrapped for the upstream key, not the decoy.
    with sqlite3.connect(tmp_path / "kc.db") as conn:
        (wrapped,) = conn.execute('SELECT "SymmetricKey" FROM "ApplicationDatas"').fetchone()
    upstream_keys.key.private_key.decrypt(base64.b64decode(wrapped), OAEP_SHA1)

    result = subprocess.run(
        [sys.executable, "-m", "keyconnector", "check"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    key_id = [line for line in lines if line.startswith("ok   key id:")]
    assert len(key_id) == 1, result.stdout
    assert "keyConnectorSettings__rsaKey__pkcs11PrivateKeyId=1" in key_id[0]
    assert "upstream's number 1" in key_id[0] and "01 00 00 00 00 00 00 00" in key_id[0]
    label = [line for line in lines if line.startswith("warn key id:")]
    assert len(label) == 1 and "'stale-label'" in label[0] and "ignored" in label[0], result.stdout
    assert "(PEM certificate)" in result.stdout
    assert softhsm.primary.pin not in result.stdout + result.stderr
