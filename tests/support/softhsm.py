"""SoftHSM2 tokens for the tests: Debian's ``softhsm2`` package (``make test`` installs it).

SoftHSM keeps its tokens in a directory named by the configuration file in ``SOFTHSM2_CONF``; each test
session gets its own, in a temporary directory, so the machine's tokens are never touched. The variable
is set for the whole test process (SoftHSM reads it when the library is initialised) and handed to the
service processes through the fixtures' ``env``.

Two tokens, made once per session: a primary one holding the main key pair and a spare one, and a
second token holding another key pair under the same label and id, to prove that the serial number
chooses the token. SoftHSM picks each token's serial number itself at initialisation; it is read back
from ``softhsm2-util --show-slots``. Tokens must all exist before the library is first loaded in this
process (SoftHSM does not see tokens made later by another process), whereas keys imported later by
``softhsm2-util`` are seen at once: so ``pkcs11_provider`` imports a fresh key pair into the primary
token for every test.

The certificate files are PFX files holding only the certificate, as an operator exports it for an
HSM deployment: the provider uses the certificate's public key to wrap, and every private-key
operation happens on the token.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from keyconnector.keypairs.generate import self_signed_certificate
from tests.support.providers import ProviderEnv

SOFTHSM_LIBRARY = "/usr/lib/softhsm/libsofthsm2.so"
SOFTHSM_UTIL = "softhsm2-util"
PREFIX = "keyConnectorSettings__rsaKey__"


def require_softhsm() -> str:
    """The softhsm2-util binary, or a failure that says how to get it."""
    tool = shutil.which(SOFTHSM_UTIL)
    if tool is None or not Path(SOFTHSM_LIBRARY).is_file():
        raise RuntimeError(
            f"SoftHSM2 is missing ({SOFTHSM_UTIL} on PATH and {SOFTHSM_LIBRARY}); run `make test`, which "
            "installs Debian's softhsm2 and opensc packages"
        )
    return tool


@dataclass(frozen=True)
class HsmToken:
    label: str
    serial: str
    pin: str
    so_pin: str


@dataclass(frozen=True)
class HsmKey:
    label: str
    key_id: str  # hex, as softhsm2-util --id takes it
    private_key: rsa.RSAPrivateKey
    certificate_pfx: Path
    pfx_password: str


def certificate_pfx(private_key: rsa.RSAPrivateKey, path: Path, password: str) -> Path:
    """A PFX holding only the key pair's self-signed certificate: the private key stays on the token."""
    certificate = self_signed_certificate(private_key, common_name="Key Connector (PKCS#11)")
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode())
    )
    path.write_bytes(pkcs12.serialize_key_and_certificates(b"kc", None, certificate, None, encryption))
    return path


class SoftHsm:
    """A private SoftHSM2 token directory and the softhsm2-util calls the tests need."""

    def __init__(self, folder: Path) -> None:
        self.tool = require_softhsm()
        self.folder = folder
        tokens = folder / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
            "slots.removable = false\n",
            encoding="ascii",
        )
        self.env = {"SOFTHSM2_CONF": str(self.conf)}

    def util(self, *args: str) -> str:
        result = subprocess.run(
            [self.tool, *args], env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            # The arguments hold PINs: show the output only.
            raise RuntimeError(f"softhsm2-util {args[0]} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def init_token(self, label: str) -> HsmToken:
        pin, so_pin = "kc-pin-" + secrets.token_urlsafe(12), "kc-so-" + secrets.token_urlsafe(12)
        self.util("--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin)
        return HsmToken(label=label, serial=self.serial_of(label), pin=pin, so_pin=so_pin)

    def serial_of(self, label: str) -> str:
        serial = ""
        for line in self.util("--show-slots").splitlines():
            name, _, value = line.strip().partition(":")
            if name == "Serial number":
                serial = value.strip()
            elif name == "Label" and value.strip() == label:
                return serial
        raise RuntimeError(f"softhsm2-util shows no token labelled {label}")

    def import_key(
        self,
        token: HsmToken,
        label: str,
        key_id: str,
        folder: Path,
        private_key: rsa.RSAPrivateKey | None = None,
    ) -> HsmKey:
        """An RSA-2048 key pair on ``token`` plus a PFX of its certificate in ``folder``."""
        private_key = private_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = folder / f"{token.label}-{label}.pk8.pem"
        pem.touch(mode=0o600)
        pem.write_bytes(
            private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        try:
            self.util(
                "--import", str(pem), "--serial", token.serial, "--label", label, "--id", key_id,
                "--pin", token.pin,
            )  # fmt: skip
        finally:
            pem.unlink()
        password = "kc-pfx-" + secrets.token_urlsafe(12)
        pfx = certificate_pfx(private_key, folder / f"{token.label}-{label}.pfx", password)
        return HsmKey(label, key_id, private_key, pfx, password)


@dataclass(frozen=True)
class SoftHsmSession:
    hsm: SoftHsm
    primary: HsmToken
    second: HsmToken
    main_key: HsmKey  # on primary, label "kc", id 0a1b
    spare_key: HsmKey  # on primary, label "spare", id 02
    second_key: HsmKey  # on second, label "kc", id 0a1b (another key pair)

    def env(self, key: HsmKey, token: HsmToken | None = None) -> dict[str, str]:
        """Complete settings for a key, by label, with its certificate."""
        token = token or self.primary
        return {
            **self.hsm.env,
            PREFIX + "provider": "pkcs11",
            PREFIX + "pkcs11LibraryPath": SOFTHSM_LIBRARY,
            PREFIX + "pkcs11SlotTokenSerialNumber": token.serial,
            PREFIX + "pkcs11LoginUserType": "user",
            PREFIX + "pkcs11LoginPin": token.pin,
            PREFIX + "pkcs11PrivateKeyLabel": key.label,
            "keyConnectorSettings__certificate__provider": "filesystem",
            "keyConnectorSettings__certificate__filesystemPath": str(key.certificate_pfx),
            "keyConnectorSettings__certificate__filesystemPassword": key.pfx_password,
        }


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmSession]:
    hsm = SoftHsm(tmp_path_factory.mktemp("softhsm"))
    keys = tmp_path_factory.mktemp("softhsm-keys")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(hsm.conf))
        primary = hsm.init_token("kc-primary")
        second = hsm.init_token("kc-second")
        yield SoftHsmSession(
            hsm=hsm,
            primary=primary,
            second=second,
            main_key=hsm.import_key(primary, "kc", "0a1b", keys),
            spare_key=hsm.import_key(primary, "spare", "02", keys),
            second_key=hsm.import_key(second, "kc", "0a1b", keys),
        )


@pytest.fixture
def pkcs11_provider(softhsm: SoftHsmSession, tmp_path: Path) -> ProviderEnv:
    """A fresh key pair on the session's primary SoftHSM token, chosen by label, and its certificate."""
    key = softhsm.hsm.import_key(
        softhsm.primary, "kc-" + secrets.token_hex(6), secrets.token_hex(4), tmp_path
    )
    return ProviderEnv(env=softhsm.env(key), endpoint=None, secrets=(softhsm.primary.pin, key.pfx_password))
